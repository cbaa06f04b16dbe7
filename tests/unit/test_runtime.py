"""The ONNX Runtime feature path against eager PyTorch on real MTD tiles, and its export cache
(pipeline/patchcore/export.py, runtime.py)."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, CoresetConfig, FeatureConfig
from pipeline.data.datasets import load_images
from pipeline.hashing import sha256_file
from pipeline.patchcore.export import cache_key, export_settings
from pipeline.patchcore.features import FeatureExtractor, open_export
from pipeline.patchcore.model import PatchCore
from pipeline.patchcore.runtime import OnnxEmbedding

#: max |onnx - torch| over all features, relative to max |torch| (observed ~1.5e-6: float
#: rounding of fused convolutions; features reach ~20 on MTD tiles).
FEATURE_RTOL = 2e-5
#: image scores and map values, relative (observed ~1e-6).
SCORE_RTOL = 1e-3


@pytest.fixture(scope="module")
def onnx_extractor(tmp_path_factory, extractor):
    """The default extractor run through ONNX Runtime, its export cached in a temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACEBANK_CACHE", str(tmp_path_factory.mktemp("tracebank-cache")))
        yield FeatureExtractor(dataclasses.replace(extractor.config, runtime="onnx"), backbone=extractor.backbone)


@pytest.fixture(scope="module")
def mtd_tiles(mtd_dataset):
    """8 real test tiles: 4 good, 4 defective."""
    return [img for _, img, _ in load_images(mtd_dataset.subset(None, 8, seed=0).test)]


def test_onnx_features_match_torch_on_real_tiles(extractor, onnx_extractor, mtd_tiles):
    assert onnx_extractor.onnx is not None and onnx_extractor.onnx.model.status == "exported"
    pixels, _ = extractor.prepare_batch(mtd_tiles)
    ref = extractor.embed(pixels)
    got = onnx_extractor.embed(pixels)
    assert got.shape == ref.shape == (8, 28, 28, 152) and got.dtype == torch.float32
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= FEATURE_RTOL * scale
    single = onnx_extractor.embed(pixels[:1])  # the batch axis is dynamic
    assert float((single[0] - ref[0]).abs().max()) <= FEATURE_RTOL * scale


def test_onnx_scores_and_maps_match_and_rank_identically(mtd_dataset, extractor, onnx_extractor):
    train = [img for _, img, _ in load_images(mtd_dataset.train[:20])]
    model = PatchCore(extractor.config, CoresetConfig(ratio=0.05), extractor=extractor).fit([train[:10], train[10:]])
    onnx_model = PatchCore(onnx_extractor.config, model.coreset, model.scoring, extractor=onnx_extractor)
    onnx_model.set_bank(model.memory_bank_, model.index_)
    test = [img for _, img, _ in load_images(mtd_dataset.subset(None, 16, seed=2).test)]
    ref, got = model.predict(test), onnx_model.predict(test)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=SCORE_RTOL)
    np.testing.assert_array_equal(np.argsort(got.scores), np.argsort(ref.scores))
    for a, b in zip(got.maps, ref.maps, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= SCORE_RTOL * np.abs(b).max()


def test_tampered_cache_file_is_detected_and_rebuilt(tmp_path, extractor, caplog):
    config = dataclasses.replace(extractor.config, image_size=64, runtime="onnx")
    sha = extractor.backbone.weights_sha256

    def open_cached() -> OnnxEmbedding:
        return open_export(extractor.embedding, config, sha, directory=tmp_path)

    first = open_cached()
    assert first.model is not None and first.model.status == "exported"
    path, record_path = first.model.path, first.model.path.with_suffix(".json")
    assert json.loads(record_path.read_text())["sha256"] == sha256_file(path)
    assert open_cached().model.status == "hit"

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.patchcore.export"):
        rebuilt = open_cached()
    assert rebuilt.model.status == "rebuilt" and "exporting it again" in caplog.text
    assert json.loads(record_path.read_text())["sha256"] == sha256_file(path) == rebuilt.model.sha256

    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        ref = extractor.embedding(pixels)
    assert float(np.abs(rebuilt(pixels) - ref.numpy()).max()) <= FEATURE_RTOL * float(ref.abs().max())

    path.write_bytes(path.read_bytes()[:4096])  # truncated
    assert open_cached().model.status == "rebuilt"
    record_path.unlink()  # record lost: the file cannot be trusted either
    assert open_cached().model.status == "rebuilt"
    assert open_cached().model.status == "hit"


def test_cache_key_follows_everything_that_changes_the_graph():
    base = export_settings(FeatureConfig(), "a" * 64)
    keys = {
        cache_key(base),
        cache_key(export_settings(FeatureConfig(), "b" * 64)),
        cache_key(export_settings(FeatureConfig(image_size=256), "a" * 64)),
        cache_key(export_settings(FeatureConfig(proj_dim=64), "a" * 64)),
        cache_key(export_settings(FeatureConfig(levels=(1, 2)), "a" * 64)),
    }
    assert len(keys) == 5
    assert cache_key(export_settings(FeatureConfig(resize="letterbox"), "a" * 64)) == cache_key(base)


def test_wrong_pixels_are_refused(onnx_extractor):
    with pytest.raises(ValueError, match=r"expects \(B, 3, 224, 224\) uint8"):
        onnx_extractor.embed(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="uint8 pixels"):
        onnx_extractor.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"runtime": "tensorrt"}, "features.runtime must be 'torch' or 'onnx'"),
        ({"runtime": "onnx", "device": "cuda"}, "runs on the CPU only"),
    ],
)
def test_runtime_setting_is_validated(values, message):
    with pytest.raises(ConfigError, match=message):
        FeatureConfig(**values)


def test_cache_key_follows_the_source_of_the_graph(tmp_path, monkeypatch):
    """Editing the embedding's code (a different pooling, say) must never reuse an old export."""
    import hashlib

    from pipeline.patchcore import export as runtime

    copies = []
    for source in runtime.GRAPH_SOURCES:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    expected = hashlib.sha256()
    for source in runtime.GRAPH_SOURCES:
        data = source.read_bytes()
        expected.update(f"{source.name}:{len(data)}:".encode() + data)
    base = export_settings(FeatureConfig(), "a" * 64)
    assert base["graph_source_sha256"] == expected.hexdigest()

    monkeypatch.setattr(runtime, "GRAPH_SOURCES", tuple(copies))
    monkeypatch.setattr(runtime.graph_source_sha256, "__defaults__", (tuple(copies),))
    assert cache_key(export_settings(FeatureConfig(), "a" * 64)) == cache_key(base)
    features = copies[0]
    text = features.read_text()
    assert "kernel_size=k" in text
    features.write_text(text.replace("kernel_size=k", "kernel_size=k + 2", 1))
    assert cache_key(export_settings(FeatureConfig(), "a" * 64)) != cache_key(base)


@pytest.fixture(scope="module")
def onnx_model(small_mtd_model, onnx_extractor):
    """The 150-tile MTD bank behind the ONNX runtime."""
    model = PatchCore(onnx_extractor.config, small_mtd_model.coreset, small_mtd_model.scoring, extractor=onnx_extractor)
    model.set_bank(small_mtd_model.memory_bank_, small_mtd_model.index_)
    return model


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_a_batch_split_between_cores_scores_as_images_one_at_a_time(onnx_model, mtd_tiles):
    """predict splits a batch between worker threads (5 tiles: parts of 3 and 2 on 2 cores);
    every score and map equals the one-image path, which runs unsplit on all threads."""
    from pipeline.patchcore.parallel import worker_count

    tiles = mtd_tiles[:5]
    assert worker_count(len(tiles), torch.get_num_threads()) >= 2, "this test needs 2 cores to split a batch"
    before = blas_threads()
    batch = onnx_model.predict(tiles)
    assert blas_threads() == before  # numpy's BLAS gets its threads back
    singles = [onnx_model.predict([tile]) for tile in tiles]
    np.testing.assert_allclose(batch.scores, [s.scores[0] for s in singles], rtol=1e-5)
    for got, single, tile in zip(batch.maps, singles, tiles, strict=True):
        assert got.shape == tile.shape[:2]
        np.testing.assert_allclose(got, single.maps[0], rtol=1e-4, atol=1e-4 * float(single.maps[0].max()))


def test_concurrent_batches_score_alike_and_a_failing_one_raises(onnx_model, mtd_tiles):
    """Two threads predicting at once (a service's requests) get their own results; a bad
    image fails its own call with the library's error, and BLAS threads come back after all."""
    import threading

    before = blas_threads()
    alone = [onnx_model.predict(mtd_tiles[:4]).scores, onnx_model.predict(mtd_tiles[4:]).scores]
    got: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        for _ in range(3):
            got[i] = onnx_model.predict(mtd_tiles[4 * i : 4 * i + 4]).scores

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    np.testing.assert_allclose(got[0], alone[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], alone[1], rtol=1e-5)
    with pytest.raises(ValueError, match="uint8 pixels"):  # load_images gives uint8; a float image is refused
        onnx_model.predict([mtd_tiles[0], mtd_tiles[1].astype(np.float64)])
    assert blas_threads() == before
