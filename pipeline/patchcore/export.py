"""The patch embedding exported to ONNX: what a bank carries so that scoring needs no torch.

At fit and extend time the whole :class:`~pipeline.patchcore.features.PatchEmbedding`
(normalisation, backbone, 3x3 pooling, bilinear resize, concatenation, projection) is
exported to ONNX; :func:`~pipeline.patchcore.bank.save_bank` writes the graph into the bank
as ``embedding.onnx`` and hashes it like every other bank file. Exports are cached as
``embedding-<key>.onnx`` under :func:`cache_dir`, where ``key`` hashes the backbone
weights' sha256, every setting that changes the graph, the source of the code that defines
it and the exporting library versions. A JSON record beside it holds the file's sha256; the
file is hashed before every use and exported again when it is missing, changed or
truncated. Nothing here needs the network. This module needs torch and timm (fitting);
running a graph needs only ONNX Runtime (:mod:`pipeline.patchcore.runtime`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pipeline.config import FeatureConfig, cache_root

from .runtime import OnnxEmbeddingError

logger = logging.getLogger(__name__)

#: ONNX opset of the export; 17 covers every op used and is read by all recent runtimes.
OPSET = 17
#: Bump when the export procedure itself changes (the graph's source is hashed separately).
EXPORT_VERSION = 1
#: The source files that define the exported graph: the embedding module and how weights are
#: loaded into the backbone. Their bytes are hashed into the cache key, so an edit to either
#: (a different pooling, say) can never reuse a stale export.
GRAPH_SOURCES = (Path(__file__).with_name("features.py"), Path(__file__).with_name("backbone.py"))


class OnnxExportError(OnnxEmbeddingError):
    """The embedding could not be exported to ONNX."""


@dataclasses.dataclass(frozen=True)
class CachedModel:
    """A serialised ONNX model and where it came from.

    Attributes:
        path: the cache file (the bytes below are what was verified, not re-read).
        data: the model bytes.
        sha256: hex sha256 of ``data``.
        status: ``"hit"`` (verified cache file), ``"exported"`` (no cache file yet) or
            ``"rebuilt"`` (the cache file did not match its record and was replaced).
    """

    path: Path
    data: bytes
    sha256: str
    status: str


def cache_dir() -> Path:
    """Directory of cached exports: ``onnx`` under :func:`pipeline.config.cache_root`
    (``$TRACEBANK_CACHE``, else ``~/.cache/tracebank``). Nothing is created here."""
    return cache_root() / "onnx"


def graph_source_sha256(paths: tuple[Path, ...] = GRAPH_SOURCES) -> str:
    """sha256 over the bytes of the files that define the exported graph, in order."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        digest.update(f"{path.name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def export_settings(config: FeatureConfig, weights_sha256: str) -> dict[str, Any]:
    """Everything that determines the exported graph, as a JSON-friendly dict.

    That is the backbone weights, every feature setting the graph depends on, the source
    of the code that builds it (:data:`GRAPH_SOURCES`) and the exporting library versions.
    """
    return {
        "graph_source_sha256": graph_source_sha256(),
        "weights_sha256": weights_sha256,
        "backbone": config.backbone,
        "levels": list(config.levels),
        "image_size": config.image_size,
        "normalization": config.normalization,
        "neighbourhood": config.neighbourhood,
        "padding": config.padding,
        "proj_dim": config.proj_dim,
        "opset": OPSET,
        "export_version": EXPORT_VERSION,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def cache_key(settings: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``settings``."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def export_embedding(module: nn.Module, image_size: int) -> bytes:
    """Export ``module`` (uint8 ``(B, 3, S, S)`` in, ``(B, h, w, D)`` out) to ONNX bytes.

    The batch axis is dynamic; the spatial size is fixed at ``image_size``. The same module
    and library versions give the same bytes (the bank id hashes them).

    Raises:
        OnnxExportError: if the exporter fails.

    Note:
        This uses the TorchScript-based exporter (``dynamo=False``). In torch 2.15 the
        default ``torch.export``-based exporter needs the separate ``onnxscript`` package,
        which is not a dependency; the legacy exporter traces this static graph (timm's
        TF-"same" padding resolves to constants at a fixed input size) and matches eager
        features to ~2e-5 absolute on values up to ~20. Its deprecation warnings are muted.
    """
    dummy = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            warnings.catch_warnings(),
            torch.inference_mode(False),
            torch.no_grad(),
        ):
            target = Path(tmp) / "embedding.onnx"
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module.eval(),
                (dummy,),
                target,
                dynamo=False,
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
            return target.read_bytes()
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways, all the same to us
        raise OnnxExportError(
            f"cannot export the feature embedding to ONNX ({type(exc).__name__}: {exc}); "
            "use features.runtime 'torch'"
        ) from exc


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_or_export(
    module: nn.Module, settings: Mapping[str, Any], directory: str | Path | None = None
) -> CachedModel:
    """The verified cached export for ``settings``, exporting ``module`` when needed.

    Args:
        module: the embedding to export on a cache miss.
        settings: from :func:`export_settings`; hashed into the file name and recorded.
        directory: cache directory (default :func:`cache_dir`).

    Returns:
        The model bytes that were hashed, so what runs is what was verified.

    Note:
        An unwritable cache directory is not fatal: the fresh export is used from memory
        and a warning says that the next start will export again.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    key = cache_key(settings)
    path = directory / f"embedding-{key}.onnx"
    record_path = path.with_suffix(".json")
    status = "exported"
    if path.is_file():
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        try:
            record = json.loads(record_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        if record.get("sha256") == digest and record.get("settings") == dict(settings):
            return CachedModel(path, data, digest, "hit")
        logger.warning(
            "ONNX cache file %s has sha256 %s..., its record says %s...; exporting it again",
            path, digest[:12], str(record.get("sha256"))[:12],
        )
        status = "rebuilt"
    data = export_embedding(module, int(settings["image_size"]))
    digest = hashlib.sha256(data).hexdigest()
    record_bytes = (json.dumps({"sha256": digest, "settings": dict(settings)}, indent=2) + "\n").encode()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        _write_atomic(record_path, record_bytes)
    except OSError as exc:
        logger.warning("cannot write ONNX cache %s (%s); using the export from memory", path, exc)
    return CachedModel(path, data, digest, status)
