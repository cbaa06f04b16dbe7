"""Accuracy and speed benchmark: fit and evaluate MTD and ELPV mono/poly with the defaults.

    python -m benchmarks.accuracy                       # all datasets, default settings
    python -m benchmarks.accuracy --preset accurate     # the same with `tracebank fit --preset accurate`
    python -m benchmarks.accuracy --data elpv:mono --size 320 --resize letterbox
    python -m benchmarks.accuracy --coreset --cache /tmp/mtd_feats   # naive vs fast coreset on MTD

Each dataset runs in its own process so that its peak RSS is its own. Prints a table and,
with ``--json``, one JSON object per dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATASETS = ("mtd:../shared/datasets/mtd", "elpv:mono", "elpv:poly")
COLUMNS = (
    ("dataset", "{}"),
    ("image_auroc", "{:.3f}"),
    ("pixel_auroc", "{:.3f}"),
    ("pro", "{:.3f}"),
    ("bank_size", "{}"),
    ("extract_s", "{:.1f}"),
    ("coreset_s", "{:.1f}"),
    ("predict_ips", "{:.1f}"),
    ("peak_rss_gb", "{:.2f}"),
)


def run_one(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fit, evaluate and time one dataset in this process."""
    import tempfile

    import torch

    from pipeline.config import CoresetConfig
    from pipeline.data.datasets import load_images, open_dataset
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.lifecycle.fitting import fit_bank
    from pipeline.patchcore.bank import load_bank

    torch.set_num_threads(args.threads)
    features = _feature_config(args)
    coreset = CoresetConfig(ratio=args.ratio)
    scoring = _scoring_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit_bank(spec, Path(tmp) / "bank", features, coreset, scoring, evaluate_after=False)
        model, _ = load_bank(Path(tmp) / "bank")
    dataset = open_dataset(spec)
    start = time.perf_counter()
    result = evaluate(model, dataset.test, batch_size=16, keep_maps=False)
    eval_s = time.perf_counter() - start
    images = [img for _, img, _ in load_images(dataset.test[:64])]
    model.predict(images[:16])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), 16):
        model.predict(images[i : i + 16])
    predict_ips = len(images) / (time.perf_counter() - start)
    metrics = result.metrics
    return {
        "dataset": spec.split("/")[-1] if spec.startswith("mtd") else spec,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "pro": metrics["pro"],
        "n_train": fitted["n_train"],
        "n_good": metrics["n_good"],
        "n_defect": metrics["n_defect"],
        "bank_size": fitted["bank_size"],
        "extract_s": fitted["timings"]["extract_s"],
        "coreset_s": fitted["timings"]["coreset_s"],
        "evaluate_s": eval_s,
        "predict_ips": predict_ips,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "settings": {"preset": args.preset, "size": features.image_size, "sigma": scoring.sigma,
                     "image_score": scoring.image_score, "resize": args.resize, "levels": list(args.levels),
                     "ratio": args.ratio, "backbone": args.backbone, "neighbors": args.neighbors},
    }


CORESET_COLUMNS = (
    ("method", "{}"),
    ("seconds", "{:.1f}"),
    ("speedup", "{:.1f}x"),
    ("radius", "{:.3f}"),
    ("radius_ratio", "{:.4f}"),
    ("shared_centres", "{:.3f}"),
    ("image_auroc", "{:.3f}"),
    ("pixel_auroc", "{:.3f}"),
    ("pro", "{:.3f}"),
)


def coreset_comparison(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Naive greedy against the lazy (default) and two-stage coresets on the same stored features.

    All selections run back to back in this process on one machine state. Covering radii
    are measured on the full stored features; each distinct bank is then evaluated on the
    test split (unless ``--no-eval``). The last row selects from the features rounded to
    float16, as ``extract_features(..., dtype="float16")`` stores them.
    """
    import tempfile

    import torch

    from pipeline.data.datasets import open_dataset
    from pipeline.patchcore.coreset import SHARD_SIZE, covering_radius, greedy_coreset, greedy_coreset_naive

    torch.set_num_threads(args.threads)
    dataset = open_dataset(spec)
    config = _feature_config(args)
    with tempfile.TemporaryDirectory(prefix="tracebank-bench-") as tmp:
        store, extract_s = _cached_features(dataset.train, config, Path(args.cache or tmp))
        x = store.array()  # (N, D) memory map
        x16 = np.asarray(x, dtype=np.float16)
        methods: list[tuple[str, Any, np.ndarray]] = [
            ("lazy (default)", greedy_coreset, x),
            ("naive", greedy_coreset_naive, x),
            (f"two-stage (shard {SHARD_SIZE})", lambda f, r: greedy_coreset(f, r, shard_size=SHARD_SIZE), x),
            ("lazy, float16 store", greedy_coreset, x16),
        ]
        load_before = os.getloadavg()
        rows: list[dict[str, Any]] = []
        picks: dict[str, np.ndarray] = {}
        for name, func, feats in methods:
            start = time.perf_counter()
            idx = func(feats, args.ratio)
            seconds = time.perf_counter() - start
            picks[name] = idx
            bank = np.asarray(feats[np.sort(idx)], dtype=np.float32)
            rows.append({"method": name, "seconds": seconds, "radius": covering_radius(x, bank), "bank": bank})
        load_after = os.getloadavg()
        naive = rows[1]
        for row in rows:
            row["speedup"] = naive["seconds"] / row["seconds"]
            row["radius_ratio"] = row["radius"] / naive["radius"]
            row["shared_centres"] = len(np.intersect1d(picks[row["method"]], picks["naive"])) / len(picks["naive"])
        if not args.no_eval and dataset.test:
            _evaluate_banks(rows, dataset, config, args)
    for row in rows:
        del row["bank"]
    return {
        "dataset": spec, "patches": int(len(x)), "dim": int(x.shape[1]), "ratio": args.ratio, "threads": args.threads,
        "bank_size": len(picks["naive"]), "extract_s": extract_s,
        "load_average_before": load_before, "load_average_after": load_after, "methods": rows,
    }


def _feature_config(args: argparse.Namespace) -> Any:
    from pipeline.cli_args import preset_value
    from pipeline.config import FeatureConfig

    return FeatureConfig(
        backbone=args.backbone, image_size=preset_value(args, "features", "image_size", args.size),
        resize=args.resize, levels=tuple(args.levels),
        normalization="tf" if args.backbone.startswith("tf_") else "imagenet",
    )


def _scoring_config(args: argparse.Namespace) -> Any:
    from pipeline.cli_args import preset_value
    from pipeline.config import ScoringConfig

    return ScoringConfig(num_neighbors=args.neighbors, sigma=preset_value(args, "scoring", "sigma", args.sigma))


def _cached_features(samples: list[Any], config: Any, directory: Path) -> tuple[Any, float | None]:
    """Training features in ``directory``, extracted unless it holds them for these images and
    settings; returns the store and the extraction seconds (None when reused)."""
    from pipeline.config import to_dict
    from pipeline.lifecycle.stages import FeatureStore, extract_features
    from pipeline.patchcore.features import FeatureExtractor

    key = {"settings": to_dict(config), "images": [s.path for s in samples]}
    key_file = directory / "bench_key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) == key:
        return FeatureStore.open(directory), None
    start = time.perf_counter()
    store = extract_features(samples, FeatureExtractor(config), directory)
    key_file.write_text(json.dumps(key))
    return store, time.perf_counter() - start


def _evaluate_banks(rows: list[dict[str, Any]], dataset: Any, config: Any, args: argparse.Namespace) -> None:
    """Image AUROC, pixel AUROC and PRO of each row's bank (a bank equal to an earlier one
    reuses its figures)."""
    from pipeline.config import CoresetConfig
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.patchcore.features import FeatureExtractor
    from pipeline.patchcore.model import PatchCore

    extractor = FeatureExtractor(config)
    done: list[dict[str, Any]] = []
    for row in rows:
        same = next((d for d in done if np.array_equal(d["bank"], row["bank"])), None)
        if same is None:
            model = PatchCore(config, CoresetConfig(ratio=args.ratio), _scoring_config(args), extractor=extractor)
            model.set_bank(row["bank"])
            metrics = evaluate(model, dataset.test, batch_size=16, keep_maps=False).metrics
            same = {"bank": row["bank"], **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pro")}}
            done.append(same)
        row.update({k: same[k] for k in ("image_auroc", "pixel_auroc", "pro")})


def print_coreset_table(result: dict[str, Any]) -> None:
    print(f"{result['dataset']}: {result['patches']} patch features x {result['dim']}, ratio {result['ratio']}, "
          f"bank {result['bank_size']}, {result['threads']} torch thread(s); "
          f"load average {result['load_average_before'][0]:.2f} before, "
          f"{result['load_average_after'][0]:.2f} after the selections")
    cells = [[k for k, _ in CORESET_COLUMNS]]
    cells += [["-" if r.get(k) is None else f.format(r[k]) for k, f in CORESET_COLUMNS] for r in result["methods"]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(CORESET_COLUMNS))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def _format(row: dict[str, Any]) -> list[str]:
    return ["-" if row.get(k) is None else fmt.format(row[k]) for k, fmt in COLUMNS]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[k for k, _ in COLUMNS]] + [_format(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", help="dataset spec (repeatable)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--preset", default="default", choices=list(PRESETS),
                        help="named settings of `tracebank fit --preset`")
    parser.add_argument("--size", type=int, help="input side (default: the preset's, else the library's)")
    parser.add_argument("--sigma", type=float, help="map Gaussian, pixels (default: the preset's, else the library's)")
    parser.add_argument("--resize", default="squash", choices=["squash", "letterbox"])
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--neighbors", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 is faster when other jobs share the cores)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--coreset", action="store_true", help="compare the naive and the fast coresets on MTD")
    parser.add_argument("--cache", help="with --coreset: keep the training features in this folder between runs")
    parser.add_argument("--no-eval", action="store_true", help="with --coreset: skip AUROC/PRO of each bank")
    args = parser.parse_args(argv)
    if args.coreset:
        result = coreset_comparison((args.data or [DEFAULT_DATASETS[0]])[0], args)
        print_coreset_table(result)
        if args.json:
            print(json.dumps(result))
        return 0
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0
    specs = args.data or list(DEFAULT_DATASETS)
    passthrough = [a for a in sys.argv[1:] if a != "--json"]
    passthrough = _strip_data(passthrough)
    rows = []
    for spec in specs:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.accuracy", "--one", spec, *passthrough],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            print(f"{spec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        if args.json:
            print(json.dumps(row))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print_table(rows)
    return 0


def _strip_data(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--data":
            skip = True
            continue
        if arg.startswith("--data="):
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
