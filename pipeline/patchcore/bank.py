"""Bank artifacts: memory bank + faiss index + embedding graph + a JSON manifest that makes them traceable.

A bank directory holds ``memory_bank.npy`` (``np.save``, no pickle), ``index.faiss`` and
``index.json`` (see :mod:`pipeline.patchcore.index`), ``embedding.onnx`` (the ONNX graph of
the whole patch embedding, exported at fit time: scoring needs no torch) and
``manifest.json``: backbone and weights sha256, every parameter, the training files with their
sha256, metrics when known, library versions and the sha256 of every artifact file. The bank
id is a content hash over the parts that define the model; loading recomputes every hash and
refuses a mismatch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import __version__
from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig, from_mapping, to_dict
from pipeline.hashing import sha256_file

from .backbone import packaged_weights_path
from .runtime import GRAPH_FILE

if TYPE_CHECKING:  # the model (faiss, ONNX Runtime) loads with a bank, not to read or verify a manifest
    from .model import PatchCore

#: /3: the bank carries its embedding's ONNX graph (``embedding.onnx``, in ``files``).
FORMAT = "tracebank-bank/3"
#: Formats this version reads: /1 banks hashed machine-specific paths into their id (kept
#: readable with their own id rule so registered banks stay valid); /1 and /2 banks carry no
#: graph, which is exported from the backbone when torch and timm are installed.
READABLE_FORMATS = ("tracebank-bank/1", "tracebank-bank/2", FORMAT)
MANIFEST = "manifest.json"
#: Manifest sections covered by the bank id; metrics and threshold may be added later.
_IDENTITY_KEYS = ("format", "backbone", "params", "training", "files")


class BankError(RuntimeError):
    """A bank directory is missing, incomplete or does not match its manifest."""


def file_records(paths: Iterable[str | Path]) -> list[dict[str, str]]:
    """``[{"path": ..., "sha256": ...}]`` for training-data provenance."""
    return [{"path": str(p), "sha256": sha256_file(p)} for p in paths]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def bank_id_of(manifest: Mapping[str, Any]) -> str:
    """Content hash identifying a bank: 16 hex digits of sha256 over what made it.

    That is the weights (by sha256), the settings, the training images (by sha256) and the
    artifact files (by sha256); nothing machine-specific: no path of the weights, the data
    or the checkout, no time, host or device. The same data and params fitted from two
    checkouts, or through DVC and through Prefect, give the same id.
    """
    if manifest.get("format") == "tracebank-bank/1":
        return hashlib.sha256(_canonical({k: manifest[k] for k in _IDENTITY_KEYS})).hexdigest()[:16]
    return hashlib.sha256(_canonical(identity(manifest))).hexdigest()[:16]


def identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The machine-independent part of a manifest that :func:`bank_id_of` hashes."""
    backbone = {k: v for k, v in manifest["backbone"].items() if k != "weights_source"}
    params = json.loads(json.dumps(manifest["params"]))
    features = params.get("features", {})
    features.pop("device", None)
    if features.get("weights") not in (None, "default", "hub"):
        features["weights"] = "file"  # which file is told by backbone.weights_sha256
    training = manifest["training"]
    return {
        "format": manifest["format"],
        "backbone": backbone,
        "params": params,
        "training": {
            "images_sha256": sorted(f["sha256"] for f in training.get("files", [])),
            "n_skipped": len(training.get("skipped", [])),
        },
        "files": manifest["files"],
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    import faiss

    return {
        "tracebank": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "timm": _version("timm"),
        "faiss": faiss.__version__,
        "onnxruntime": _version("onnxruntime"),
    }


def save_bank(
    directory: str | Path,
    model: PatchCore,
    *,
    training: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    threshold: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a fitted model as a bank directory, atomically (temp dir, then rename).

    Args:
        directory: target; must not exist yet.
        model: a fitted :class:`~pipeline.patchcore.model.PatchCore`.
        training: provenance, e.g. ``{"spec": ..., "files": file_records(...)}``.
        metrics: evaluation results, when known.
        threshold: ``{"value": float, "method": str, ...}``, when known.

    Returns:
        The manifest written, including ``bank_id``.
    """
    model._check_fitted()
    directory = Path(directory)
    if directory.exists():
        raise BankError(f"{directory} already exists; banks are immutable, choose a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        np.save(staging / "memory_bank.npy", model.memory_bank_, allow_pickle=False)
        model.index_.save(staging)
        (staging / GRAPH_FILE).write_bytes(model.extractor.graph())
        backbone = model.extractor.backbone
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "backbone": {
                "name": model.features.backbone,
                "levels": list(model.features.levels),
                "weights_source": backbone.weights_source,
                "weights_sha256": backbone.weights_sha256,
                "channels": list(backbone.channels),
                "strides": list(backbone.strides),
            },
            "params": {
                "features": to_dict(model.features),
                "coreset": to_dict(model.coreset),
                "scoring": to_dict(model.scoring),
            },
            "training": dict(training),
            "files": {
                name: sha256_file(staging / name)
                for name in ("memory_bank.npy", "index.faiss", "index.json", GRAPH_FILE)
            },
        }
        manifest["bank_id"] = bank_id_of(manifest)
        manifest["bank_size"] = int(len(model.memory_bank_))
        manifest["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        manifest["versions"] = _versions()
        manifest["metrics"] = dict(metrics) if metrics else None
        manifest["threshold"] = dict(threshold) if threshold else None
        write_json_atomic(staging / MANIFEST, manifest)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_manifest(directory: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read ``manifest.json`` and (by default) check every artifact hash and the bank id.

    Raises:
        BankError: naming the file that is missing or whose hash does not match.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BankError(f"{path} not found; {directory} is not a tracebank bank")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankError(f"{path} is not valid JSON ({exc}); the bank is corrupt") from exc
    if manifest.get("format") not in READABLE_FORMATS:
        raise BankError(f"{path}: format {manifest.get('format')!r}, expected one of {', '.join(READABLE_FORMATS)}")
    if verify:
        for name, expected in manifest["files"].items():
            file = directory / name
            if not file.is_file():
                raise BankError(f"{file} is missing; the bank is incomplete")
            actual = sha256_file(file)
            if actual != expected:
                raise BankError(
                    f"{file} has sha256 {actual[:12]}... but the manifest records {expected[:12]}...; "
                    "the file was changed or truncated: do not use this bank, refit or restore it"
                )
        if bank_id_of(manifest) != manifest.get("bank_id"):
            raise BankError(f"{path}: contents do not match bank id {manifest.get('bank_id')}; the manifest was edited")
    return manifest


def update_manifest(directory: str | Path, **fields: Any) -> dict[str, Any]:
    """Set non-identity fields (``metrics``, ``threshold``) of a verified bank's manifest."""
    bad = set(fields) & set(_IDENTITY_KEYS + ("bank_id",))
    if bad:
        raise BankError(f"cannot change identity field(s) {sorted(bad)} of an existing bank")
    manifest = read_manifest(directory)
    manifest.update(fields)
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


def load_bank(
    directory: str | Path, *, device: str | None = None, runtime: str | None = None
) -> tuple[PatchCore, dict[str, Any]]:
    """Load a bank, verifying every hash.

    By default the features are computed by the bank's own ONNX graph (``embedding.onnx``)
    on ONNX Runtime: no torch or timm. A bank from before the graph was carried (formats
    /1 and /2) is run as it was then, from the backbone weights (their hash checked too),
    which needs torch and timm.

    Args:
        directory: the bank directory.
        device: run the features on this device (a device other than the CPU runs them with
            eager PyTorch unless ``runtime`` says otherwise).
        runtime: ``"torch"`` or ``"onnx"``: rebuild the embedding from the backbone weights
            and run it eagerly or through its cached ONNX export, as fitting does (needs torch
            and timm; banks written before the setting existed default to ``"torch"``).

    Returns:
        The fitted model and its manifest.

    Raises:
        BankError: a hash does not match, or the bank needs torch and timm, which are absent.
    """
    from .index import NNIndex
    from .model import PatchCore

    directory = Path(directory)
    manifest = read_manifest(directory)
    params = manifest["params"]
    feature_values = dict(params["features"])
    feature_values.setdefault("padding", "exclude")  # banks from before features.padding pooled so
    scoring_values = dict(params["scoring"])
    scoring_values.setdefault("image_score", "eq7")  # banks from before scoring.image_score scored so
    carries_graph = manifest["format"] == FORMAT and GRAPH_FILE in manifest["files"]
    use_graph = runtime is None and device in (None, "cpu") and carries_graph
    if device is not None:
        feature_values["device"] = device
        if device != "cpu" and runtime is None:
            runtime = "torch"  # ONNX Runtime runs the features on the CPU only
    if runtime is not None:
        feature_values["runtime"] = runtime
    elif use_graph:
        feature_values["device"] = "cpu"  # the graph runs on the CPU, whatever the fit ran on
    features = from_mapping(FeatureConfig, f"{directory}: params.features", feature_values)
    coreset = from_mapping(CoresetConfig, f"{directory}: params.coreset", params["coreset"])
    scoring = from_mapping(ScoringConfig, f"{directory}: params.scoring", scoring_values)
    if use_graph:
        model = PatchCore(features, coreset, scoring, extractor=_graph_extractor(directory, manifest, features))
    else:
        _require_torch(directory, manifest)
        model = PatchCore(features, coreset, scoring)
        expected = manifest["backbone"]["weights_sha256"]
        if model.extractor.backbone.weights_sha256 != expected:
            source = features.weights if features.weights != "default" else packaged_weights_path(features.backbone)
            raise BankError(
                f"backbone weights {source} have sha256 {model.extractor.backbone.weights_sha256[:12]}... "
                f"but bank {manifest['bank_id']} was fitted with {expected[:12]}...; install the same weights"
            )
    bank = np.load(directory / "memory_bank.npy", allow_pickle=False)
    model.set_bank(bank, NNIndex.load(directory))
    return model, manifest


def _graph_extractor(directory: Path, manifest: Mapping[str, Any], features: FeatureConfig) -> Any:
    """The bank's ONNX graph, hashed again as read: what runs is what the manifest names."""
    from .runtime import BackboneRecord, BankGraph, GraphExtractor, OnnxEmbeddingError

    path = directory / GRAPH_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BankError(f"{path} cannot be read ({exc}); the bank is incomplete") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["files"][GRAPH_FILE]:
        raise BankError(f"{path} has sha256 {digest[:12]}... but the manifest records "
                        f"{manifest['files'][GRAPH_FILE][:12]}...; the file was changed: do not use this bank")
    record = manifest["backbone"]
    backbone = BackboneRecord(str(record["weights_source"]), str(record["weights_sha256"]),
                              tuple(int(c) for c in record["channels"]), tuple(int(s) for s in record["strides"]))
    try:
        return GraphExtractor(features, BankGraph(data, digest), backbone)
    except OnnxEmbeddingError as exc:
        raise BankError(f"bank {manifest['bank_id']} in {directory}: {exc}") from exc


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses it, a module without a spec
        return False


def _require_torch(directory: Path, manifest: Mapping[str, Any]) -> None:
    """A bank run from its backbone weights needs torch and timm: say so, and what to do."""
    missing = [name for name in ("torch", "timm") if not _installed(name)]
    if not missing:
        return
    if manifest["format"] == FORMAT and GRAPH_FILE in manifest["files"]:
        reason = "its features were asked of the backbone (a runtime or a GPU device was named)"
        fix = "load it without runtime or device to score with its ONNX graph"
    else:
        reason = (f"it is a {manifest['format']} bank, written before banks carried the ONNX graph of their "
                  f"embedding ({GRAPH_FILE}), so its features can only be computed from the backbone")
        fix = ("extend or refit it with this version (`tracebank fit --extend`), whose banks carry the graph, "
               "or load it where tracebank's fitting dependencies are installed")
    raise BankError(f"bank {manifest['bank_id']} in {directory} needs {' and '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not installed: {reason}; {fix}")
