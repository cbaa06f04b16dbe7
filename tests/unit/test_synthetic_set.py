"""``synthetic:SPEC`` evaluation sets built from real MTD tiles: split, files, cache."""

import shutil

import numpy as np

from pipeline.data.datasets import open_dataset
from pipeline.data.images import read_image, read_mask
from pipeline.data.synthetic import SyntheticConfig


def test_a_good_only_folder_becomes_held_out_good_tiles_plus_their_defective_copies(tmp_path, mtd_dataset,
                                                                                    monkeypatch):
    monkeypatch.setenv("TRACEBANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "good"
    folder.mkdir()
    for sample in mtd_dataset.train[:15]:
        shutil.copy(sample.path, folder / sample.path.replace("/", "_"))
    dataset = open_dataset(f"synthetic:folder:{folder}", SyntheticConfig(holdout=0.2, seed=3))
    good = [s for s in dataset.test if s.label == 0]
    bad = [s for s in dataset.test if s.label == 1]
    assert len(good) == len(bad) == 3 and len(dataset.train) == 12
    assert not {s.path for s in good} & {s.path for s in dataset.train}
    assert dataset.synthetic["seed"] == 3 and dataset.synthetic["defects_per_family"] == {
        "cutpaste": 1, "blob": 1, "scratch": 1}
    for base, defect in zip(good, bad, strict=True):  # one copy per good tile, in order
        before, after = read_image(base.path), read_image(defect.path)
        mask = read_mask(defect.mask, before.shape[:2])
        changed = before != after if before.ndim == 2 else (before != after).any(axis=2)
        assert mask.any() and np.array_equal(changed, mask)  # the stored mask is exactly what changed

    again = open_dataset(f"synthetic:folder:{folder}", SyntheticConfig(holdout=0.2, seed=3))
    assert again.test == dataset.test  # same settings and bytes: the same cached files
    other = open_dataset(f"synthetic:folder:{folder}", SyntheticConfig(holdout=0.2, seed=4))
    assert other.synthetic["folder"] != dataset.synthetic["folder"]
