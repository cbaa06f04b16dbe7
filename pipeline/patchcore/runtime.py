"""ONNX Runtime execution of the patch embedding: the scoring path, with no torch in it.

A bank carries the ONNX graph of its whole embedding (normalisation, backbone, 3x3 pooling,
bilinear resize, concatenation, projection: everything before the nearest-neighbour search)
as ``embedding.onnx``, exported at fit time by :mod:`pipeline.patchcore.export` and hashed
in its manifest. :class:`GraphExtractor` runs that graph on numpy arrays, so loading a bank
and scoring images needs onnxruntime, numpy and PIL, not torch or timm. The same
:class:`OnnxEmbedding` also runs the cached export of ``features.runtime: onnx`` while fitting.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from pipeline.config import FeatureConfig

from .geometry import Placement, prepare_batch

#: The bank file holding the graph.
GRAPH_FILE = "embedding.onnx"


class OnnxEmbeddingError(RuntimeError):
    """An ONNX graph of the embedding cannot be made or loaded."""


class ModelBytes(Protocol):
    """Where a graph's bytes came from: a bank file or a cached export."""

    @property
    def data(self) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class BankGraph:
    """A bank's verified graph: ``data`` is what was hashed, ``sha256`` its digest."""

    data: bytes
    sha256: str


@dataclasses.dataclass(frozen=True)
class BackboneRecord:
    """What a bank's manifest says of the backbone its graph was exported from.

    Attributes:
        weights_source, weights_sha256: as :class:`~pipeline.patchcore.backbone.Backbone`.
        channels, strides: of each returned level, finest first.
    """

    weights_source: str
    weights_sha256: str
    channels: tuple[int, ...]
    strides: tuple[int, ...]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def thread_budget() -> int:
    """Threads the embedding and the search may use: ``torch.get_num_threads()`` where torch
    is loaded already (so that a fitting task that limits torch limits these too), else the
    available cores. torch is never imported for this."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    return available_cores()


def make_session(model: bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with all graph optimisations.

    Args:
        model: serialised ONNX model.
        threads: intra-op threads (default :func:`thread_budget`).

    Raises:
        OnnxEmbeddingError: if ONNX Runtime cannot load ``model``.

    Note:
        Worker threads do not spin-wait after a run: in ``predict`` the faiss search runs
        right after the embedding on the same cores, and spinning threads would slow it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or thread_budget()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise OnnxEmbeddingError(f"ONNX Runtime cannot load the embedding graph: {exc}") from exc


class OnnxEmbedding:
    """Runs an ONNX graph of the patch embedding.

    Args:
        session: a session over the graph.
        image_size: side ``S`` of the square input the graph was exported for.
        model: where the graph's bytes came from (a bank file or a cached export), when known.
    """

    def __init__(self, session: ort.InferenceSession, image_size: int, model: ModelBytes | None = None) -> None:
        self.session = session
        self.image_size = image_size
        self.model = model
        self._input = session.get_inputs()[0].name
        self._single: OnnxEmbedding | None = None
        self._single_lock = threading.Lock()

    def single_threaded(self) -> OnnxEmbedding:
        """The same graph on a session with one intra-op thread, which runs on its caller's
        thread: for worker threads that each embed part of a batch (built on first use).
        Without the graph's bytes (a session handed in directly) this embedding itself."""
        if self.model is None:
            return self
        with self._single_lock:
            if self._single is None:
                self._single = OnnxEmbedding(make_session(self.model.data, 1), self.image_size, self.model)
            return self._single

    def __call__(self, pixels: Any) -> np.ndarray:
        """``(B, 3, S, S)`` uint8 pixels (a numpy array or a CPU tensor) to ``(B, h, w, D)``
        float32 features.

        Raises:
            ValueError: if ``pixels`` is not uint8 of the exported size.
        """
        size = self.image_size
        array = np.ascontiguousarray(np.asarray(pixels))
        if array.dtype != np.uint8 or array.ndim != 4 or tuple(array.shape[1:]) != (3, size, size):
            raise ValueError(
                f"ONNX embedding expects (B, 3, {size}, {size}) uint8 pixels, got "
                f"{tuple(array.shape)} {array.dtype}; use the extractor's prepare_batch"
            )
        (features,) = self.session.run(None, {self._input: array})
        return np.asarray(features, dtype=np.float32)


class GraphExtractor:
    """The feature extractor of a loaded bank: its own ONNX graph, no torch.

    The same interface as :class:`~pipeline.patchcore.features.FeatureExtractor` where
    scoring needs one (``prepare_batch``, ``embed``, ``onnx``, ``dim``, ``grid``), on numpy.

    Args:
        config: the bank's feature settings (input size and resizing are read from them).
        graph: the verified ``embedding.onnx`` of the bank.
        backbone: the manifest's record of the backbone the graph holds.
        threads: intra-op threads of the session (default :func:`thread_budget`).

    Raises:
        OnnxEmbeddingError: if the graph does not load or its output does not fit ``backbone``.
    """

    def __init__(self, config: FeatureConfig, graph: BankGraph, backbone: BackboneRecord,
                 *, threads: int | None = None) -> None:
        self.config = config
        self.backbone = backbone
        self.onnx = OnnxEmbedding(make_session(graph.data, threads), config.image_size, graph)
        in_dim = sum(backbone.channels)
        self.dim = in_dim if config.proj_dim is None or config.proj_dim >= in_dim else config.proj_dim
        self.stride = backbone.strides[0]
        self.grid = -(-config.image_size // self.stride)
        expected = [self.grid, self.grid, self.dim]
        shape = list(self.onnx.session.get_outputs()[0].shape)[1:]
        if any(isinstance(s, int) and s != e for s, e in zip(shape, expected, strict=False)) or len(shape) != 3:
            raise OnnxEmbeddingError(
                f"the bank's {GRAPH_FILE} gives features of shape (B, {', '.join(map(str, shape))}) but its "
                f"manifest implies (B, {', '.join(map(str, expected))}); the bank is inconsistent, refit it"
            )

    def graph(self) -> bytes:
        """The graph's bytes, as a bank saved from this extractor carries them."""
        assert self.onnx.model is not None
        return self.onnx.model.data

    def prepare_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Placement]]:
        """Images to a ``(B, 3, S, S)`` uint8 array plus their placements."""
        return prepare_batch(images, self.config.image_size, self.config.resize)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` uint8 from :meth:`prepare_batch` to ``(B, h, w, D)`` float32."""
        return self.onnx(pixels)

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Placement]]:
        """Decode-free convenience: arrays in, ``(B, h, w, D)`` features and placements out."""
        pixels, placements = self.prepare_batch(images)
        return self.embed(pixels), placements
