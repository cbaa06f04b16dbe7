"""The geometry of input images: resizing to the square network input and back.

Shared by both embeddings, the eager one of fitting (:mod:`pipeline.patchcore.features`) and
the bank's ONNX graph of scoring (:mod:`pipeline.patchcore.runtime`), so that both see the
very same pixels. numpy and PIL only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image


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
    height, width = image.shape[:2]
    pil = Image.fromarray(image)  # a grey image is resized once, not once per channel
    if resize == "squash":
        out = _three_channels(np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)))
        return out, Placement(height, width, 0, 0, size, size)
    scale = size / max(height, width)
    inner_w = max(1, min(size, round(width * scale)))
    inner_h = max(1, min(size, round(height * scale)))
    inner = _three_channels(np.asarray(pil.resize((inner_w, inner_h), Image.Resampling.BILINEAR)))
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    out = np.pad(
        inner, ((top, size - inner_h - top), (left, size - inner_w - left), (0, 0)), mode="edge"
    )
    return out, Placement(height, width, top, left, inner_h, inner_w)


def prepare_batch(images: Sequence[np.ndarray], size: int, resize: str) -> tuple[np.ndarray, list[Placement]]:
    """Images to a ``(B, 3, S, S)`` uint8 array (C-contiguous) plus their placements."""
    prepared = [prepare(img, size, resize) for img in images]
    batch = np.stack([p[0] for p in prepared])  # (B, S, S, 3)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2)), [p[1] for p in prepared]  # (B, 3, S, S)


def _three_channels(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` grey to ``(H, W, 3)`` by repetition; colour passes through."""
    return image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
