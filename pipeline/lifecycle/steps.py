"""The training run as steps over a work directory: validate, extract, coreset, evaluate,
gate, register. ``dvc.yaml`` (through ``flows/dvc_stage.py``) and the Prefect flow call
these same functions with the same settings from ``params.yaml``.

Work directory (``runs/`` by default)::

    validate/validation.json, gx/.../index.html   data checks and their Data Docs
    features/features.npy, features.json          streamed patch features of the nominal set
    candidate/                                    the fitted bank (no metrics yet)
    evaluation.json, metrics.json, plots/*.csv    metrics, threshold and curves
    report/report.html                            curves and worst-case heatmaps
    gate.json                                     gate results against floors and production
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig, ThresholdConfig, from_mapping, to_dict
from pipeline.data.datasets import Dataset, hold_out_calibration, open_dataset
from pipeline.data.importer import dataset_name
from pipeline.data.synthetic import SyntheticConfig
from pipeline.data.synthetic_set import describe as describe_eval_set
from pipeline.data.synthetic_set import is_synthetic
from pipeline.data.validation import ValidationConfig, ValidationResult, validate_samples
from pipeline.hashing import sha256_file
from pipeline.patchcore.bank import update_manifest

from .gates import GateConfig, check_gates, judge
from .provenance import files_data_hash, git_state
from .registry import Registry, write_json_atomic
from .retrain import RetrainConfig

if TYPE_CHECKING:  # torch, timm, faiss, scikit-learn load in the steps using them, not for a run with nothing to do
    from pipeline.patchcore.model import PatchCore


class ValidationFailed(RuntimeError):
    """The data did not pass validation; no training was done."""

    def __init__(self, result: ValidationResult) -> None:
        super().__init__(result.summary())
        self.result = result


@dataclasses.dataclass(frozen=True)
class Params:
    """All settings of a run, one frozen section each, from ``params.yaml``."""

    data: str
    features: FeatureConfig
    coreset: CoresetConfig
    scoring: ScoringConfig
    gates: GateConfig
    validation: ValidationConfig
    batch_size: int = 8
    synthetic: SyntheticConfig = SyntheticConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    retrain: RetrainConfig = RetrainConfig()

    @classmethod
    def load(cls, path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        raw.update(overrides or {})
        known = {"data", "features", "coreset", "scoring", "gates", "validation", "batch_size", "synthetic",
                 "threshold", "retrain"}
        unknown = sorted(set(raw) - known)
        if unknown:
            from pipeline.config import ConfigError

            raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(
            data=str(raw.get("data", "mvtec:data")),
            features=from_mapping(FeatureConfig, f"{path}: features", raw.get("features")),
            coreset=from_mapping(CoresetConfig, f"{path}: coreset", raw.get("coreset")),
            scoring=from_mapping(ScoringConfig, f"{path}: scoring", raw.get("scoring")),
            gates=from_mapping(GateConfig, f"{path}: gates", raw.get("gates")),
            validation=from_mapping(ValidationConfig, f"{path}: validation", raw.get("validation")),
            batch_size=int(raw.get("batch_size", 8)),
            synthetic=from_mapping(SyntheticConfig, f"{path}: synthetic", raw.get("synthetic")),
            threshold=from_mapping(ThresholdConfig, f"{path}: threshold", raw.get("threshold")),
            retrain=from_mapping(RetrainConfig, f"{path}: retrain", raw.get("retrain")),
        )

    def dataset(self) -> Dataset:
        """The dataset ``data`` names (``synthetic:`` specs built with the ``synthetic`` settings),
        with its calibration split held out (``threshold.calibration``)."""
        dataset = open_dataset(self.data, self.synthetic)
        return hold_out_calibration(dataset, self.threshold.calibration,
                                    defects=self.threshold.method == "f1" and dataset.synthetic is None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "features": to_dict(self.features),
            "coreset": to_dict(self.coreset),
            "scoring": to_dict(self.scoring),
            "gates": dataclasses.asdict(self.gates),
            "validation": dataclasses.asdict(self.validation),
            "batch_size": self.batch_size,
            "synthetic": self.synthetic.as_dict(),
            "threshold": dataclasses.asdict(self.threshold),
            "retrain": dataclasses.asdict(self.retrain),
        }


def validate_step(dataset: Dataset, config: ValidationConfig, work: Path) -> ValidationResult:
    """Check the images; raises :class:`ValidationFailed` (after writing the report)."""
    result = validate_samples(dataset.train + dataset.calibration, dataset.test, config, work / "validate")
    if not result.success:
        raise ValidationFailed(result)
    return result


def extract_step(dataset: Dataset, params: Params, work: Path, on_batch: Any = None) -> dict[str, Any]:
    from pipeline.lifecycle.stages import extract_features
    from pipeline.patchcore.features import FeatureExtractor

    start = time.perf_counter()
    target = work / "features"
    shutil.rmtree(target, ignore_errors=True)
    store = extract_features(dataset.train, FeatureExtractor(params.features), target,
                             batch_size=params.batch_size, on_batch=on_batch)
    return {"rows": store.rows, "n_images": len(store.files), "skipped": store.skipped,
            "seconds": time.perf_counter() - start}


def coreset_step(params: Params, work: Path, spec: str, on_centres: Any = None) -> dict[str, Any]:
    """Select the memory bank from the stored features and save it as ``work/candidate``."""
    from pipeline.lifecycle.stages import FeatureStore, training_record
    from pipeline.patchcore.bank import save_bank
    from pipeline.patchcore.model import PatchCore

    start = time.perf_counter()
    store = FeatureStore.open(work / "features")
    model = PatchCore(params.features, params.coreset, params.scoring)
    model.fit_features(store.array(), on_centres=on_centres)
    target = work / "candidate"
    shutil.rmtree(target, ignore_errors=True)
    manifest = save_bank(target, model, training=training_record(spec, store))
    return {"bank_id": manifest["bank_id"], "bank_size": manifest["bank_size"],
            "seconds": time.perf_counter() - start}


def evaluate_step(dataset: Dataset, work: Path, params: Params, on_batch: Any = None,
                  metrics_dir: Path | None = None, production: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics, threshold, curves and the HTML report of the candidate bank; ``metrics.json``
    and ``plots/*.csv`` go to ``metrics_dir`` (default ``work``). ``production`` (from
    :func:`production_metrics`, on the same images) is kept in ``evaluation.json`` for the
    gates and shown in the report beside the candidate."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.report import write_report
    from pipeline.patchcore.bank import load_bank

    start = time.perf_counter()
    model, manifest = load_bank(work / "candidate")
    settings, chosen_on, estimated = threshold_settings(model, params, dataset)
    result = evaluate(model, dataset.test, batch_size=params.batch_size, keep_maps=True, on_batch=on_batch,
                      **settings)
    result.metrics["threshold_chosen_on"] = chosen_on
    result.metrics |= {f"threshold_{k}": v for k, v in estimated.items()}
    metrics = dict(result.metrics)
    metrics["seconds"] = time.perf_counter() - start
    eval_set = describe_eval_set(dataset)
    per_image = {"labels": [int(s.label) for s in result.samples], "scores": [float(x) for x in result.scores]}
    evaluation = {"bank_id": manifest["bank_id"], "metrics": metrics, "evaluation_set": eval_set,
                  "per_image": per_image, "production": production}
    gates = judge(evaluation, params.gates)
    shown = None if production is None else {
        "bank_id": production["bank_id"], "threshold": production.get("threshold"), "scores": production["scores"],
        "metrics": {k: v for k, v in production.items() if k != "scores"}}
    info = {"value": metrics.get("threshold"), "method": metrics.get("threshold_method"), "chosen_on": chosen_on,
            "n_calibration": metrics.get("threshold_n_calibration"), "ci": metrics.get("threshold_ci")}
    report = write_report(result, work / "report", title=f"bank {manifest['bank_id']}",
                          dataset=dataset_name(params.data),
                          threshold=metrics.get("threshold"), curves_dir=(metrics_dir or work) / "plots",
                          synthetic=eval_set, threshold_info=info, production=shown, gates=gates)
    write_json_atomic(work / "evaluation.json", evaluation | {"report": str(report), "gates": gates})
    write_json_atomic((metrics_dir or work) / "metrics.json", {k: metrics.get(k) for k in METRIC_KEYS})
    return metrics


#: The folder of a bank's directory that holds the report of its registration.
REPORT_DIR = "report"

#: The metrics a lineage and ``metrics.json`` keep.
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro", "n_good", "n_defect", "f1", "false_reject_rate", "miss_rate")


def threshold_settings(model: PatchCore, params: Params,
                       dataset: Dataset) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The threshold arguments of :func:`~pipeline.evaluation.evaluate.evaluate` on ``dataset``'s
    test split, which images the threshold is chosen on (the calibration split, scored here,
    when it has what ``threshold.method`` needs, else the test split itself), and what the
    lineage records of the estimate: ``estimator``, ``n_calibration`` and its interval ``ci``."""
    import numpy as np

    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.threshold import estimate

    method, target = params.threshold.method, params.threshold.target_false_reject
    calibration = dataset.calibration
    usable = any(s.label == 0 for s in calibration) and (method == "nominal" or any(s.label == 1 for s in calibration))
    if not usable:
        return {"threshold_method": method, "target_false_reject": target}, "test split", {}
    scored = evaluate(model, calibration, batch_size=params.batch_size, keep_maps=False,
                      threshold_method=method, target_false_reject=target)
    metrics = scored.metrics
    chosen_on = f"calibration split ({metrics['n_good']} good, {metrics['n_defect']} defective)"
    if method != "nominal":
        return {"fixed_threshold": (metrics["threshold"], metrics["threshold_method"])}, chosen_on, {}
    estimator = params.threshold.estimator
    found = estimate(scored.scores[scored.labels == 0], target, estimator)
    name = metrics["threshold_method"] if estimator == "quantile" else f"nominal_{estimator}_{1 - target:g}"
    ci = [float(x) if np.isfinite(x) else None for x in found["ci"]]  # None: unbounded with so few images
    info = {"estimator": estimator, "n_calibration": found["n_calibration"], "ci": ci}
    return {"fixed_threshold": (found["value"], name)}, chosen_on, info


def production_metrics(registry: Registry, dataset: Dataset, params: Params) -> dict[str, Any] | None:
    """The production bank on the candidate's test images, deciding at its own recorded
    threshold (the one the line runs on), or None when there is no production bank. Keys:
    the metrics, ``bank_id``, ``threshold``, ``threshold_source`` and the per-image
    ``scores`` (the order of ``dataset.test``)."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.patchcore.bank import load_bank

    pointer = registry.production()
    if pointer is None:
        return None
    model, manifest = load_bank(registry.bank_dir("production"))
    own = (manifest.get("threshold") or {}).get("value")
    if own is not None:
        settings: dict[str, Any] = {"fixed_threshold": (float(own), manifest["threshold"].get("method") or "recorded")}
        source = "its own recorded threshold"
    else:  # a bank registered without one: chosen now, as the candidate's is
        settings, source = threshold_settings(model, params, dataset)[0], "chosen now (none recorded)"
    result = evaluate(model, dataset.test, batch_size=params.batch_size, keep_maps=True, **settings)
    return dict(result.metrics) | {"bank_id": manifest["bank_id"], "threshold_source": source,
                                   "scores": [float(x) for x in result.scores]}


def gate_step(work: Path, params: Params) -> dict[str, Any]:
    """Judge the candidate of ``evaluation.json`` (see :func:`judge`) into ``gate.json``."""
    result = judge(json.loads((work / "evaluation.json").read_text()), params.gates)
    write_json_atomic(work / "gate.json", result)
    return result


def register_step(
    work: Path, params: Params, registry: Registry, *, data_hash: str | None, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Finalise the candidate (metrics + threshold in its manifest) and add it to the
    registry as ``candidate`` (gates passed) or ``rejected`` (with the reasons)."""
    evaluation = json.loads((work / "evaluation.json").read_text())
    gate = json.loads((work / "gate.json").read_text())
    metrics = evaluation["metrics"]
    staging = work / "package"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(work / "candidate", staging)
    report = None
    if evaluation.get("report") and Path(evaluation["report"]).is_file():  # kept with the bank, never rewritten
        shutil.copytree(Path(evaluation["report"]).parent, staging / REPORT_DIR, symlinks=False)
        report = {"path": f"{REPORT_DIR}/{Path(evaluation['report']).name}",
                  "sha256": {p.relative_to(staging).as_posix(): sha256_file(p)
                             for p in sorted((staging / REPORT_DIR).rglob("*")) if p.is_file()}}
    threshold = None
    if metrics.get("threshold") is not None:
        threshold = {"value": metrics["threshold"], "method": metrics["threshold_method"], "evaluated_on": params.data,
                     "chosen_on": metrics.get("threshold_chosen_on"),
                     "target_false_reject": params.threshold.target_false_reject,
                     **{k: metrics[f"threshold_{k}"] for k in ("estimator", "n_calibration", "ci")
                        if f"threshold_{k}" in metrics}}
    manifest = update_manifest(staging, metrics=metrics, threshold=threshold)
    training = manifest["training"]
    lineage = {
        "data_hash": data_hash if data_hash is not None else files_data_hash(training["files"]),
        "data_hash_kind": "dvc-md5" if data_hash is not None else "files-sha256",
        "data_spec": params.data,
        "files": training["files"],
        "fit": {"fit": training.get("fit", "full"), "parent_bank": training.get("parent_bank"),
                "increments": int(training.get("increments") or 0), "n_added": len(training.get("added_files") or [])},
        "added_files": training.get("added_files", []),
        **({"distributed": training["distributed"]} if training.get("distributed") else {}),
        "eval_files": len(params.dataset().test),
        "evaluation_set": evaluation.get("evaluation_set"),
        **git_state(),
        "params": params.as_dict(),
        "metrics": {k: metrics.get(k) for k in METRIC_KEYS},
        "threshold": threshold,
        "operating_point": {k: metrics.get(k) for k in ("false_reject_rate", "miss_rate", "f1")}
        | {"measured_on": "test split"},
        "gates": gate,
        "timings": timings or {},
        "report": report,
        "status": "candidate" if gate["passed"] else "rejected",
        "promoted_at": None,
    }
    bank_id = registry.register(staging, lineage)
    kept = registry.root / bank_id / REPORT_DIR / "report.html"  # this run's, or the first registration's
    return {"bank_id": bank_id, "status": lineage["status"], "gates": gate, "bank_dir": str(registry.root / bank_id),
            "report": str(kept) if kept.is_file() else evaluation.get("report")}


def register_fitted_bank(
    bank_dir: str | Path, registry: Registry, gates: GateConfig, *, data: str | None = None, batch_size: int = 8,
) -> dict[str, Any]:
    """Bring a bank fitted outside the pipeline (``tracebank fit``) into the registry.

    The bank is verified and copied (never moved) into the registry with a lineage record
    built from its manifest, judged by the gates, and registered as candidate or rejected,
    so that it can be promoted and served like a pipeline bank.

    Args:
        bank_dir: the fitted bank.
        registry: where to register it.
        gates: the floors it must reach (non-regression against production applies when
            ``data`` is given: production is evaluated on the same images).
        data: a dataset spec whose test split (labelled defects, or held-out good images)
            evaluates the bank and sets its threshold; without it the bank must already
            have both from ``tracebank fit``.

    Raises:
        ValueError: if the bank has no threshold and no ``data`` was given.
    """
    from pipeline.evaluation.evaluate import default_method, evaluate
    from pipeline.patchcore.bank import load_bank, read_manifest

    manifest = read_manifest(bank_dir)
    metrics, threshold = manifest.get("metrics"), manifest.get("threshold")
    production = None
    if data is not None:
        dataset = open_dataset(data)
        if not dataset.test:
            raise ValueError(f"{data} has no test images to evaluate and calibrate bank {manifest['bank_id']} on")
        model, _ = load_bank(bank_dir)
        method = default_method(dataset.synthetic is not None)
        metrics = evaluate(model, dataset.test, batch_size=batch_size, keep_maps=False,
                           threshold_method=method).metrics
        threshold = None if metrics.get("threshold") is None else {
            "value": metrics["threshold"], "method": metrics["threshold_method"], "evaluated_on": data}
        if registry.production() is not None:
            current, _ = load_bank(registry.bank_dir("production"))
            production = evaluate(current, dataset.test, batch_size=batch_size, keep_maps=False,
                                  threshold_method=method).metrics
    if threshold is None:
        raise ValueError(
            f"bank {manifest['bank_id']} has no decision threshold, so it could not decide anything: "
            f"`tracebank register {bank_dir} --data SPEC` evaluates it on SPEC's test split and sets one"
        )
    gate = check_gates(metrics or {}, gates, production, synthetic=data is not None and is_synthetic(data))
    staging = Path(tempfile.mkdtemp(prefix=".register-", dir=registry.root if registry.root.is_dir() else None))
    try:
        copy = staging / "bank"
        shutil.copytree(bank_dir, copy)
        update_manifest(copy, metrics=metrics, threshold=threshold)
        training = manifest["training"]
        lineage = {
            "data_hash": files_data_hash(training.get("files", [])),
            "data_hash_kind": "files-sha256",
            "data_spec": training.get("spec"),
            "files": training.get("files", []),
            "eval_files": (metrics or {}).get("n_good", 0) + (metrics or {}).get("n_defect", 0),
            **git_state(),
            "params": manifest["params"] | {"gates": dataclasses.asdict(gates)},
            "metrics": {k: (metrics or {}).get(k) for k in METRIC_KEYS},
            "threshold": threshold,
            "gates": gate | {"production_metrics": production},
            "status": "candidate" if gate["passed"] else "rejected",
            "promoted_at": None,
        }
        bank_id = registry.register(copy, lineage)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"bank_id": bank_id, "status": lineage["status"], "gates": gate, "threshold": threshold,
            "bank_dir": str(registry.root / bank_id)}
