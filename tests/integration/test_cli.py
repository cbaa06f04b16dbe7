"""The ``tracebank`` console script, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO


def tracebank(*args: str, check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tracebank"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"tracebank {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bank"
    proc = tracebank("fit", "--data", "elpv:mono", "--out", str(out), "--limit", "40", "--ratio", "0.05", "--json")
    return out, json.loads(proc.stdout)


def test_fit_writes_a_bank_with_threshold(bank):
    out, result = bank
    assert (out / "manifest.json").is_file()
    assert result["n_train"] == 40 and result["bank_size"] > 0
    assert result["threshold"]["method"] == "f1_optimal"


def test_cpu_fit_runs_onnx_and_the_bank_scores_the_same_eagerly(bank, elpv_mono):
    from pipeline.data.datasets import load_images
    from pipeline.patchcore.bank import load_bank

    out, _ = bank
    fast, manifest = load_bank(out)
    assert manifest["params"]["features"]["runtime"] == "onnx" and fast.extractor.onnx is not None
    eager, _ = load_bank(out, runtime="torch")
    assert eager.extractor.onnx is None
    images = [img for _, img, _ in load_images(elpv_mono.test[:8])]
    np.testing.assert_allclose(fast.predict(images).scores, eager.predict(images).scores, rtol=1e-3)


def test_evaluate_json_keys(bank):
    out, _ = bank
    result = json.loads(tracebank("evaluate", str(out), "--data", "elpv:mono", "--limit", "30", "--json").stdout)
    for key in ("image_auroc", "pixel_auroc", "pro", "n_good", "n_defect"):
        assert key in result
    assert result["n_good"] == 15 and result["n_defect"] == 15
    assert result["image_auroc"] > 0.6
    assert result["pixel_auroc"] is None  # ELPV has no masks


def test_predict_scores_and_heatmaps(bank, elpv_mono, tmp_path):
    out, _ = bank
    good = next(s.path for s in elpv_mono.test if s.label == 0)
    bad = next(s.path for s in elpv_mono.test if s.label == 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n")
    proc = tracebank("predict", str(out), good, bad, str(broken), "--out", str(tmp_path / "maps"), "--json",
                     check=False)
    assert proc.returncode == 1  # one input could not be read; the others are scored
    results = json.loads(proc.stdout)["results"]
    assert results[0]["decision"] in ("good", "anomalous") and Path(results[0]["heatmap"]).is_file()
    assert "broken.png" in results[2]["error"]


def test_predict_takes_a_folder_in_batches_and_writes_heatmaps_only_with_out(bank, elpv_mono, tmp_path):
    from pipeline.data.images import read_image
    from pipeline.patchcore.bank import load_bank

    out, _ = bank
    folder = tmp_path / "parts"
    folder.mkdir()
    samples = elpv_mono.test[:5]
    for i, sample in enumerate(samples):
        (folder / f"part{i}{Path(sample.path).suffix}").write_bytes(Path(sample.path).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    proc = tracebank("predict", str(out), str(folder), "--batch-size", "2", "--json", cwd=tmp_path)
    results = json.loads(proc.stdout)["results"]
    assert [Path(r["path"]).stem for r in results] == [f"part{i}" for i in range(5)]
    assert not any("heatmap" in r for r in results) and list(tmp_path.rglob("*_heatmap.png")) == []
    model, _ = load_bank(out)  # one image at a time through the library: same scores
    for sample, result in zip(samples, results, strict=True):
        assert result["score"] == pytest.approx(float(model.predict([read_image(sample.path)]).scores[0]), rel=1e-4)


def test_predict_descends_into_subfolders_and_mirrors_them_in_out(bank, elpv_mono, tmp_path):
    """`tracebank predict BANK data/test`: every class folder is scored, and heatmaps of files
    with the same name in different folders do not overwrite each other."""
    out, _ = bank
    good = next(s.path for s in elpv_mono.test if s.label == 0)
    bad = next(s.path for s in elpv_mono.test if s.label == 1)
    test = tmp_path / "test"
    for folder, source in (("good", good), ("crack", bad)):
        (test / folder).mkdir(parents=True)
        (test / folder / "cell.png").write_bytes(Path(source).read_bytes())
    maps = tmp_path / "maps"
    proc = tracebank("predict", str(out), str(test), "--out", str(maps), "--json")
    results = json.loads(proc.stdout)["results"]
    assert [r["path"] for r in results] == [str(test / "crack" / "cell.png"), str(test / "good" / "cell.png")]
    assert [r["heatmap"] for r in results] == [str(maps / "crack" / "cell_heatmap.png"),
                                               str(maps / "good" / "cell_heatmap.png")]
    assert results[0]["score"] != results[1]["score"]
    assert sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*") if p.is_file()) == [
        "crack/cell_heatmap.png", "good/cell_heatmap.png"]


def test_corrupt_bank_is_a_one_line_error(bank, tmp_path):
    import shutil

    out, _ = bank
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    (copy / "memory_bank.npy").write_bytes(b"garbage")
    proc = tracebank("evaluate", str(copy), "--data", "elpv:mono", check=False)
    assert proc.returncode == 2
    assert "memory_bank.npy" in proc.stderr and "Traceback" not in proc.stderr


def test_the_same_data_and_params_give_the_same_bank_id_from_any_folder(elpv_mono, tmp_path):
    """Two checkouts with their data and weights in different places (issue: the manifest
    hashed the absolute weights path, so DVC and Prefect runs gave different ids)."""
    import shutil

    from pipeline.patchcore.backbone import packaged_weights_path

    ids = []
    for name in ("checkout-a", "elsewhere/checkout-b"):
        root = tmp_path / name / "data" / "train" / "good"
        root.mkdir(parents=True)
        for sample in elpv_mono.train[:12]:
            shutil.copy(sample.path, root)
        weights = tmp_path / name / "weights.pth"
        shutil.copy(packaged_weights_path("tf_efficientnet_lite0"), weights)
        proc = tracebank("fit", "--data", "mvtec:data", "--out", "bank", "--ratio", "0.05", "--weights", str(weights),
                         "--json", cwd=tmp_path / name)
        ids.append(json.loads(proc.stdout)["bank_id"])
    assert ids[0] == ids[1]


def test_a_cli_fitted_bank_is_registered_promoted_and_predicts_as_production(bank, elpv_mono, tmp_path):
    import shutil

    out, fitted = bank
    registry = tmp_path / "banks"
    params = tmp_path / "params.yaml"
    params.write_text("gates:\n  image_auroc_min: 0.5\n  pro_min: 0.6\n  pixel_auroc_min: 0.8\n")
    result = json.loads(tracebank("register", str(out), "--registry", str(registry), "--params", str(params),
                                  "--json").stdout)
    assert result["status"] == "candidate" and result["bank_id"] == fitted["bank_id"]
    assert (out / "manifest.json").is_file()  # copied into the registry, not moved
    statuses = {c["name"]: c["status"] for c in result["gates"]["checks"]}
    assert statuses == {"image_auroc >= 0.5": "passed", "pro >= 0.6": "not evaluated",  # ELPV has no masks
                        "pixel_auroc >= 0.8": "not evaluated",  # and there is no production bank yet
                        "miss_rate not above production's + 0.02": "not evaluated",
                        "false_reject_rate not above production's + 0.02": "not evaluated"}
    tracebank("promote", fitted["bank_id"][:6], "--registry", str(registry))
    good = next(s.path for s in elpv_mono.test if s.label == 0)
    answer = json.loads(tracebank("predict", "production", good, "--registry", str(registry), "--json").stdout)
    assert answer["bank_id"] == fitted["bank_id"] and answer["results"][0]["decision"] in ("good", "anomalous")

    # a bank fitted without evaluation has no threshold: refused with the command that sets one
    root = tmp_path / "line" / "data"
    for split, samples in (("train/good", elpv_mono.train[:12]), ("test/good", [s for s in elpv_mono.test
                           if s.label == 0][:4]), ("test/crack", [s for s in elpv_mono.test if s.label == 1][:4])):
        (root / split).mkdir(parents=True)
        for sample in samples:
            shutil.copy(sample.path, root / split)
    tracebank("fit", "--data", f"mvtec:{root}", "--out", str(tmp_path / "raw"), "--no-evaluate", "--json")
    refused = tracebank("register", str(tmp_path / "raw"), "--registry", str(registry), "--json", check=False)
    assert refused.returncode == 2 and "--data SPEC" in json.loads(refused.stdout)["error"]
    calibrated = json.loads(tracebank("register", str(tmp_path / "raw"), "--registry", str(registry),
                                      "--params", str(params), "--data", f"mvtec:{root}", "--json").stdout)
    assert calibrated["threshold"]["method"] == "f1_optimal" and calibrated["threshold"]["value"] > 0
    lineage = json.loads(tracebank("lineage", calibrated["bank_id"], "--registry", str(registry), "--json").stdout)
    assert lineage["gates"]["production_metrics"]["image_auroc"] is not None  # compared on the same images
    # outside DVC, the data hash is of the training files' names and bytes, and says so
    import hashlib

    rows = sorted([p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in (root / "train" / "good").iterdir())
    assert lineage["data_hash_kind"] == "files-sha256"
    assert lineage["data_hash"] == hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def test_fit_extend_adds_only_the_new_images_and_keeps_the_parent_bank(elpv_mono, tmp_path):
    import shutil

    from pipeline.patchcore.bank import load_bank
    from pipeline.patchcore.coreset import coreset_size

    train = tmp_path / "data" / "train" / "good"
    train.mkdir(parents=True)
    for sample in elpv_mono.train[:12]:
        shutil.copy(sample.path, train)
    tracebank("fit", "--data", f"mvtec:{tmp_path / 'data'}", "--out", str(tmp_path / "parent"), "--ratio", "0.05",
              "--json")
    for sample in elpv_mono.train[12:16]:
        shutil.copy(sample.path, train)
    result = json.loads(tracebank("fit", "--data", f"mvtec:{tmp_path / 'data'}", "--extend", str(tmp_path / "parent"),
                                  "--out", str(tmp_path / "child"), "--json").stdout)
    assert result["fit"] == "incremental" and result["n_extracted"] == 4 and result["n_train"] == 16
    parent, parent_manifest = load_bank(tmp_path / "parent")
    child, manifest = load_bank(tmp_path / "child")
    per_image = child.extractor.grid ** 2
    assert manifest["bank_size"] == coreset_size(16 * per_image, 0.05)
    assert manifest["training"]["parent_bank"] == parent_manifest["bank_id"]
    assert len(manifest["training"]["added_files"]) == 4 and manifest["training"]["increments"] == 1
    kept = {row.tobytes() for row in child.memory_bank_}
    assert all(row.tobytes() in kept for row in parent.memory_bank_)  # the parent's centres stay
    again = tracebank("fit", "--data", f"mvtec:{tmp_path / 'data'}", "--extend", str(tmp_path / "child"),
                      "--out", str(tmp_path / "grandchild"), "--json", check=False)
    assert again.returncode == 2 and "has not seen" in json.loads(again.stdout)["error"]
