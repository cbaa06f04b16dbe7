"""Prediction speed: the eager backbone alone against end-to-end ``predict``, torch vs ONNX.

    python -m benchmarks.predict                                  # MTD, 96 test images
    python -m benchmarks.predict --data mtd:../shared/datasets/mtd --n 96 --bank DIR
    python -m benchmarks.predict --accuracy                       # + AUROC/PRO, both runtimes

End to end means: decode PNG/JPEG bytes, resize, extract features, kNN search, image score,
anomaly maps (upsample, Gaussian blur, crop/resize to the original size), as ``predict``
runs them: with the ONNX runtime, the batch split between one single-threaded worker per core. Without
``--bank`` a bank is fitted on the dataset's nominal training images with the default
settings. The machine may be shared, so every figure is the median of ``--repeats`` runs
taken in turns across variants; compare figures of one run with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig
from pipeline.data.datasets import Sample, load_images, open_dataset
from pipeline.data.images import decode_image
from pipeline.evaluation.evaluate import evaluate
from pipeline.patchcore.backbone import load_backbone
from pipeline.patchcore.bank import load_bank
from pipeline.patchcore.features import FeatureExtractor
from pipeline.patchcore.model import PatchCore
from pipeline.patchcore.parallel import worker_count
from pipeline.patchcore.runtime import available_cores

DEFAULT_DATA = "mtd:../shared/datasets/mtd"


def _median_time(func: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_models(args: argparse.Namespace, train: Sequence[Sample]) -> tuple[PatchCore, PatchCore, dict[str, Any]]:
    """The same fitted bank behind a torch-runtime and an ONNX-runtime model.

    Note:
        A bank fitted here is fitted with the ONNX runtime (its features equal eager ones
        to ~1e-6 relative and extraction is several times faster); both models share it.
    """
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if args.bank:
        onnx_model, manifest = load_bank(args.bank, runtime="onnx")
        info["bank"] = manifest["bank_id"]
    else:
        onnx_model = PatchCore(FeatureConfig(runtime="onnx"), CoresetConfig(), ScoringConfig())
        images = [img for _, img, _ in load_images(train[: args.train])]
        onnx_model.fit([images[i : i + 16] for i in range(0, len(images), 16)])
        info["bank"] = f"fitted on {len(images)} nominal images"
        info["train_images"] = len(images)
    info["setup_s"] = time.perf_counter() - start
    onnx = onnx_model.extractor.onnx
    info["onnx_cache"] = onnx.model.status if onnx is not None and onnx.model is not None else None
    features = dataclasses.replace(onnx_model.features, runtime="torch")
    extractor = FeatureExtractor(features, backbone=onnx_model.extractor.backbone)
    torch_model = PatchCore(features, onnx_model.coreset, onnx_model.scoring, extractor=extractor)
    torch_model.set_bank(onnx_model.memory_bank_, onnx_model.index_)
    info["bank_size"] = int(len(onnx_model.memory_bank_))
    return torch_model, onnx_model, info


def backbone_ips(config: FeatureConfig, pixels: torch.Tensor, repeats: int, channels_last: bool) -> float:
    """Images/s of a fresh eager backbone's forward alone on prepared, normalised input."""
    model = load_backbone(config.backbone, config.levels, config.weights).model
    x = (pixels.float() - 127.0) / 128.0  # (B, 3, S, S); the normalisation is outside the timing
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up
        return len(x) / _median_time(lambda: model(x), repeats)


def predict_all(model: PatchCore, blobs: Sequence[bytes], batch: int) -> None:
    """End to end: decode every blob and predict scores and maps, ``batch`` at a time."""
    for i in range(0, len(blobs), batch):
        model.predict([decode_image(b) for b in blobs[i : i + batch]])


def stage_times(model: PatchCore, blobs: Sequence[bytes], batch: int) -> dict[str, float]:
    """Seconds per batch spent in each stage of ``predict`` (one pass, medians over batches).

    The stages run in turn on the whole batch, each on all threads: what ``predict`` does
    with one worker. With several, it splits the batch and runs them side by side.
    """
    from pipeline.patchcore.scoring import anomaly_maps, to_original

    parts: dict[str, list[float]] = {k: [] for k in ("decode", "resize", "embed", "knn_score", "maps")}
    for i in range(0, len(blobs) - batch + 1, batch):
        t0 = time.perf_counter()
        images = [decode_image(b) for b in blobs[i : i + batch]]
        t1 = time.perf_counter()
        pixels, placements = model.extractor.prepare_batch(images)
        t2 = time.perf_counter()
        feats = model.extractor.embed(pixels)
        t3 = time.perf_counter()
        _, grid = model.score_features(feats)
        t4 = time.perf_counter()
        full = anomaly_maps(grid, model.features.image_size, model.scoring.sigma)
        [to_original(m, p) for m, p in zip(full, placements, strict=True)]
        t5 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            parts[key].append(value)
    return {k: statistics.median(v) for k, v in parts.items() if v}


def speed(
    args: argparse.Namespace, torch_model: PatchCore, onnx_model: PatchCore, blobs: list[bytes]
) -> dict[str, Any]:
    """All speed figures, each the median of ``args.repeats`` interleaved runs."""
    batch = args.batch
    pixels, _ = torch_model.extractor.prepare_batch([decode_image(b) for b in blobs[:batch]])
    for model in (torch_model, onnx_model):  # warm-up: first calls allocate and plan
        predict_all(model, blobs[:batch], batch)
        predict_all(model, blobs[:1], 1)
    runs: dict[str, list[float]] = {k: [] for k in ("backbone", "backbone_cl", "torch", "onnx", "torch_b1", "onnx_b1")}
    single = blobs[: args.n_latency]
    for _ in range(args.repeats):
        runs["backbone"].append(backbone_ips(torch_model.features, pixels, 3, channels_last=False))
        runs["backbone_cl"].append(backbone_ips(torch_model.features, pixels, 3, channels_last=True))
        for name, model in (("torch", torch_model), ("onnx", onnx_model)):
            runs[name].append(len(blobs) / _median_time(functools.partial(predict_all, model, blobs, batch), 1))
            latencies = [_median_time(functools.partial(predict_all, model, [b], 1), 1) for b in single]
            runs[f"{name}_b1"].append(1000 * statistics.median(latencies))
    out: dict[str, Any] = {
        "eager_backbone_ips": statistics.median(runs["backbone"]),
        "eager_backbone_channels_last_ips": statistics.median(runs["backbone_cl"]),
        "torch_predict_ips": statistics.median(runs["torch"]),
        "onnx_predict_ips": statistics.median(runs["onnx"]),
        "torch_b1_ms": statistics.median(runs["torch_b1"]),
        "onnx_b1_ms": statistics.median(runs["onnx_b1"]),
    }
    out["onnx_vs_eager_backbone"] = out["onnx_predict_ips"] / out["eager_backbone_ips"]
    out["onnx_vs_channels_last_backbone"] = out["onnx_predict_ips"] / out["eager_backbone_channels_last_ips"]
    out["stages_torch_s"] = stage_times(torch_model, blobs, batch)
    out["stages_onnx_s"] = stage_times(onnx_model, blobs, batch)
    out["knn_pruning"] = onnx_model.index_.pruning()
    return out


def accuracy(torch_model: PatchCore, onnx_model: PatchCore, test: Sequence[Sample]) -> dict[str, Any]:
    """Image AUROC, pixel AUROC and PRO of both runtimes on ``test`` with the same bank."""
    out: dict[str, Any] = {}
    scores = {}
    for name, model in (("torch", torch_model), ("onnx", onnx_model)):
        start = time.perf_counter()
        result = evaluate(model, test, batch_size=16, keep_maps=False)
        out[name] = {k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "pro")}
        out[name]["evaluate_s"] = time.perf_counter() - start
        scores[name] = result.scores
    rel = np.abs(scores["onnx"] - scores["torch"]) / np.abs(scores["torch"]).max()
    out["max_rel_score_diff"] = float(rel.max())
    out["same_ranking"] = bool((np.argsort(scores["onnx"]) == np.argsort(scores["torch"])).all())
    return out


def _print_report(result: dict[str, Any]) -> None:
    s = result["speed"]
    print(f"machine: {result['machine']}; {result['threads']} threads; bank: {result['bank']} "
          f"({result['bank_size']} vectors); {result['n']} images, batch {result['batch']}")
    if "train_images" in result:
        print(f"fit (decode, ONNX features, coreset, index) of {result['train_images']} images: "
              f"{result['setup_s']:.1f} s; ONNX export cache: {result['onnx_cache']}")
    print(f"eager backbone only, NCHW (as before)    {s['eager_backbone_ips']:8.1f} images/s")
    print(f"eager backbone only, channels-last       {s['eager_backbone_channels_last_ips']:8.1f} images/s")
    print(f"end-to-end predict, runtime torch        {s['torch_predict_ips']:8.1f} images/s")
    print(f"end-to-end predict, runtime onnx         {s['onnx_predict_ips']:8.1f} images/s  "
          f"(batch split between {result['workers']} single-threaded workers)")
    print(f"  onnx predict / eager backbone          {s['onnx_vs_eager_backbone']:8.2f} x  (goal >= 1.5)")
    print(f"  onnx predict / channels-last backbone  {s['onnx_vs_channels_last_backbone']:8.2f} x")
    print(f"batch-1 latency, runtime torch (median)  {s['torch_b1_ms']:8.1f} ms")
    print(f"batch-1 latency, runtime onnx (median)   {s['onnx_b1_ms']:8.1f} ms")
    pruning = s.get("knn_pruning")
    if pruning:
        print(f"exact kNN: bound on {pruning['axes']:.0f} principal axes; full distances computed "
              f"for {100 * pruning['kept']:.1f}% of the bank per block of queries")
    for name in ("torch", "onnx"):
        parts = ", ".join(f"{k} {1000 * v:.0f}" for k, v in s[f"stages_{name}_s"].items())
        print(f"ms per batch of {result['batch']}, {name:5s} (stages in turn, batch unsplit): {parts}")
    if "accuracy" in result:
        acc = result["accuracy"]
        for name in ("torch", "onnx"):
            a = acc[name]
            print(f"{name:5s}: image AUROC {a['image_auroc']:.4f}  pixel AUROC {a['pixel_auroc']:.4f}  "
                  f"PRO {a['pro']:.4f}  ({a['evaluate_s']:.0f} s)")
        print(f"max |score diff| / max score {acc['max_rel_score_diff']:.2e}; "
              f"same ranking: {acc['same_ranking']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset spec, e.g. mtd:PATH")
    parser.add_argument("--n", type=int, default=96, help="test images timed end to end")
    parser.add_argument("--n-latency", type=int, default=32, help="images timed one at a time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank", help="bank directory to use instead of fitting one")
    parser.add_argument("--train", type=int, help="fit on the first N nominal images (default all)")
    parser.add_argument("--accuracy", action="store_true", help="also evaluate the whole test set with both runtimes")
    parser.add_argument("--json", action="store_true", help="also print all figures as one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(available_cores())
    dataset = open_dataset(args.data)
    torch_model, onnx_model, info = build_models(args, dataset.train)
    step = max(1, len(dataset.test) // args.n)
    blobs = [Path(s.path).read_bytes() for s in dataset.test[::step][: args.n]]
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "n": len(blobs), "batch": args.batch, **info,
        "workers": worker_count(args.batch, torch.get_num_threads()),
    }
    result["speed"] = speed(args, torch_model, onnx_model, blobs)
    if args.accuracy:
        result["accuracy"] = accuracy(torch_model, onnx_model, dataset.test)
    _print_report(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
