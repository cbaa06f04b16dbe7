"""Locally aware patch features (PatchCore, Sec. 3.1), computed by PyTorch: the fitting path.

An image is resized to the network input (square squash or aspect-keeping letterbox),
passed through the backbone, each level is averaged over its 3x3 neighbourhood (the border
treated as ``FeatureConfig.padding`` says), the deeper
maps are bilinearly resized to the finest one and everything is concatenated per position.
That computation is one module, :class:`PatchEmbedding`, run eagerly by PyTorch or, with
``runtime="onnx"``, exported once and run by ONNX Runtime (see :mod:`pipeline.patchcore.export`).
Every bank carries that export (``embedding.onnx``), so scoring a saved bank needs none of
this module (:class:`~pipeline.patchcore.runtime.GraphExtractor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import FeatureConfig

from .backbone import Backbone, load_backbone
from .export import export_settings, load_or_export
from .geometry import Placement, prepare, prepare_batch
from .runtime import OnnxEmbedding, make_session

__all__ = ["FeatureExtractor", "PatchEmbedding", "Placement", "local_average", "open_export", "prepare"]

_TF_MEAN, _TF_STD = 127.0, 128.0
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class PatchEmbedding(nn.Module):
    """The whole feature computation as one module: normalise, backbone, aggregate, project.

    Exported as is to ONNX by :mod:`pipeline.patchcore.runtime`, so the eager and the ONNX paths run
    the same graph.

    Args:
        backbone: timm ``features_only`` model returning one map per level, finest first.
        mean, std: per-channel normalisation of 0-255 pixels.
        neighbourhood: side of the local average pooling window (odd).
        projection: optional ``(D_in, D)`` float32 random projection.
        padding: the border treatment of that window (see :class:`~pipeline.config.FeatureConfig`).

    Note:
        The backbone runs in channels-last layout (its weights are converted in place):
        oneDNN's depthwise and pointwise convolutions run EfficientNet-Lite 2-3x faster on
        CPU in NHWC than in NCHW, and the features differ only by float rounding (max abs
        diff ~1e-5 on values up to ~20).
    """

    mean: torch.Tensor
    std: torch.Tensor
    projection: torch.Tensor | None

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        neighbourhood: int,
        projection: torch.Tensor | None = None,
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.neighbourhood = neighbourhood
        self.padding = padding
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("projection", projection)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 pixels to ``(B, h, w, D)`` float32 patch features."""
        x = (pixels.float() - self.mean) / self.std
        maps = self.backbone(x.contiguous(memory_format=torch.channels_last))
        pooled = [local_average(m, self.neighbourhood, self.padding) for m in maps]
        h, w = pooled[0].shape[-2:]
        resized = [pooled[0]] + [
            F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in pooled[1:]
        ]
        features = torch.cat(resized, dim=1).permute(0, 2, 3, 1)  # (B, C, h, w) -> (B, h, w, D)
        if self.projection is not None:
            features = features @ self.projection
        return features


def local_average(maps: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """Mean of every position's ``k x k`` neighbourhood, same size out (PatchCore Eq. 2).

    Args:
        maps: ``(B, C, h, w)`` feature maps.
        k: odd window side.
        padding: ``"zeros"``: positions outside the map count as zeros (a corner of a 3x3
            window averages 4 values over 9); ``"exclude"``: only positions inside the map
            are averaged (a corner averages 4 over 4); ``"sqrt"``: between the two, the mean
            of the in-map values times ``sqrt(n / k^2)`` for ``n`` of them (a corner's mean of
            4 times 2/3, an edge's of 6 times sqrt(6/9)); ``"replicate"``/``"reflect"``: the
            map is padded by edge replication or reflection, then averaged over 9.
    """
    if k == 1:
        return maps
    p = k // 2
    if padding == "sqrt":  # (sum / k^2) / sqrt(n / k^2) = (sum / n) * sqrt(n / k^2)
        counted = F.avg_pool2d(maps, kernel_size=k, stride=1, padding=p, count_include_pad=True)
        share = F.avg_pool2d(torch.ones_like(maps[:1, :1]), kernel_size=k, stride=1, padding=p,
                             count_include_pad=True)  # n / k^2 at every position
        return counted / share.sqrt()
    if padding in ("replicate", "reflect"):
        return F.avg_pool2d(F.pad(maps, (p, p, p, p), mode=padding), kernel_size=k, stride=1)
    return F.avg_pool2d(maps, kernel_size=k, stride=1, padding=p, count_include_pad=padding == "zeros")


class FeatureExtractor:
    """Backbone plus PatchCore's local aggregation, run eagerly or through ONNX Runtime.

    Args:
        config: feature settings; ``config.runtime`` picks eager PyTorch or ONNX Runtime.
        backbone: an already loaded backbone (tests pass tiny ones); built from ``config``
            when omitted.

    Attributes:
        embedding: the :class:`PatchEmbedding` run eagerly (and exported for ONNX).
        onnx: the ONNX Runtime embedding when ``config.runtime == "onnx"``, else None.
        dim: feature dimension ``D``; grid: ``h = w``; stride: of the finest level.
    """

    def __init__(self, config: FeatureConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone, config.levels, config.weights)
        self.device = torch.device(config.device)
        if config.normalization == "tf":
            mean, std = (_TF_MEAN,) * 3, (_TF_STD,) * 3
        else:
            mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        in_dim = sum(self.backbone.channels)
        projection: torch.Tensor | None = None
        if config.proj_dim is not None and config.proj_dim < in_dim:
            generator = torch.Generator().manual_seed(0)
            projection = torch.randn(in_dim, config.proj_dim, generator=generator) / config.proj_dim**0.5
        self.embedding = PatchEmbedding(self.backbone.model, mean, std, config.neighbourhood, projection,
                                        config.padding)
        self.embedding.eval().to(self.device)
        self.dim = in_dim if projection is None else int(projection.shape[1])
        self.stride = self.backbone.strides[0]
        self.grid = -(-config.image_size // self.stride)
        self.onnx: OnnxEmbedding | None = None
        if config.runtime == "onnx":
            self.onnx = open_export(self.embedding, config, self.backbone.weights_sha256)

    def graph(self) -> bytes:
        """The ONNX graph of :attr:`embedding` that a bank saved from this extractor carries:
        the export ONNX Runtime runs here with ``runtime="onnx"``, else the verified cached
        export (made on first use, :func:`~pipeline.patchcore.export.load_or_export`)."""
        if self.onnx is not None and self.onnx.model is not None:
            return self.onnx.model.data
        return load_or_export(self.embedding, export_settings(self.config, self.backbone.weights_sha256)).data

    def prepare_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Placement]]:
        """Images to a ``(B, 3, S, S)`` uint8 tensor plus their placements."""
        batch, placements = prepare_batch(images, self.config.image_size, self.config.resize)
        return torch.from_numpy(batch), placements  # (B, 3, S, S)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features of a prepared batch.

        Args:
            pixels: ``(B, 3, S, S)`` uint8 from :meth:`prepare_batch`.

        Returns:
            ``(B, h, w, D)`` float32 on the CPU, ``h = w = ceil(S / stride)``.
        """
        if self.onnx is not None:
            return torch.from_numpy(self.onnx(pixels))
        with torch.inference_mode():
            features = self.embedding(pixels.to(self.device))
        return features.float().cpu().contiguous()

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Placement]]:
        """Decode-free convenience: arrays in, ``(B, h, w, D)`` features and placements out."""
        pixels, placements = self.prepare_batch(images)
        return self.embed(pixels), placements


def open_export(
    module: nn.Module,
    config: FeatureConfig,
    weights_sha256: str,
    *,
    directory: str | Path | None = None,
    threads: int | None = None,
) -> OnnxEmbedding:
    """Export (or reuse the verified cached export of) ``module`` and open a session on it."""
    cached = load_or_export(module, export_settings(config, weights_sha256), directory)
    return OnnxEmbedding(make_session(cached.data, threads), config.image_size, cached)
