"""ONNX Runtime execution of the patch embedding, from a verified on-disk export cache.

With ``features.runtime: onnx`` the whole :class:`~pipeline.patchcore.features.PatchEmbedding`
(normalisation, backbone, 3x3 pooling, bilinear resize, concatenation, projection) is
exported once to ONNX and run by ONNX Runtime on the CPU. The export is cached as
``embedding-<key>.onnx`` under :func:`cache_dir`, where ``key`` hashes the backbone weights'
sha256, every setting that changes the graph, the source of the code that defines it and
the exporting library versions. A JSON
record beside it holds the file's sha256; the file is hashed before every use and exported
again when it is missing, changed or truncated. Nothing here needs the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn

from pipeline.config import FeatureConfig, cache_root

logger = logging.getLogger(__name__)

#: ONNX opset of the export; 17 covers every op used and is read by all recent runtimes.
OPSET = 17
#: Bump when the export procedure itself changes (the graph's source is hashed separately).
EXPORT_VERSION = 1
#: The source files that define the exported graph: the embedding module and how weights are
#: loaded into the backbone. Their bytes are hashed into the cache key, so an edit to either
#: (a different pooling, say) can never reuse a stale export.
GRAPH_SOURCES = (Path(__file__).with_name("features.py"), Path(__file__).with_name("backbone.py"))


class OnnxExportError(RuntimeError):
    """The embedding could not be exported to ONNX or the export does not load."""


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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

    The batch axis is dynamic; the spatial size is fixed at ``image_size``.

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


def make_session(model: bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with all graph optimisations.

    Args:
        model: serialised ONNX model.
        threads: intra-op threads (default: ``torch.get_num_threads()``, so that a process
            or task that limits torch's threads limits these too).

    Note:
        Worker threads do not spin-wait after a run: in ``predict`` the faiss search runs
        right after the embedding on the same cores, and spinning threads would slow it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise OnnxExportError(f"ONNX Runtime cannot load the exported embedding: {exc}") from exc


class OnnxEmbedding:
    """Runs a cached ONNX export of the patch embedding.

    Args:
        session: a session over the exported model.
        image_size: side ``S`` of the square input the export was made for.
        model: the cached file the session was built from, when known.
    """

    def __init__(self, session: ort.InferenceSession, image_size: int, model: CachedModel | None = None) -> None:
        self.session = session
        self.image_size = image_size
        self.model = model
        self._input = session.get_inputs()[0].name
        self._single: OnnxEmbedding | None = None
        self._single_lock = threading.Lock()

    def single_threaded(self) -> OnnxEmbedding:
        """The same model on a session with one intra-op thread, which runs on its caller's
        thread: for worker threads that each embed part of a batch (built on first use).
        Without the model's bytes (a session handed in directly) this embedding itself."""
        if self.model is None:
            return self
        with self._single_lock:
            if self._single is None:
                self._single = OnnxEmbedding(make_session(self.model.data, 1), self.image_size, self.model)
            return self._single

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        config: FeatureConfig,
        weights_sha256: str,
        *,
        directory: str | Path | None = None,
        threads: int | None = None,
    ) -> OnnxEmbedding:
        """Export (or reuse the verified cached export of) ``module`` and open a session."""
        cached = load_or_export(module, export_settings(config, weights_sha256), directory)
        return cls(make_session(cached.data, threads), config.image_size, cached)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 pixels to ``(B, h, w, D)`` float32 features on the CPU.

        Raises:
            ValueError: if ``pixels`` is not uint8 of the exported size.
        """
        size = self.image_size
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"ONNX embedding expects (B, 3, {size}, {size}) uint8 pixels, got "
                f"{tuple(pixels.shape)} {pixels.dtype}; use FeatureExtractor.prepare_batch"
            )
        array = np.ascontiguousarray(pixels.cpu().numpy())
        (features,) = self.session.run(None, {self._input: array})
        return torch.from_numpy(features)
