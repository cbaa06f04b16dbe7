"""The ``tracebank`` command line: fit, evaluate and predict with banks on disk.

Progress bars go to stderr; ``--json`` prints exactly one JSON object on stdout for scripts.
Errors a user can fix (bad spec, corrupt bank, unreadable image) exit with status 2 and a
one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm import tqdm

from pipeline.data.datasets import DatasetError, LoadReport, Sample, batched, load_images, open_dataset
from pipeline.data.images import ImageError
from pipeline.data.inputs import image_inputs, output_paths, relative_names
from pipeline.lifecycle.audit import AuditError
from pipeline.lifecycle.registry import NoEarlierBank, RegistryError
from pipeline.lifecycle.service_reload import ReloadFailed, reload_service
from pipeline.patchcore.bank import BankError, load_bank

from .cli_args import build_parser, preset_value
from .cli_show import REGISTRY_VIEWS, json_default
from .config import ConfigError, CoresetConfig, FeatureConfig, ScoringConfig, from_mapping

if TYPE_CHECKING:  # the commands import the fitting, evaluation and drawing code they use
    from pipeline.lifecycle.fitting import Progress

#: Exit status for errors in what the user asked (not bugs).
USER_ERROR = 2
#: Exit status of ``predict`` when some inputs could not be read (the others are scored).
PARTLY_FAILED = 1
#: Exit status of ``rollback`` when there is no earlier production bank to return to.
NOTHING_TO_ROLL_BACK = 1
#: Exit status of ``banks`` and ``lineage`` when they found the registry damaged (a corrupt
#: bank, a damaged production pointer); they print what they could read, and the problems.
DAMAGED = 1
Command = Callable[[argparse.Namespace], dict[str, Any]]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(func: Command) -> Command:
        COMMANDS[name] = func
        return func

    return register


def _bar(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img" if "imag" in desc else "it", disable=quiet, file=sys.stderr)


def _progress(quiet: bool) -> Progress:
    """A progress-bar factory for :func:`~pipeline.lifecycle.fitting.fit_bank`."""
    return lambda total, desc: _bar(total, desc, quiet)


def _feature_config(args: argparse.Namespace) -> FeatureConfig:
    values: dict[str, Any] = {
        "backbone": args.backbone,
        "weights": args.weights,
        "levels": tuple(int(v) for v in args.levels.split(",")),
        "image_size": preset_value(args, "features", "image_size", args.size),
        "resize": args.resize,
        "normalization": args.normalization,
        "padding": args.padding,
        "device": args.device,
        "runtime": args.runtime or ("onnx" if args.device == "cpu" else "torch"),
    }
    if args.backbone != "tf_efficientnet_lite0" and args.normalization == "tf" and not args.backbone.startswith("tf_"):
        values["normalization"] = "imagenet"
    return from_mapping(FeatureConfig, "command line", values)


@command("fit")
def _fit(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.lifecycle.fitting import extend_bank, fit_bank

    if args.extend:
        return extend_bank(_bank_path(args.extend, "banks"), args.data, Path(args.out), batch_size=args.batch_size,
                           progress=_progress(args.quiet or args.json), evaluate_after=not args.no_evaluate)
    return fit_bank(
        args.data,
        Path(args.out),
        _feature_config(args),
        from_mapping(CoresetConfig, "command line", {"ratio": args.ratio, "seed": args.seed}),
        from_mapping(ScoringConfig, "command line", {"num_neighbors": args.neighbors, "index": args.index,
                                                     "image_score": args.image_score,
                                                     "sigma": preset_value(args, "scoring", "sigma", args.sigma)}),
        batch_size=args.batch_size,
        progress=_progress(args.quiet or args.json),
        evaluate_after=not args.no_evaluate,
        limit=args.limit,
    )


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.synthetic_set import describe as describe_eval_set
    from pipeline.evaluation.evaluate import default_method, evaluate

    model, manifest = load_bank(args.bank, device=args.device)
    dataset = open_dataset(args.data)
    if args.limit:
        dataset = dataset.subset(None, args.limit)
    if not dataset.test:
        raise DatasetError(f"{args.data} has no labelled test images to evaluate on")
    with _bar(len(dataset.test), "evaluating (images)", args.quiet or args.json) as bar:
        result = evaluate(model, dataset.test, batch_size=args.batch_size, keep_maps=False, on_batch=bar.update,
                          threshold_method=default_method(dataset.synthetic is not None))
    out = dict(result.metrics)
    out["bank_id"] = manifest["bank_id"]
    if dataset.synthetic is not None:
        out["evaluation_set"] = describe_eval_set(dataset)
    out["skipped"] = [{"path": p, "reason": r} for p, r in result.report.skipped]
    return out


def _bank_path(bank: str, registry: str) -> Path:
    """A bank directory, or a registry bank named by id, unique id prefix or ``production``."""
    if Path(bank).is_dir():
        return Path(bank)
    from pipeline.lifecycle.registry import Registry

    return Registry(registry).bank_dir(bank)


@command("predict")
def _predict(args: argparse.Namespace) -> dict[str, Any]:
    """Score images in batches; write heatmap overlays only when ``--out`` is given."""
    from pipeline.evaluation.overlay import heatmap_overlay

    start = time.perf_counter()
    model, manifest = load_bank(_bank_path(args.bank, args.registry), device=args.device)
    load_s = time.perf_counter() - start
    threshold = (manifest.get("threshold") or {}).get("value")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    names = image_inputs(args.images)
    if args.data:
        picked = open_dataset(args.data).subset(None, args.count, seed=0).test
        for path, name in relative_names(s.path for s in picked).items():
            names.setdefault(path, name)
    if not names:
        raise ValueError("give image paths or folders, or --data SPEC to predict on some of its test images")
    paths = list(names)
    targets = output_paths(names, out_dir, "_heatmap.png") if out_dir is not None else {}
    results: dict[str, dict[str, Any]] = {}
    report = LoadReport()
    samples = [Sample(path, 0) for path in paths]
    start = time.perf_counter()
    with _bar(len(paths), "predicting (images)", args.quiet or args.json) as bar:
        for batch in batched(load_images(samples, report=report), args.batch_size):
            images = [image for _, image, _ in batch]
            pred = model.predict(images, maps=out_dir is not None)
            for i, (sample, image, _) in enumerate(batch):
                score = float(pred.scores[i])
                decision = None if threshold is None else ("anomalous" if score >= threshold else "good")
                item: dict[str, Any] = {"path": sample.path, "score": score, "decision": decision}
                if out_dir is not None:
                    target = targets[sample.path]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_name(f".{target.name}.partial")  # an old overlay stays until the new is whole
                    Image.fromarray(heatmap_overlay(image, pred.maps[i], threshold)).save(partial, format="PNG")
                    os.replace(partial, target)
                    item["heatmap"] = str(target)
                results[sample.path] = item
            bar.update(len(batch))
    predict_s = time.perf_counter() - start
    for path, reason in report.skipped:
        results[path] = {"path": path, "error": reason}
    timings = {"load_bank_s": load_s, "predict_s": predict_s, "images_per_s": len(paths) / predict_s}
    return {"bank_id": manifest["bank_id"], "threshold": threshold, "results": [results[p] for p in paths],
            "timings": timings}


def _dvc_add(root: str) -> str | None:
    """``dvc add`` the data root; returns its new DVC hash."""
    from pipeline.data.tracking import TrackingError, dvc_add

    try:
        return dvc_add(root)
    except TrackingError as exc:
        raise ValueError(str(exc)) from exc


@command("import")
def _import(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.importer import import_dataset

    imported = import_dataset(args.spec, args.root, n_train=args.limit_train, n_test=args.limit_test,
                              replace=args.replace)
    return {"root": args.root, "n_train": len(imported.dataset.train), "n_test": len(imported.dataset.test),
            "skipped": [{"path": p, "reason": r} for p, r in imported.skipped], "data_hash": _dvc_add(args.root)}


@command("add")
def _add(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.intake import add_nominal
    from pipeline.data.validation import ValidationConfig

    config = ValidationConfig()
    if Path(args.params).is_file():
        from pipeline.lifecycle.steps import Params

        config = Params.load(args.params).validation
    report = add_nominal(args.paths, args.root, config=config, quarantine=args.quarantine)
    data_hash = _dvc_add(args.root) if report.added else None
    return report.as_json() | {"root": args.root, "data_hash": data_hash}


@command("banks")
def _banks(args: argparse.Namespace) -> dict[str, Any]:
    """Every bank, its files checked; ``problems``: a damaged pointer, each corrupt bank."""
    from pipeline.lifecycle.registry import Registry

    registry = Registry(args.registry)
    rows = registry.list(verify=True)
    problems = [p for p in [registry.pointer_problem()] if p] + [
        f"bank {r['bank_id']} ({r['status']}) is corrupt: {r['problem']}; do not use it: restore "
        f"{registry.root / r['bank_id']} from a backup" for r in rows if r["problem"]]
    return {"production": (registry.from_log() or {}).get("bank_id"), "banks": rows, "problems": problems}


@command("lineage")
def _lineage(args: argparse.Namespace) -> dict[str, Any]:
    """The bank's record; ``warnings``: its files do not match their sha256, or the pointer is damaged."""
    from pipeline.lifecycle.integrity import bank_problem
    from pipeline.lifecycle.registry import Registry

    registry = Registry(args.registry)
    record = registry.lineage(args.bank)
    folder = registry.bank_dir(record["bank_id"])
    warnings = [f"bank {record['bank_id']} is corrupt: {problem}; do not use it: restore {folder} from a backup"
                for problem in [bank_problem(folder)] if problem]
    return record | {"warnings": warnings + [p for p in [registry.pointer_problem()] if p]}


@command("register")
def _register(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.lifecycle.gates import GateConfig
    from pipeline.lifecycle.registry import Registry
    from pipeline.lifecycle.steps import Params, register_fitted_bank

    gates = Params.load(args.params).gates if Path(args.params).is_file() else GateConfig()
    return register_fitted_bank(args.bank_dir, Registry(args.registry), gates, data=args.data,
                                batch_size=args.batch_size)


@command("history")
def _history(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.lifecycle.registry import Registry

    registry = Registry(args.registry)
    return {"production": (registry.production() or {}).get("bank_id"), "entries": registry.history(args.bank)}


@command("promote")
def _promote(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.lifecycle.registry import Registry

    return _told(args, Registry(args.registry).promote(args.bank, by=args.by, force=args.force))


@command("rollback")
def _rollback(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.lifecycle.registry import Registry

    return _told(args, Registry(args.registry).rollback(by=args.by))


def _told(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """With ``--reload-url``: the running service switched to the new production bank."""
    if args.reload_url and not result.get("unchanged"):
        result["reload"] = reload_service(args.reload_url, result["bank_id"])
    return result


@command("data")
def _data(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.restore import RestoreError, restore
    from pipeline.lifecycle.registry import Registry

    record = Registry(args.registry).record(args.bank)
    data_hash, kind = record.get("data_hash"), record.get("data_hash_kind", "dvc-md5")
    if not data_hash or kind != "dvc-md5" or not str(data_hash).endswith(".dir"):
        raise ValueError(f"bank {record['bank_id']}'s training data was not tracked by DVC (data hash {data_hash}, "
                         f"{kind}), so there is nothing to restore it from; `tracebank lineage {record['bank_id']} "
                         "--json` lists its files with their sha256")
    try:
        done = restore(str(data_hash), Path(args.to), cache=Path(args.cache))
    except RestoreError as exc:
        raise ValueError(f"bank {record['bank_id']}: {exc}") from exc
    return done | {"bank_id": record["bank_id"]}


@command("audit")
def _audit(args: argparse.Namespace) -> dict[str, Any]:
    """Decisions from the audit database, each joined to its bank's lineage."""
    import csv

    from pipeline.lifecycle.audit import AUDIT_FIELDS, LINEAGE_FIELDS, decisions_with_lineage, parse_since

    since = parse_since(args.since) if args.since else None
    rows = decisions_with_lineage(args.db, args.registry, part_id=args.part, bank_id=args.bank, since=since,
                                  limit=args.limit)
    writer = None if args.json else csv.writer(sys.stdout)
    if writer is not None:
        writer.writerow([*AUDIT_FIELDS, *(f"bank_{k}" for k in LINEAGE_FIELDS)])
    count = 0
    for row in rows:
        if writer is None:
            print(json.dumps(row, default=json_default))
        else:
            writer.writerow([row[k] for k in AUDIT_FIELDS] + [row["lineage"].get(k) for k in LINEAGE_FIELDS])
        count += 1
    if count == 0:
        print("tracebank audit: no decisions match", file=sys.stderr)
    return {}


def _print_human(name: str, result: dict[str, Any]) -> None:
    if name in REGISTRY_VIEWS:
        REGISTRY_VIEWS[name](result)
        return
    if name == "register":
        print(f"bank {result['bank_id']} registered as {result['status']} "
              f"(threshold {result['threshold']['value']:.4f}, {result['threshold']['method']})")
        for failure in result["gates"]["failures"]:
            print(f"  gate failed: {failure}")
        return
    if name == "predict":
        for item in result["results"]:
            if "error" in item:
                print(f"{item['path']}: ERROR {item['error']}")
            else:
                heatmap = f"  ({item['heatmap']})" if "heatmap" in item else ""
                print(f"{item['path']}: score {item['score']:.4f} -> {item['decision'] or 'no threshold'}{heatmap}")
        return
    metrics = result.get("metrics", result) or {}
    if name == "fit":
        print(f"bank {result['bank_id']} written to {result['bank']} ({result['bank_size']} patches "
              f"from {result['n_train']} images)")
        for item in result["skipped"]:
            print(f"skipped {item['path']}: {item['reason']}")
    for key in ("image_auroc", "pixel_auroc", "pro", "n_good", "n_defect", "threshold"):
        if key in metrics:
            value = metrics[key]
            print(f"{key:12s} {value:.4f}" if isinstance(value, float) else f"{key:12s} {value}")
    for key, value in (result.get("timings") or {}).items():
        print(f"{key:12s} {value:.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__.splitlines()[0].replace("``", "")).parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except BrokenPipeError:  # `tracebank audit | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    except NoEarlierBank as exc:  # nothing to roll back to: refused, the registry is as it was
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"tracebank {args.command}: {exc}", file=sys.stderr)
        return NOTHING_TO_ROLL_BACK
    except (DatasetError, BankError, ConfigError, ImageError, FileNotFoundError, ValueError, RegistryError,
            AuditError, ReloadFailed) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"tracebank {args.command}: error: {exc}", file=sys.stderr)
        return USER_ERROR
    if args.command == "audit":
        return 0  # rows were streamed as they were read
    unread = args.command == "predict" and any("error" in item for item in result["results"])
    if getattr(args, "json", False):
        print(json.dumps(result, default=json_default))
    else:
        _print_human(args.command, result)
    if result.get("problems") or result.get("warnings"):
        return DAMAGED
    return PARTLY_FAILED if unread else 0


if __name__ == "__main__":
    sys.exit(main())
