import shutil
from pathlib import Path

import pytest

from pipeline.data.datasets import DatasetError, LoadReport, Sample, load_images, open_dataset


def test_mtd_split_counts(mtd_dataset):
    assert len(mtd_dataset.train) == 762
    assert sum(s.label == 0 for s in mtd_dataset.test) == 190
    defects = [s for s in mtd_dataset.test if s.label == 1]
    assert len(defects) == 392 and all(Path(s.mask).is_file() for s in defects)
    assert not {s.path for s in mtd_dataset.train} & {s.path for s in mtd_dataset.test}


def test_elpv_mono_excludes_uncertain_labels(elpv_mono):
    assert len(elpv_mono.train) == 470
    assert sum(s.label == 0 for s in elpv_mono.test) == 118
    assert sum(s.label == 1 for s in elpv_mono.test) == 313
    assert not elpv_mono.has_masks


def test_mvtec_layout(tmp_path, mtd_dataset):
    cat = tmp_path / "tile"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (cat / sub).mkdir(parents=True)
    for i, s in enumerate(mtd_dataset.train[:3]):
        shutil.copy(s.path, cat / "train/good" / f"{i:03d}.png")
    shutil.copy(mtd_dataset.test[0].path, cat / "test/good/000.png")
    defect = next(s for s in mtd_dataset.test if s.label == 1)
    shutil.copy(defect.path, cat / "test/crack/000.png")
    shutil.copy(defect.mask, cat / "ground_truth/crack/000_mask.png")
    ds = open_dataset(f"mvtec:{cat}")
    assert len(ds.train) == 3 and len(ds.test) == 2
    bad = [s for s in ds.test if s.label == 1]
    assert bad[0].kind == "crack" and bad[0].mask.endswith("000_mask.png")
    items = list(load_images(ds.test, with_masks=True))
    assert items[0][2].shape == items[0][1].shape[:2]


def test_folder_of_good_images(tmp_path, mtd_dataset):
    for i, s in enumerate(mtd_dataset.train[:2]):
        shutil.copy(s.path, tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(f"folder:{tmp_path}")
    assert len(ds.train) == 2 and ds.test == []


@pytest.mark.parametrize("spec", ["mtd", "foo:bar", "elpv:", "elpv:thin", "folder:/nonexistent/x"])
def test_bad_specs_explain_themselves(spec):
    with pytest.raises(DatasetError, match=r"spec|must be|not a directory"):
        open_dataset(spec)


def test_unreadable_files_reported_and_skipped(tmp_path, mtd_dataset):
    good = mtd_dataset.train[0].path
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.png"
    cut.write_bytes(Path(good).read_bytes()[:300])
    report = LoadReport()
    samples = [Sample(str(empty), 0), Sample(good, 0), Sample(str(cut), 0)]
    loaded = list(load_images(samples, report=report))
    assert [s.path for s, _, _ in loaded] == [good]
    assert [p for p, _ in report.skipped] == [str(empty), str(cut)]
    with pytest.raises(ValueError, match="empty.png"):
        list(load_images(samples, on_error="raise"))
