"""New data enters data/ without losing a file: `tracebank import` and `tracebank add`, run
as a user runs them in a DVC project, on real ELPV cells."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_pipeline import BIN, run


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tracebank(project: Path, *args: str, check: bool = True):
    return run(project, str(BIN / "tracebank"), *args, "--json", check=check)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One DVC project for the module: the add test runs first, the import test then
    replaces its data (tests run in file order)."""
    root = tmp_path_factory.mktemp("intake") / "line3"
    root.mkdir()
    run(root, "git", "init", "-q")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    tracebank(root, "import", "elpv:mono", "--limit-train", "20", "--limit-test", "10")
    return root


def test_add_appends_good_images_skips_duplicates_and_quarantines_bad_ones(project, tmp_path, elpv_mono):
    data = project / "data"
    before = tree_hashes(data)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fresh = elpv_mono.train[200:205]
    for sample in fresh:
        shutil.copy(sample.path, inbox / Path(sample.path).name)
    test_image = next(p for p in sorted((data / "test").rglob("*.png")))
    shutil.copy(test_image, inbox / "leak_from_test.png")  # would leak the test split into the bank
    train_image = next(p for p in sorted((data / "train" / "good").iterdir()))
    shutil.copy(train_image, inbox / "again.png")
    (inbox / "corrupt.png").write_bytes(Path(fresh[0].path).read_bytes()[:300])
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(inbox / "lens_cap_on.png")  # all black: camera fault

    result = json.loads(tracebank(project, "add", str(inbox)).stdout)

    assert result["n_added"] == 5 and result["n_duplicates"] == 2 and result["n_quarantined"] == 2
    assert {Path(d["source"]).name for d in result["duplicates"]} == {"leak_from_test.png", "again.png"}
    reasons = {Path(q["source"]).name: q["reason"] for q in result["quarantined"]}
    assert set(reasons) == {"corrupt.png", "lens_cap_on.png"}
    assert "brightness" in reasons["lens_cap_on.png"] and "readable" in reasons["corrupt.png"]
    for item in result["quarantined"]:
        kept = (project / item["path"]).resolve()
        assert kept.is_file() and not kept.is_relative_to(data.resolve())
    after = tree_hashes(data)
    assert {k: v for k, v in after.items() if not k.startswith("train/")} == {
        k: v for k, v in before.items() if not k.startswith("train/")}  # test/ and masks byte-identical
    added = set(after) - set(before)
    assert len(added) == 5 and all(name.startswith("train/good/") for name in added)
    assert {after[name] for name in added} == {hashlib.sha256(Path(s.path).read_bytes()).hexdigest() for s in fresh}
    assert result["data_hash"] == run(project, str(BIN / "python"), "-c",
                                      "import yaml;print(yaml.safe_load(open('data.dvc'))['outs'][0]['md5'])"
                                      ).stdout.strip()

    again = json.loads(tracebank(project, "add", str(inbox)).stdout)  # the same inbox twice adds nothing
    assert again["n_added"] == 0 and again["n_duplicates"] == 7 and again["data_hash"] is None


def test_import_into_a_dataset_refuses_and_a_broken_replacement_changes_nothing(project, tmp_path, elpv_mono):
    before = tree_hashes(project / "data")
    assert any(name.startswith("test/") for name in before)
    new = tmp_path / "new"
    new.mkdir()
    for sample in elpv_mono.train[100:105]:
        shutil.copy(sample.path, new)

    refused = tracebank(project, "import", f"folder:{new}", check=False)  # the README's old example
    assert refused.returncode == 2 and "--replace" in json.loads(refused.stdout)["error"]
    assert tree_hashes(project / "data") == before

    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"cell{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # truncated PNGs
    failed = tracebank(project, "import", f"folder:{broken}", "--replace", check=False)
    assert failed.returncode == 2 and "no readable training image" in json.loads(failed.stdout)["error"]
    assert tree_hashes(project / "data") == before
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".data")) == []  # no staging left

    replaced = json.loads(tracebank(project, "import", f"folder:{new}", "--replace").stdout)
    assert replaced["n_train"] == 5 and replaced["n_test"] == 0
    assert sorted(tree_hashes(project / "data").values()) == sorted(
        [hashlib.sha256(p.read_bytes()).hexdigest() for p in new.iterdir()]
        + [hashlib.sha256((project / "data" / "SOURCE.txt").read_bytes()).hexdigest()])
