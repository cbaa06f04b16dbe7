"""When a retraining run extends the production bank and when it refits, with the reason."""

import dataclasses

import pytest

from pipeline.config import CoresetConfig
from pipeline.data.datasets import Dataset
from pipeline.hashing import sha256_file
from pipeline.lifecycle.registry import Registry
from pipeline.lifecycle.retrain import RetrainConfig, choose_fit
from pipeline.lifecycle.steps import Params
from pipeline.patchcore.bank import save_bank


@pytest.fixture()
def setup(tmp_path, small_mtd_model, mtd_dataset):
    """Production fitted on 20 real tiles with today's params; a dataset with 5 more."""
    params = dataclasses.replace(Params.load("params.yaml"), data="mtd:tiles")
    old = mtd_dataset.train[:20]
    files = [{"path": s.path, "sha256": sha256_file(s.path)} for s in old]
    save_bank(tmp_path / "bank", small_mtd_model, training={"spec": "mtd:tiles", "files": files, "skipped": []})
    registry = Registry(tmp_path / "banks")
    bank = registry.register(tmp_path / "bank", {"gates": {"passed": True}, "params": params.as_dict(),
                                                 "data_spec": "mtd:tiles", "files": files,
                                                 "fit": {"fit": "full", "increments": 0}})
    registry.promote(bank)
    grown = Dataset("mtd:tiles", list(mtd_dataset.train[:25]), [])
    return params, registry, grown, bank


def test_only_new_good_images_with_unchanged_settings_extend_production(setup):
    params, registry, grown, bank = setup
    assert choose_fit(params, registry, grown) == {
        "fit": "incremental", "reason": "5 new good image(s), settings unchanged", "parent": bank, "new_images": 5}


def test_every_other_change_refits_and_says_why(setup):
    params, registry, grown, _ = setup
    same = Dataset("mtd:tiles", grown.train[:20], [])
    cases = [
        (choose_fit(params, registry, grown, full=True), "a full refit was requested"),
        (choose_fit(dataclasses.replace(params, coreset=CoresetConfig(ratio=0.02)), registry, grown),
         "params changed since production: coreset"),
        (choose_fit(dataclasses.replace(params, data="mtd:other"), registry, grown),
         "the data spec changed from mtd:tiles to mtd:other"),
        (choose_fit(params, registry, Dataset("mtd:tiles", grown.train[1:], [])),
         "1 image(s) the production bank was fitted on are gone"),
        (choose_fit(params, registry, same), "no new training image"),
        (choose_fit(dataclasses.replace(params, retrain=RetrainConfig(max_increments=0)), registry, grown),
         "production is already 0 extension(s) from a full fit (retrain.max_increments 0)"),
        (choose_fit(dataclasses.replace(params, retrain=RetrainConfig(incremental=False)), registry, grown),
         "retrain.incremental is false"),
        (choose_fit(params, Registry(registry.root.parent / "empty"), grown), "there is no production bank to extend"),
    ]
    for decision, reason in cases:
        assert decision == {"fit": "full", "reason": reason}
