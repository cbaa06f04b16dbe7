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
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig, ThresholdConfig, from_mapping, to_dict
from pipeline.data.datasets import Dataset, hold_out_calibration, open_dataset
from pipeline.data.synthetic import SyntheticConfig
from pipeline.data.synthetic_set import describe as describe_eval_set
from pipeline.data.synthetic_set import is_synthetic
from pipeline.data.validation import ValidationConfig, ValidationResult, validate_samples
from pipeline.patchcore.bank import update_manifest

from .gates import GateConfig, check_gates
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
                  metrics_dir: Path | None = None) -> dict[str, Any]:
    """Metrics, threshold, curves and the HTML report of the candidate bank; ``metrics.json``
    and ``plots/*.csv`` go to ``metrics_dir`` (default ``work``)."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.report import write_report
    from pipeline.patchcore.bank import load_bank

    start = time.perf_counter()
    model, manifest = load_bank(work / "candidate")
    settings, chosen_on = threshold_settings(model, params, dataset)
    result = evaluate(model, dataset.test, batch_size=params.batch_size, keep_maps=True, on_batch=on_batch,
                      **settings)
    result.metrics["threshold_chosen_on"] = chosen_on
    metrics = dict(result.metrics)
    metrics["seconds"] = time.perf_counter() - start
    eval_set = describe_eval_set(dataset)
    report = write_report(result, work / "report", title=f"bank {manifest['bank_id']} on {dataset.spec}",
                          threshold=metrics.get("threshold"), curves_dir=(metrics_dir or work) / "plots",
                          synthetic=eval_set)
    write_json_atomic(work / "evaluation.json", {"bank_id": manifest["bank_id"], "metrics": metrics,
                                                 "evaluation_set": eval_set, "report": str(report)})
    write_json_atomic((metrics_dir or work) / "metrics.json", {k: metrics.get(k) for k in METRIC_KEYS})
    return metrics


#: The metrics a lineage and ``metrics.json`` keep.
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro", "n_good", "n_defect", "f1", "false_reject_rate", "miss_rate")


def threshold_settings(model: PatchCore, params: Params, dataset: Dataset) -> tuple[dict[str, Any], str]:
    """The threshold arguments of :func:`~pipeline.evaluation.evaluate.evaluate` on ``dataset``'s
    test split, and which images the threshold is chosen on: the calibration split (scored
    here) when it has what ``threshold.method`` needs, else the test split itself."""
    from pipeline.evaluation.evaluate import evaluate
    method, target = params.threshold.method, params.threshold.target_false_reject
    calibration = dataset.calibration
    usable = any(s.label == 0 for s in calibration) and (method == "nominal" or any(s.label == 1 for s in calibration))
    if not usable:
        return {"threshold_method": method, "target_false_reject": target}, "test split"
    metrics = evaluate(model, calibration, batch_size=params.batch_size, keep_maps=False,
                       threshold_method=method, target_false_reject=target).metrics
    chosen_on = f"calibration split ({metrics['n_good']} good, {metrics['n_defect']} defective)"
    return {"fixed_threshold": (metrics["threshold"], metrics["threshold_method"])}, chosen_on


def production_metrics(registry: Registry, dataset: Dataset, params: Params) -> dict[str, Any] | None:
    """Metrics of the production bank on the same evaluation set (re-evaluated, so the
    comparison is on identical images), or None when there is no production bank."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.patchcore.bank import load_bank

    pointer = registry.production()
    if pointer is None:
        return None
    model, _ = load_bank(registry.bank_dir("production"))
    return evaluate(model, dataset.test, batch_size=params.batch_size, keep_maps=True,
                    **threshold_settings(model, params, dataset)[0]).metrics


def gate_step(work: Path, params: Params, production: dict[str, Any] | None) -> dict[str, Any]:
    evaluation = json.loads((work / "evaluation.json").read_text())
    result = check_gates(evaluation["metrics"], params.gates, production,
                         synthetic=evaluation.get("evaluation_set") is not None)
    result["production_metrics"] = production
    write_json_atomic(work / "gate.json", result)
    return result


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """Commit of the code that made a bank and whether the tree had uncommitted changes."""
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = run("rev-parse", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"git_commit": commit or None, "git_dirty": dirty}


def commit_data_pointer(paths: list[str | Path], message: str, root: str | Path = ".") -> str | None:
    """Commit exactly ``paths`` (DVC's pointer files) to git, leaving everything else staged
    or not as it was; returns the new commit, or None when nothing changed.

    Raises:
        RuntimeError: not a git checkout, or git refused (the message is git's).
    """
    present = [str(p) for p in paths if (Path(root) / p).is_file()]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    if not present:
        return None
    if git("rev-parse", "--git-dir").returncode != 0:
        raise RuntimeError(f"retrain.git_commit is true but {Path(root).resolve().name} is not a git checkout")
    if not git("status", "--porcelain", "--", *present).stdout.strip():
        return None
    done = git("commit", "--only", "-m", message, "--", *present)
    if done.returncode != 0 and "did not match" in done.stderr:  # never added: add, then commit only them
        git("add", "--", *present)
        done = git("commit", "--only", "-m", message, "--", *present)
    if done.returncode != 0:
        raise RuntimeError(f"git commit of {', '.join(present)} failed: {(done.stderr or done.stdout).strip()}")
    return git("rev-parse", "HEAD").stdout.strip() or None


def files_data_hash(files: list[dict[str, str]]) -> str | None:
    """A hash of a bank's training files (names relative to their common folder, and contents
    by sha256), for banks whose data DVC does not track."""
    if not files:
        return None
    paths = [Path(f["path"]) for f in files]
    common = Path(os.path.commonpath([str(p.parent) for p in paths])) if len(paths) > 1 else paths[0].parent
    rows = sorted([p.relative_to(common).as_posix() if p.is_relative_to(common) else p.name, f["sha256"]]
                  for p, f in zip(paths, files, strict=True))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def dvc_data_hash(dvc_file: str | Path = "data.dvc") -> str | None:
    """The md5 DVC records for the tracked data (``outs[0].md5`` of ``data.dvc``)."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


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
    threshold = None
    if metrics.get("threshold") is not None:
        threshold = {"value": metrics["threshold"], "method": metrics["threshold_method"], "evaluated_on": params.data,
                     "chosen_on": metrics.get("threshold_chosen_on"),
                     "target_false_reject": params.threshold.target_false_reject}
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
        "report": evaluation.get("report"),
        "status": "candidate" if gate["passed"] else "rejected",
        "promoted_at": None,
    }
    bank_id = registry.register(staging, lineage)
    return {"bank_id": bank_id, "status": lineage["status"], "gates": gate, "bank_dir": str(registry.root / bank_id)}


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
