"""Incremental bank against a full refit on MTD: fit on 90% of the training tiles, extend with
the other 10%, and compare with a fit on 100%.

    python -m benchmarks.incremental [--data ../shared/datasets/mtd] [--fraction 0.9]

Prints the seconds of extraction + coreset of each (evaluation excluded), the covering radius
of each bank over all training patches, bank sizes and image AUROC / pixel AUROC / PRO on the
test split. Goals (issue 16): the increment under a quarter of the full refit's seconds,
metrics within 0.005 of the full refit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (first: its OpenBLAS setting precedes numpy's loading)


def subset_tree(data: Path, root: Path, n_train: int) -> str:
    """An MTD tree (links to ``data``'s folders) whose split keeps the first ``n_train`` tiles."""
    root.mkdir(parents=True)
    split = json.loads((data / "split.json").read_text())
    for entry in data.iterdir():
        if entry.is_dir():
            os.symlink(entry.resolve(), root / entry.name)
    split["train"] = split["train"][:n_train]
    (root / "split.json").write_text(json.dumps(split))
    return f"mtd:{root}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/mtd")
    parser.add_argument("--fraction", type=float, default=0.9)
    args = parser.parse_args(argv)

    from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig
    from pipeline.data.datasets import open_dataset
    from pipeline.lifecycle.fitting import extend_bank, fit_bank
    from pipeline.lifecycle.stages import extract_features
    from pipeline.patchcore.bank import load_bank
    from pipeline.patchcore.coreset import covering_radius
    from pipeline.patchcore.features import FeatureExtractor

    data = Path(args.data)
    n_all = len(json.loads((data / "split.json").read_text())["train"])
    n_part = int(n_all * args.fraction)
    features = FeatureConfig(runtime="onnx")
    coreset, scoring = CoresetConfig(), ScoringConfig()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        part = subset_tree(data, Path(tmp) / "part", n_part)
        full = subset_tree(data, Path(tmp) / "full", n_all)
        base = fit_bank(part, Path(tmp) / "base", features, coreset, scoring, evaluate_after=False)
        rows["incremental"] = extend_bank(Path(tmp) / "base", full, Path(tmp) / "incremental")
        rows["full refit"] = fit_bank(full, Path(tmp) / "refit", features, coreset, scoring)
        store = extract_features(open_dataset(full).train, FeatureExtractor(features), Path(tmp) / "all")
        patches = store.array()
        for name, folder in (("incremental", "incremental"), ("full refit", "refit")):
            model, _ = load_bank(Path(tmp) / folder)
            rows[name]["radius"] = covering_radius(patches, model.memory_bank_)
    print(f"MTD: {n_part} tiles fitted, {n_all - n_part} added; load average {os.getloadavg()}")
    print(f"base fit on {n_part}: {base['timings']['extract_s'] + base['timings']['coreset_s']:.1f} s")
    print(f"{'':12s} {'seconds':>8s} {'extract':>8s} {'coreset':>8s} {'bank':>6s} {'radius':>7s} "
          f"{'image':>6s} {'pixel':>6s} {'PRO':>6s}")
    for name, row in rows.items():
        t, m = row["timings"], row["metrics"]
        print(f"{name:12s} {t['extract_s'] + t['coreset_s']:8.1f} {t['extract_s']:8.1f} {t['coreset_s']:8.1f} "
              f"{row['bank_size']:6d} {row['radius']:7.3f} {m['image_auroc']:6.3f} {m['pixel_auroc']:6.3f} "
              f"{m['pro']:6.3f}")
    inc, ref = rows["incremental"], rows["full refit"]
    seconds = [r["timings"]["extract_s"] + r["timings"]["coreset_s"] for r in (inc, ref)]
    print(f"increment / full refit: {seconds[0] / seconds[1]:.3f} of the seconds (goal < 0.25), radius "
          f"{inc['radius'] / ref['radius']:.3f}x, metric differences "
          + ", ".join(f"{k} {inc['metrics'][k] - ref['metrics'][k]:+.4f}"
                      for k in ("image_auroc", "pixel_auroc", "pro")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
