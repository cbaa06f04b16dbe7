import json

import numpy as np
import pytest

from pipeline.patchcore.bank import BankError, load_bank, read_manifest, save_bank, update_manifest


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_mtd_model):
    path = tmp_path_factory.mktemp("banks") / "bank"
    manifest = save_bank(path, small_mtd_model, training={"spec": "mtd", "files": []},
                         threshold={"value": 1.5, "method": "f1_optimal"})
    return path, manifest


def test_round_trip_gives_same_scores(saved, small_mtd_model, mtd_dataset):
    from pipeline.data.datasets import load_images

    path, manifest = saved
    model, loaded = load_bank(path)
    assert loaded["bank_id"] == manifest["bank_id"]
    images = [img for _, img, _ in load_images(mtd_dataset.test[:2])]
    # the loaded bank scores with its own ONNX graph, the fitted model eagerly (tolerance: test_bank_graph.py)
    np.testing.assert_allclose(model.predict(images).scores, small_mtd_model.predict(images).scores, rtol=1e-3)
    for key in ("backbone", "params", "training", "files", "versions", "bank_size"):
        assert key in loaded
    assert loaded["backbone"]["weights_sha256"] and len(loaded["files"]) == 4 and "embedding.onnx" in loaded["files"]


def test_no_pickle_in_artifacts(saved):
    path, _ = saved
    np.load(path / "memory_bank.npy", allow_pickle=False)
    assert json.loads((path / "manifest.json").read_text())["format"] == "tracebank-bank/3"


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved[0], target)
    return target


def test_one_changed_byte_is_refused_naming_the_file(saved, tmp_path):
    bank = _copy(saved, tmp_path)
    data = bytearray((bank / "memory_bank.npy").read_bytes())
    data[-5] ^= 0xFF
    (bank / "memory_bank.npy").write_bytes(bytes(data))
    with pytest.raises(BankError, match=r"memory_bank\.npy has sha256 .* but the manifest records"):
        load_bank(bank)


def test_truncated_index_is_refused(saved, tmp_path):
    bank = _copy(saved, tmp_path)
    data = (bank / "index.faiss").read_bytes()
    (bank / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match=r"index\.faiss"):
        load_bank(bank)


def test_edited_manifest_is_refused(saved, tmp_path):
    bank = _copy(saved, tmp_path)
    manifest = json.loads((bank / "manifest.json").read_text())
    manifest["params"]["scoring"]["num_neighbors"] = 1
    (bank / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="manifest was edited"):
        read_manifest(bank)


def test_existing_directory_never_overwritten(saved, small_mtd_model):
    with pytest.raises(BankError, match="already exists"):
        save_bank(saved[0], small_mtd_model, training={})


def test_metrics_can_be_added_but_identity_cannot(saved, tmp_path):
    bank = _copy(saved, tmp_path)
    update_manifest(bank, metrics={"image_auroc": 0.9})
    assert read_manifest(bank)["metrics"] == {"image_auroc": 0.9}
    with pytest.raises(BankError, match="identity"):
        update_manifest(bank, params={})


def test_bank_id_ignores_paths_times_and_device_but_not_content(small_mtd_model, tmp_path):
    """Two checkouts, venvs or data folders must not give the same bank two ids."""
    from pipeline.patchcore.bank import bank_id_of

    here = {"spec": "mvtec:/home/a/line3/data", "timings": {"extract_s": 1.0},
            "files": [{"path": "/home/a/line3/data/train/good/1.png", "sha256": "aa"},
                      {"path": "/home/a/line3/data/train/good/2.png", "sha256": "bb"}], "skipped": []}
    there = {"spec": "mvtec:data", "timings": {"extract_s": 7.5},
             "files": [{"path": "data/train/good/2.png", "sha256": "bb"},
                       {"path": "data/train/good/1.png", "sha256": "aa"}], "skipped": []}
    first = save_bank(tmp_path / "a", small_mtd_model, training=here)
    second = save_bank(tmp_path / "b", small_mtd_model, training=there)
    assert first["bank_id"] == second["bank_id"]
    moved = json.loads(json.dumps(first))
    moved["backbone"]["weights_source"] = "/opt/other-venv/lite0.pth"
    moved["params"]["features"]["device"] = "cuda"
    assert bank_id_of(moved) == first["bank_id"]
    other_image = json.loads(json.dumps(first))
    other_image["training"]["files"][0]["sha256"] = "cc"
    other_weights = json.loads(json.dumps(first))
    other_weights["backbone"]["weights_sha256"] = "0" * 64
    other_ratio = json.loads(json.dumps(first))
    other_ratio["params"]["coreset"]["ratio"] = 0.5
    ids = {bank_id_of(m) for m in (other_image, other_weights, other_ratio)}
    assert len(ids) == 3 and first["bank_id"] not in ids


def test_banks_from_before_the_image_score_setting_score_with_eq7_as_when_fitted(small_mtd_model, mtd_dataset,
                                                                                  tmp_path):
    """A bank written before ``scoring.image_score`` existed keeps scoring with the paper's Eq. 7."""
    from pipeline.data.datasets import load_images
    from pipeline.patchcore.bank import bank_id_of
    from pipeline.patchcore.scoring import reweighted_image_scores

    save_bank(tmp_path / "old", small_mtd_model, training={"spec": "t", "files": []})
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("image_score", "image_sigma", "image_weight"):  # as written before the setting existed
        del manifest["params"]["scoring"][key]
    manifest["format"] = "tracebank-bank/1"
    manifest["bank_id"] = bank_id_of(manifest)
    manifest_path.write_text(json.dumps(manifest))
    model, _ = load_bank(tmp_path / "old")
    assert model.scoring.image_score == "eq7"

    images = [img for _, img, _ in load_images(mtd_dataset.test[:6])]
    feats, _ = model.extractor(images)
    b, h, w, d = feats.shape
    queries = feats.reshape(b, h * w, d).numpy()
    dist, near = model.index_.search(queries.reshape(-1, d), 1)
    eq7 = reweighted_image_scores(queries, np.sqrt(dist[:, 0]).reshape(b, h * w), near[:, 0].reshape(b, h * w),
                                  model.memory_bank_, model.index_, model.scoring.num_neighbors)
    old_scores = model.predict(images, maps=False).scores
    np.testing.assert_allclose(old_scores, eq7, rtol=1e-5)
    assert not np.allclose(old_scores, small_mtd_model.predict(images, maps=False).scores, rtol=1e-3)
