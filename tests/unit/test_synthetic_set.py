"""``synthetic:SPEC`` evaluation sets built from real MTD tiles: split, files, cache, retraining."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from pipeline.config import CoresetConfig
from pipeline.data.datasets import Dataset, calibration_draw, load_images, open_dataset
from pipeline.data.images import read_image, read_mask
from pipeline.data.synthetic import SyntheticConfig
from pipeline.data.synthetic_set import synthetic_dataset
from pipeline.hashing import sha256_file
from pipeline.lifecycle.registry import Registry
from pipeline.lifecycle.retrain import choose_fit
from pipeline.lifecycle.steps import Params
from pipeline.patchcore.bank import save_bank
from pipeline.patchcore.model import PatchCore


def test_a_good_only_folder_becomes_held_out_good_tiles_plus_their_defective_copies(tmp_path, mtd_dataset,
                                                                                    monkeypatch):
    monkeypatch.setenv("TRACEBANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "good"
    folder.mkdir()
    for sample in mtd_dataset.train[:15]:
        # named by the dataset's own folders, not where the checkout is: the draw hashes the name
        shutil.copy(sample.path, folder / "_".join(Path(sample.path).parts[-3:]))
    # seed 4 draws 3 of these 15 names below 0.2
    dataset = open_dataset(f"synthetic:folder:{folder}", SyntheticConfig(holdout=0.2, seed=4))
    good = [s for s in dataset.test if s.label == 0]
    bad = [s for s in dataset.test if s.label == 1]
    assert len(good) == len(bad) == 3 and len(dataset.train) == 12
    assert not {s.path for s in good} & {s.path for s in dataset.train}
    assert dataset.synthetic["seed"] == 4 and dataset.synthetic["defects_per_family"] == {
        "cutpaste": 1, "blob": 1, "scratch": 1}
    for base, defect in zip(good, bad, strict=True):  # one copy per good tile, in order
        before, after = read_image(base.path), read_image(defect.path)
        mask = read_mask(defect.mask, before.shape[:2])
        changed = before != after if before.ndim == 2 else (before != after).any(axis=2)
        assert mask.any() and np.array_equal(changed, mask)  # the stored mask is exactly what changed

    again = open_dataset(f"synthetic:folder:{folder}", SyntheticConfig(holdout=0.2, seed=4))
    assert again.test == dataset.test  # same settings and bytes: the same cached files
    other = open_dataset(f"synthetic:folder:{folder}", SyntheticConfig(holdout=0.2, seed=5))
    assert other.synthetic["folder"] != dataset.synthetic["folder"]
    # seed 5 draws none of them below 0.2: the two lowest draws are held out
    assert other.synthetic["n_good"] == 2 and len(other.train) == 13


def test_adding_images_never_moves_an_earlier_training_image_into_the_test_split(tmp_path, mtd_dataset):
    config = SyntheticConfig(holdout=0.2, seed=0)
    before = synthetic_dataset(Dataset("mtd:line", mtd_dataset.train[:200], []), config, cache=tmp_path)
    after = synthetic_dataset(Dataset("mtd:line", mtd_dataset.train[:205], []), config, cache=tmp_path)
    held_before = {s.path for s in before.test if s.label == 0}
    held_after = {s.path for s in after.test if s.label == 0}
    assert not {s.path for s in before.train} & held_after
    assert held_before <= held_after  # and no held-out image goes back to training
    assert {s.path for s in after.train} | held_after == {s.path for s in mtd_dataset.train[:205]}
    for dataset, n in ((before, 200), (after, 205)):
        assert abs(dataset.synthetic["n_good"] / n - config.holdout) < 0.06
    # salted apart from the calibration split: the two do not pick the same images
    calibration = {s.path for s in mtd_dataset.train[:205] if calibration_draw(s.path) < config.holdout}
    assert len(held_after & calibration) < len(held_after) / 2


def test_five_new_images_on_a_synthetic_line_extend_the_production_bank(tmp_path, mtd_dataset, extractor,
                                                                       monkeypatch):
    """Production fitted on a ``synthetic:`` line of 200 tiles; 5 arrive; the retrain extends it."""
    monkeypatch.setenv("TRACEBANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "line"
    folder.mkdir()
    for sample in mtd_dataset.train[:200]:
        shutil.copy(sample.path, folder)
    params = dataclasses.replace(Params.load("params.yaml"), data=f"synthetic:folder:{folder}")
    before = params.dataset()
    files = [{"path": s.path, "sha256": sha256_file(s.path)} for s in before.train]
    images = [image for _, image, _ in load_images(before.train[:2])]  # the bank's contents do not matter here
    model = PatchCore(extractor.config, CoresetConfig(ratio=0.05), extractor=extractor).fit([images])
    save_bank(tmp_path / "bank", model, training={"spec": params.data, "files": files, "skipped": []})
    registry = Registry(tmp_path / "banks")
    bank = registry.register(tmp_path / "bank", {"gates": {"passed": True}, "params": params.as_dict(),
                                                 "data_spec": params.data, "files": files,
                                                 "fit": {"fit": "full", "increments": 0}})
    registry.promote(bank)

    for sample in mtd_dataset.train[200:205]:
        shutil.copy(sample.path, folder)
    after = params.dataset()
    new = len(after.train) - len(before.train)
    assert new > 0
    assert choose_fit(params, registry, after) == {
        "fit": "incremental", "reason": f"{new} new good image(s), settings unchanged", "parent": bank,
        "new_images": new}
