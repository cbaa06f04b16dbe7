"""The Great Expectations suite, run on real good data and on deliberately broken copies of it:
each breakage fails its own expectation and names the offending file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import Sample
from pipeline.data.validation import ValidationConfig, validate_samples


@pytest.fixture(scope="module")
def good_set(elpv_mono, tmp_path_factory):
    """12 real ELPV training cells and 6 test cells (3 good, 3 defective), copied."""
    root = tmp_path_factory.mktemp("gx-good")
    train = []
    for i, s in enumerate(elpv_mono.train[:12]):
        shutil.copy(s.path, root / f"train_{i}.png")
        train.append(Sample(str(root / f"train_{i}.png"), 0))
    test = [s for s in elpv_mono.test if s.label == 0][:3] + [s for s in elpv_mono.test if s.label == 1][:3]
    return train, test


def _failures(result) -> dict[str, list[str]]:
    return {f"{f['expectation']}:{f['column']}": [Path(p).name for p in f["files"]] for f in result.failures}


def test_real_data_passes_and_writes_data_docs(good_set, tmp_path):
    train, test = good_set
    result = validate_samples(train, test, ValidationConfig(), tmp_path / "gx")
    assert result.success, result.summary()
    assert result.summary() == "18 images passed validation"
    assert Path(result.docs).is_file() and Path(result.docs).name == "index.html"


def test_each_breakage_fails_its_expectation_naming_the_file(good_set, tmp_path):
    train, test = good_set
    broken = tmp_path / "broken"
    broken.mkdir()
    cell = np.asarray(Image.open(train[0].path).convert("L"))
    Image.fromarray(np.zeros_like(cell)).save(broken / "black_frame.png")
    Image.fromarray(cell[:16, :16]).save(broken / "tiny_crop.png")
    (broken / "empty.png").write_bytes(b"")
    shutil.copy(train[1].path, broken / "duplicate_of_1.png")
    extra = [Sample(str(broken / n), 0) for n in ("black_frame.png", "tiny_crop.png", "empty.png",
                                                    "duplicate_of_1.png")]
    leaked = [Sample(train[2].path, 0)]  # a training image also in the test set
    result = validate_samples(train + extra, test + leaked, ValidationConfig(), tmp_path / "gx")
    assert not result.success
    failures = _failures(result)
    assert "black_frame.png" in failures["expect_column_values_to_be_between:brightness"]
    assert failures["expect_column_values_to_be_between:width"] == ["tiny_crop.png"]  # unreadable rows excluded
    assert "empty.png" in failures["expect_column_values_to_be_in_set:readable"]
    assert {"duplicate_of_1.png", "train_1.png"} & set(failures["expect_column_values_to_be_in_set:duplicate"])
    assert "train_2.png" in failures["expect_column_values_to_be_in_set:in_both_splits"]
    assert "black_frame.png" in result.summary() and "empty.png" in result.summary()
    clean = {name for names in failures.values() for name in names} & {f"train_{i}.png" for i in range(3, 12)}
    assert not clean  # good images are not blamed
