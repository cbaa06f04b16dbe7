"""Locally aware patch features (PatchCore, Sec. 3.1) and the geometry of input images.

An image is resized to the network input (square squash or aspect-keeping letterbox),
passed through the backbone, each level is averaged over its 3x3 neighbourhood, the deeper
maps are bilinearly resized to the finest one and everything is concatenated per position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import Backbone, load_backbone
from .config import FeatureConfig

_TF_MEAN, _TF_STD = 127.0, 128.0
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an original image sits inside the square network input.

    Attributes:
        height, width: the original image size.
        top, left, inner_h, inner_w: the content box inside the ``size x size`` input
            (the whole square for ``squash``).
    """

    height: int
    width: int
    top: int
    left: int
    inner_h: int
    inner_w: int


def prepare(image: np.ndarray, size: int, resize: str) -> tuple[np.ndarray, Placement]:
    """Resize one image to the ``(size, size, 3)`` uint8 network input.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8.
        size: side of the square input.
        resize: ``"squash"`` or ``"letterbox"``.

    Note:
        Letterboxing pads by edge replication rather than a constant so the padding looks
        like the nearest nominal texture and does not light up the anomaly map; the map is
        cropped back to the content box anyway.
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    height, width = image.shape[:2]
    pil = Image.fromarray(image)
    if resize == "squash":
        out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
        return out, Placement(height, width, 0, 0, size, size)
    scale = size / max(height, width)
    inner_w = max(1, min(size, round(width * scale)))
    inner_h = max(1, min(size, round(height * scale)))
    inner = np.asarray(pil.resize((inner_w, inner_h), Image.Resampling.BILINEAR))
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    out = np.pad(
        inner, ((top, size - inner_h - top), (left, size - inner_w - left), (0, 0)), mode="edge"
    )
    return out, Placement(height, width, top, left, inner_h, inner_w)


class FeatureExtractor:
    """Backbone plus PatchCore's local aggregation.

    Args:
        config: feature settings.
        backbone: an already loaded backbone (tests pass tiny ones); built from ``config``
            when omitted.
    """

    def __init__(self, config: FeatureConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.backbone = backbone or load_backbone(config.backbone, config.levels, config.weights)
        self.device = torch.device(config.device)
        self.backbone.model.to(self.device)
        if config.normalization == "tf":
            mean, std = (_TF_MEAN,) * 3, (_TF_STD,) * 3
        else:
            mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        in_dim = sum(self.backbone.channels)
        self._projection: torch.Tensor | None = None
        if config.proj_dim is not None and config.proj_dim < in_dim:
            generator = torch.Generator().manual_seed(0)
            matrix = torch.randn(in_dim, config.proj_dim, generator=generator) / config.proj_dim**0.5
            self._projection = matrix.to(self.device)
        self.dim = config.proj_dim if self._projection is not None else in_dim
        self.stride = self.backbone.strides[0]
        self.grid = -(-config.image_size // self.stride)

    def prepare_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Placement]]:
        """Images to a ``(B, 3, S, S)`` uint8 tensor plus their placements."""
        prepared = [prepare(img, self.config.image_size, self.config.resize) for img in images]
        batch = np.stack([p[0] for p in prepared])  # (B, S, S, 3)
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)
        return tensor, [p[1] for p in prepared]

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features of a prepared batch.

        Args:
            pixels: ``(B, 3, S, S)`` uint8 from :meth:`prepare_batch`.

        Returns:
            ``(B, h, w, D)`` float32 on the CPU, ``h = w = ceil(S / stride)``.
        """
        x = (pixels.to(self.device, torch.float32) - self._mean) / self._std
        maps = self.backbone.model(x)
        k = self.config.neighbourhood
        pooled = [
            F.avg_pool2d(m, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
            for m in maps
        ]
        h, w = pooled[0].shape[-2:]
        resized = [pooled[0]] + [
            F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in pooled[1:]
        ]
        features = torch.cat(resized, dim=1).permute(0, 2, 3, 1)  # (B, C, h, w) -> (B, h, w, D)
        if self._projection is not None:
            features = features @ self._projection
        return features.float().cpu().contiguous()

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Placement]]:
        """Decode-free convenience: arrays in, ``(B, h, w, D)`` features and placements out."""
        pixels, placements = self.prepare_batch(images)
        return self.embed(pixels), placements
