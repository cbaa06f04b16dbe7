"""Do synthetic defects rank banks the way real defects do?

    python -m benchmarks.synthetic                        # MTD, ELPV mono and poly, all banks
    python -m benchmarks.synthetic --data elpv:mono --banks default,broken-normalisation

Fits deliberately different banks (backbones, levels, image sizes, coreset ratios, one with
the wrong input normalisation) on each dataset's training images, evaluates each on the real
test split and on ``synthetic:SPEC`` (the same good test images plus one synthetic defect
each, seed ``--seed``), and prints both metric columns and their Spearman rank correlation:
image AUROC everywhere, PRO where the real defects have masks. Correlations of each family and
pair of families alone (the other defects left out) say which tracks real quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DATASETS = ("mtd:../shared/datasets/mtd", "elpv:mono", "elpv:poly")
#: name -> (feature settings, coreset ratio); everything else at the defaults.
BANKS: dict[str, tuple[dict[str, Any], float]] = {
    "default": ({}, 0.01),
    "levels-1+2": ({"levels": (1, 2)}, 0.01),
    "levels-3+4": ({"levels": (3, 4)}, 0.01),
    "size-128": ({"image_size": 128}, 0.01),
    "size-320": ({"image_size": 320}, 0.01),
    "coreset-0.1%": ({}, 0.001),
    "no-neighbourhood": ({"neighbourhood": 1}, 0.01),
    "lite1-240": ({"backbone": "tf_efficientnet_lite1", "image_size": 240}, 0.01),
    "lite2-260": ({"backbone": "tf_efficientnet_lite2", "image_size": 260}, 0.01),
    "broken-normalisation": ({"normalization": "imagenet"}, 0.01),
    "random-weights": ({"weights": "random"}, 0.01),  # a broken weights file: see _random_weights
}


def _random_weights(directory: Path) -> str:
    """A Lite0 weights file with timm's random initialisation (seed 0)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = directory / "random-lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def run_bank(spec: str, name: str, seed: int) -> dict[str, Any]:
    """Fit one bank on ``spec`` and evaluate it on the real and the synthetic test split."""
    from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig
    from pipeline.data.datasets import open_dataset
    from pipeline.data.synthetic import SyntheticConfig
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.metrics import image_auroc, pro_score
    from pipeline.lifecycle.fitting import fit_bank
    from pipeline.patchcore.bank import load_bank

    overrides, ratio = BANKS[name]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if overrides.get("weights") == "random":
            overrides = overrides | {"weights": _random_weights(Path(tmp))}
        features = FeatureConfig(**({"runtime": "onnx"} | overrides))
        fit_bank(spec, Path(tmp) / "bank", features, CoresetConfig(ratio=ratio), ScoringConfig(),
                 evaluate_after=False)
        model, _ = load_bank(Path(tmp) / "bank")
    fit_s = time.perf_counter() - start
    real_test = open_dataset(spec).test
    real = evaluate(model, real_test, batch_size=16, keep_maps=False).metrics
    synthetic_set = open_dataset(f"synthetic:{spec}", SyntheticConfig(seed=seed))
    # pixel metrics of the synthetic set only where the real ones exist to compare with
    pixels = any(s.mask for s in real_test if s.label == 1)
    test = synthetic_set.test if pixels else [dataclasses.replace(s, mask=None) for s in synthetic_set.test]
    synth = evaluate(model, test, batch_size=16, keep_maps=pixels)
    row = {"dataset": _short(spec), "bank": name, "fit_s": fit_s,
           "real_image_auroc": real["image_auroc"], "real_pro": real["pro"],
           "synthetic_image_auroc": synth.metrics["image_auroc"], "synthetic_pro": synth.metrics["pro"]}
    labels, kinds = synth.labels, [s.kind for s in synth.samples]
    families = sorted({k for k, lab in zip(kinds, labels, strict=True) if lab == 1})
    for size in range(1, len(families)):  # every proper subset of the families, e.g. "blob+scratch"
        for subset in itertools.combinations(families, size):
            keep = [i for i, k in enumerate(kinds) if k == "good" or k in subset]
            column = "+".join(subset)
            row[f"{column}_image_auroc"] = image_auroc(labels[keep], synth.scores[keep])
            if pixels:
                assert synth.maps is not None and synth.masks is not None
                row[f"{column}_pro"] = pro_score([synth.masks[i] for i in keep], [synth.maps[i] for i in keep])
    return row


def _short(spec: str) -> str:
    return "mtd" if spec.startswith("mtd:") else spec


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman correlations per dataset: overall and per defect family."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        summary: dict[str, Any] = {"dataset": dataset, "n_banks": len(mine)}
        columns = [c.removesuffix("_image_auroc") for c in mine[0] if c.endswith("_image_auroc")
                   and not c.startswith("real")]
        for metric in ("image_auroc", "pro"):
            real = [r[f"real_{metric}"] for r in mine]
            if any(v is None for v in real):
                continue
            for column in columns:
                summary[f"{metric} {column}"] = spearman(real, [r[f"{column}_{metric}"] for r in mine])
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument("--banks", default=",".join(BANKS), help="comma-separated names from: " + ", ".join(BANKS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic defects")
    parser.add_argument("--out", help="also write every row as JSON lines here")
    args = parser.parse_args(argv)
    names = args.banks.split(",")
    if unknown := [n for n in names if n not in BANKS]:
        parser.error(f"unknown bank(s) {unknown}")
    rows = []
    for spec in args.data:
        for name in names:
            row = run_bank(spec, name, args.seed)
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print()
    print("| dataset | bank | real image AUROC | synthetic image AUROC | real PRO | synthetic PRO |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["real_image_auroc"], r["synthetic_image_auroc"], r["real_pro"], r["synthetic_pro"]]
        print(f"| {r['dataset']} | {r['bank']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    print()
    for summary in summarise(rows):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
