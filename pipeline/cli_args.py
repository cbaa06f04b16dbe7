"""The argument parser of the ``tracebank`` command line (the commands are in :mod:`pipeline.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from .config import IMAGE_SCORES, PADDINGS, PRESETS, CoresetConfig, FeatureConfig, ScoringConfig


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracebank", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--batch-size", type=int, default=8)

    defaults = FeatureConfig()
    fit = sub.add_parser("fit", help="fit a memory bank on nominal images")
    fit.add_argument("--data", required=True, help="mvtec:PATH/CAT, mtd:PATH, elpv:mono|poly, folder:PATH")
    fit.add_argument("--out", required=True, help="bank directory to create")
    fit.add_argument("--backbone", default=defaults.backbone)
    fit.add_argument("--weights", default=defaults.weights, help="default | hub | PATH.pth | PATH.safetensors")
    fit.add_argument("--levels", default=",".join(map(str, defaults.levels)))
    fit.add_argument("--preset", default="default", choices=list(PRESETS),
                     help="named settings (accurate: 288 px and a wider map Gaussian, for localisation); "
                          "an explicit --size or --sigma still wins")
    fit.add_argument("--size", type=int, help=f"input side in pixels (default {defaults.image_size}, or the preset's)")
    fit.add_argument("--resize", default=defaults.resize, choices=["squash", "letterbox"])
    fit.add_argument("--normalization", default=defaults.normalization, choices=["tf", "imagenet"])
    fit.add_argument("--extend", metavar="PARENT",
                     help="extend this bank with the training images of --data it has not seen (only they are "
                          "extracted; the coreset continues from its centres; its feature settings are kept)")
    fit.add_argument("--padding", default=defaults.padding, choices=list(PADDINGS),
                     help="border of the 3x3 neighbourhood average (zeros: counted, as the reference code)")
    fit.add_argument("--runtime", choices=["onnx", "torch"],
                     help="feature runtime: onnx (ONNX Runtime, CPU; the default there) or torch (eager)")
    fit.add_argument("--ratio", type=float, default=CoresetConfig().ratio, help="coreset ratio in (0, 1]")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--neighbors", type=int, default=ScoringConfig().num_neighbors)
    fit.add_argument("--image-score", default=ScoringConfig().image_score, choices=list(IMAGE_SCORES),
                     help="eq7: the paper's single worst patch; smoothed: mixed with the largest value of "
                          "the patch-score grid after a Gaussian (the default)")
    fit.add_argument("--sigma", type=float,
                     help=f"Gaussian smoothing of the anomaly map, in input pixels (default {ScoringConfig().sigma:g}, "
                          "or the preset's)")
    fit.add_argument("--index", default="flat", choices=["flat", "ivfpq"])
    fit.add_argument("--limit", type=int, help="use only the first N training / N test images")
    fit.add_argument("--no-evaluate", action="store_true", help="skip evaluation (no threshold)")
    common(fit)

    ev = sub.add_parser("evaluate", help="image AUROC, pixel AUROC and PRO of a bank on a dataset")
    ev.add_argument("bank")
    ev.add_argument("--data", required=True)
    ev.add_argument("--limit", type=int, help="a stratified sample of N test images")
    common(ev)

    pr = sub.add_parser("predict", help="score images (files or folders); heatmap overlays with --out")
    pr.add_argument("bank", help="bank directory, or a registry bank id, unique prefix or 'production'")
    pr.add_argument("images", nargs="*", help="image files or folders of them")
    pr.add_argument("--data", help="also predict on test images of this dataset spec")
    pr.add_argument("--count", type=int, default=6, help="how many test images with --data (half defective)")
    pr.add_argument("--out", help="write a heatmap overlay per image into this folder")
    pr.add_argument("--registry", default="banks")
    common(pr)
    pr.set_defaults(batch_size=16)

    im = sub.add_parser("import", help="copy a dataset into the DVC-tracked data folder and dvc add it")
    im.add_argument("spec")
    im.add_argument("--root", default="data")
    im.add_argument("--limit-train", type=int)
    im.add_argument("--limit-test", type=int)
    im.add_argument("--replace", action="store_true",
                    help="replace a data root that already holds a dataset (built beside it, swapped in when complete)")
    im.add_argument("--json", action="store_true")
    ad = sub.add_parser("add", help="append new good images to data/train/good (deduplicated, validated), dvc add")
    ad.add_argument("paths", nargs="+", help="image files or folders of them")
    ad.add_argument("--root", default="data")
    ad.add_argument("--quarantine", default="quarantine", help="where files that fail validation go, with reasons")
    ad.add_argument("--params", default="params.yaml", help="its validation section is applied to the new files")
    ad.add_argument("--json", action="store_true")
    for name, text in (("banks", "list banks with their status"),
                       ("lineage", "a bank's record at registration and what followed (evaluations, promotions)"),
                       ("history", "the promotion log: who made which bank production, when and why"),
                       ("promote", "make a bank that passed its gates the production bank"),
                       ("rollback", "return to the previous production bank that differs from the current one")):
        p = sub.add_parser(name, help=text)
        if name in ("lineage", "promote"):
            p.add_argument("bank", help="bank id, unique prefix, or 'production'")
        if name == "history":
            p.add_argument("bank", nargs="?", help="only entries to or from this bank")
        if name == "promote":
            p.add_argument("--force", action="store_true", help="promote a bank whose gates failed (the log "
                           "records it as forced), or over a damaged production pointer")
        if name in ("promote", "rollback"):
            p.add_argument("--by", help="who is acting, for the log (default: your user name)")
            p.add_argument("--reload-url", metavar="URL", help="then POST URL/reload so the running service "
                           "switches (token from TRACEBANK_ADMIN_TOKEN); exits 2 if it does not")
        p.add_argument("--registry", default="banks")
        p.add_argument("--json", action="store_true")
    da = sub.add_parser("data", help="the versioned training data behind banks")
    data_sub = da.add_subparsers(dest="data_command", required=True)
    rs = data_sub.add_parser("restore", help="materialise a bank's exact training data from the DVC cache")
    rs.add_argument("bank", help="bank id, unique prefix, or 'production'")
    rs.add_argument("--to", required=True, help="a new (or empty) folder to write the data into")
    rs.add_argument("--cache", default=".dvc/cache", help="the DVC cache (default .dvc/cache)")
    rs.add_argument("--registry", default="banks")
    rs.add_argument("--json", action="store_true")
    rg = sub.add_parser("register", help="register a bank fitted with `tracebank fit`, gated, so it can be promoted")
    rg.add_argument("bank_dir")
    rg.add_argument("--data", help="evaluate and set the threshold on this spec's test split (required if the bank "
                                   "has no threshold)")
    rg.add_argument("--params", default="params.yaml", help="its gates section judges the bank")
    rg.add_argument("--registry", default="banks")
    rg.add_argument("--batch-size", type=int, default=8)
    rg.add_argument("--json", action="store_true")
    au = sub.add_parser("audit", help="which bank decided what: decisions joined to bank lineage (CSV or JSON lines)")
    au.add_argument("--part", help="only this part id")
    au.add_argument("--bank", help="only this bank id (or prefix)")
    au.add_argument("--since", help="only decisions at or after this ISO time (UTC unless an offset is given) "
                                    "or within this age (30m, 2h, 7d)")
    au.add_argument("--limit", type=int)
    au.add_argument("--db", default="audit/decisions.sqlite", help="SQLite path or SQLAlchemy URL")
    au.add_argument("--registry", default="banks")
    au.add_argument("--json", action="store_true", help="one JSON object per decision (JSON lines)")
    return parser


def preset_value(args: argparse.Namespace, section: str, key: str, given: Any) -> Any:
    """``given`` when the command line set it, else ``--preset``'s value, else the default."""
    if given is not None:
        return given
    fallback = {"features": FeatureConfig(), "scoring": ScoringConfig()}[section]
    return PRESETS[args.preset].get(section, {}).get(key, getattr(fallback, key))
