"""Memory and time of fitting a bank as the training set grows, one fresh process per size.

    python -m benchmarks.scale                                 # 1000, 2000, 5000, 10000 images
    python -m benchmarks.scale --sizes 1000,2000 --out runs/scale

The nominal set is real ELPV cells (mono and poly training cells) and MTD training tiles,
each drawn once per size in one of its eight flips and rotations (seeded, so a smaller set
is the start of a larger one), written as PNG files to ``--images`` once and reused. For
each size one process extracts the patch features to a memory-mapped file on disk
(``extract_features``, float16 by default) and a second one selects the coreset from that
file and builds the index, so each phase's peak RSS is its own. Prints a table and writes
``scale.csv`` and ``scale.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = (
    ("images", "{}"),
    ("patches", "{}"),
    ("features_gb", "{:.2f}"),
    ("extract_s", "{:.1f}"),
    ("images_per_s", "{:.1f}"),
    ("coreset_s", "{:.1f}"),
    ("bank_size", "{}"),
    ("extract_rss_gb", "{:.2f}"),
    ("coreset_rss_gb", "{:.2f}"),
    ("peak_rss_gb", "{:.2f}"),
)
VARIANTS = 8  # flips and rotations of a square: the dihedral group


def source_images(mtd: str) -> list[str]:
    """Nominal training images drawn from: ELPV mono and poly cells, MTD tiles."""
    from pipeline.data.datasets import open_dataset

    return [s.path for spec in ("elpv:mono", "elpv:poly", f"mtd:{mtd}") for s in open_dataset(spec).train]


def make_images(n: int, directory: Path, sources: list[str], *, seed: int = 0) -> list[Path]:
    """The first ``n`` images of the seeded set, written to ``directory`` as PNG (kept ones reused).

    Image ``i`` is one of the ``len(sources) * 8`` flipped or rotated sources, drawn without
    replacement (cycling once they are used up), so it does not depend on ``n``.
    """
    from PIL import Image

    from pipeline.data.images import read_image

    directory.mkdir(parents=True, exist_ok=True)
    key = {"seed": seed, "sources": sources}
    key_file = directory / "images.json"
    if not key_file.is_file() or json.loads(key_file.read_text()) != key:
        for old in directory.glob("*.png"):
            old.unlink()
        key_file.write_text(json.dumps(key))
    rng = np.random.default_rng(seed)
    variants = len(sources) * VARIANTS
    order = np.concatenate([rng.permutation(variants) for _ in range(-(-n // variants))])
    paths = []
    for i, variant in enumerate(order[:n].tolist()):
        path = directory / f"{i:05d}.png"
        paths.append(path)
        if path.is_file():
            continue
        image = read_image(sources[variant // VARIANTS])  # (H, W) or (H, W, 3) uint8
        flip = variant % VARIANTS
        image = np.rot90(image, flip % 4)
        if flip >= 4:
            image = image[:, ::-1]
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(np.ascontiguousarray(image)).save(tmp)
        tmp.replace(path)
    return paths


def extract_child(images: Path, n: int, work: Path, dtype: str, batch_size: int, runtime: str) -> dict[str, Any]:
    """Extract features of the first ``n`` images into ``work`` (runs in its own process)."""
    from pipeline.config import FeatureConfig
    from pipeline.data.datasets import Sample
    from pipeline.lifecycle.stages import extract_features
    from pipeline.patchcore.features import FeatureExtractor

    samples = [Sample(str(images / f"{i:05d}.png"), 0) for i in range(n)]
    extractor = FeatureExtractor(FeatureConfig(runtime=runtime))
    start = time.perf_counter()
    store = extract_features(samples, extractor, work, batch_size=batch_size, dtype=dtype)
    seconds = time.perf_counter() - start
    return {
        "images": len(store.files), "patches": store.rows, "dim": extractor.dim, "dtype": dtype, "runtime": runtime,
        "features_gb": (work / "features.npy").stat().st_size / 2**30, "extract_s": seconds,
        "images_per_s": len(store.files) / seconds, "extract_rss_gb": _peak_rss_gb(),
    }


def select_child(work: Path, ratio: float, shard_size: int | None) -> dict[str, Any]:
    """Select the coreset from the features in ``work`` and index it (runs in its own process)."""
    from pipeline.config import CoresetConfig, FeatureConfig
    from pipeline.lifecycle.stages import FeatureStore
    from pipeline.patchcore.coreset import greedy_coreset
    from pipeline.patchcore.model import PatchCore

    features = FeatureStore.open(work).array()  # (N, D) memory map
    config = CoresetConfig(ratio=ratio)
    model = PatchCore(FeatureConfig(), config)
    start = time.perf_counter()
    if shard_size is None:
        model.fit_features(features)
    else:
        idx = greedy_coreset(features, ratio, seed=config.seed, proj_dim=config.proj_dim, shard_size=shard_size)
        model.set_bank(np.ascontiguousarray(features[np.sort(idx)], dtype=np.float32))
    seconds = time.perf_counter() - start
    return {"coreset_s": seconds, "bank_size": len(model.memory_bank_), "coreset_rss_gb": _peak_rss_gb()}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _child(*argv: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", *argv], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_scale {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[k for k, _ in COLUMNS]] + [[f.format(r[k]) for k, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)), flush=True)


def write_outputs(rows: list[dict[str, Any]], out: Path, limit_gb: float) -> None:
    """``scale.csv`` and ``scale.png`` (seconds and peak RSS against the number of images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "scale.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n = [r["images"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["extract_s"] for r in rows], "o-", label="feature extraction")
    left.plot(n, [r["coreset_s"] for r in rows], "s-", label="coreset + index")
    left.set(xlabel="training images", ylabel="seconds", title="wall time")
    right.plot(n, [r["extract_rss_gb"] for r in rows], "o-", label="extraction process")
    right.plot(n, [r["coreset_rss_gb"] for r in rows], "s-", label="coreset process")
    right.axhline(limit_gb, color="grey", linestyle="--", label=f"{limit_gb:g} GiB target")
    right.set(xlabel="training images", ylabel="GiB (2^30 bytes)", title="peak RSS")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000", help="comma-separated numbers of images")
    parser.add_argument("--out", default="runs/scale", help="folder for scale.csv and scale.png")
    parser.add_argument("--images", help="folder of the generated PNG images (default: in the temp folder)")
    parser.add_argument("--work", help="folder for the feature files, emptied per size (default: a temp folder)")
    parser.add_argument("--mtd", default="../shared/datasets/mtd", help="MTD dataset folder")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="feature storage")
    parser.add_argument("--runtime", default="onnx", choices=["onnx", "torch"], help="feature runtime")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--shard-size", type=int, help="coreset shard size (default: the library's choice)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-gb", type=float, default=8.0, help="RSS target drawn on the plot")
    parser.add_argument("--child", choices=["extract", "select"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        work = Path(args.work)
        if args.child == "extract":
            result = extract_child(Path(args.images), args.n, work, args.dtype, args.batch_size, args.runtime)
        else:
            result = select_child(work, args.ratio, args.shard_size)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes must be positive integers, got {args.sizes!r}")
    images = Path(args.images or Path(tempfile.gettempdir()) / "tracebank-scale-images")
    start = time.perf_counter()
    make_images(max(sizes), images, source_images(args.mtd), seed=args.seed)
    print(f"{max(sizes)} images in {images} ({time.perf_counter() - start:.0f} s to write the new ones)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tracebank-scale-") as tmp:
        work = Path(args.work or tmp) / "features"
        for n in sorted(sizes):
            shutil.rmtree(work, ignore_errors=True)
            row = _child("--child", "extract", "--images", str(images), "--n", str(n), "--work", str(work),
                         "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--runtime", args.runtime)
            shard = ["--shard-size", str(args.shard_size)] if args.shard_size is not None else []
            row |= _child("--child", "select", "--work", str(work), "--ratio", str(args.ratio), *shard)
            row["peak_rss_gb"] = max(row["extract_rss_gb"], row["coreset_rss_gb"])
            rows.append(row)
            print(f"{n} images: extract {row['extract_s']:.1f} s, coreset {row['coreset_s']:.1f} s, "
                  f"peak RSS {row['peak_rss_gb']:.2f} GiB", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows)
    write_outputs(rows, Path(args.out), args.limit_gb)
    print(f"wrote {Path(args.out) / 'scale.csv'} and {Path(args.out) / 'scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
