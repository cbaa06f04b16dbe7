"""Accuracy and speed benchmark: fit and evaluate MTD and ELPV mono/poly with the defaults.

    python -m pipeline.bench                       # all datasets, default settings
    python -m pipeline.bench --data elpv:mono --size 320 --resize letterbox

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

    from .bank import load_bank
    from .cli import fit_bank
    from .config import CoresetConfig, FeatureConfig, ScoringConfig
    from .datasets import load_images, open_dataset
    from .evaluation import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    features = FeatureConfig(
        backbone=args.backbone, image_size=args.size, resize=args.resize, levels=tuple(args.levels),
        normalization="tf" if args.backbone.startswith("tf_") else "imagenet",
    )
    coreset = CoresetConfig(ratio=args.ratio)
    scoring = ScoringConfig(num_neighbors=args.neighbors)
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit_bank(spec, Path(tmp) / "bank", features, coreset, scoring, quiet=True, evaluate_after=False)
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
        "settings": {"size": args.size, "resize": args.resize, "levels": list(args.levels),
                     "ratio": args.ratio, "backbone": args.backbone, "neighbors": args.neighbors},
    }


def coreset_comparison(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Naive greedy against the two-stage coreset on the same stored features."""
    import tempfile

    from .config import FeatureConfig
    from .coreset import covering_radius, greedy_coreset, greedy_coreset_naive
    from .datasets import open_dataset
    from .features import FeatureExtractor
    from .stages import extract_features

    with tempfile.TemporaryDirectory() as tmp:
        features = FeatureConfig(image_size=args.size, resize=args.resize, levels=tuple(args.levels))
        store = extract_features(open_dataset(spec).train, FeatureExtractor(features), tmp)
        x = store.array()
        row: dict[str, Any] = {"dataset": spec, "patches": int(len(x)), "ratio": args.ratio}
        for name, func in (("two_stage", greedy_coreset), ("naive", greedy_coreset_naive)):
            start = time.perf_counter()
            idx = func(x, args.ratio)
            row[f"{name}_s"] = time.perf_counter() - start
            row[f"{name}_radius"] = covering_radius(x, np.asarray(x[np.sort(idx)], np.float32))
        row["speedup"] = row["naive_s"] / row["two_stage_s"]
        row["radius_ratio"] = row["two_stage_radius"] / row["naive_radius"]
        return row


def _format(row: dict[str, Any]) -> list[str]:
    return ["-" if row.get(k) is None else fmt.format(row[k]) for k, fmt in COLUMNS]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[k for k, _ in COLUMNS]] + [_format(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", help="dataset spec (repeatable)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize", default="squash", choices=["squash", "letterbox"])
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--neighbors", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--coreset", action="store_true", help="compare naive and two-stage coreset on MTD")
    args = parser.parse_args(argv)
    if args.coreset:
        print(json.dumps(coreset_comparison((args.data or [DEFAULT_DATASETS[0]])[0], args), indent=1))
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
            [sys.executable, "-m", "pipeline.bench", "--one", spec, *passthrough],
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
