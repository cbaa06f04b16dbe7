"""Heatmap overlays and binary masks of anomaly maps, for people looking at parts."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image


def heatmap_overlay(
    image: np.ndarray, amap: np.ndarray, threshold: float | None = None, *, alpha: float = 0.45
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over the image.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8.
        amap: ``(H, W)`` float anomaly map of the same size.
        threshold: the bank's decision threshold; when given, colours are fixed so that
            the threshold sits mid-scale (red means above it) and overlays of different
            images compare. Without it the map's own range is used.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if amap.shape != image.shape[:2]:
        raise ValueError(f"map {amap.shape} and image {image.shape[:2]} differ in size")
    if threshold is not None and threshold > 0:
        scaled = np.clip(amap / (2.0 * threshold), 0.0, 1.0)
    else:
        low, high = float(amap.min()), float(amap.max())
        scaled = (amap - low) / (high - low) if high > low else np.zeros_like(amap)
    colour = colormaps["jet"](scaled)[..., :3] * 255.0  # (H, W, 3)
    return (image * (1.0 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def binary_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """``(H, W)`` uint8 mask, 255 where the map is above ``threshold``."""
    return np.where(amap > threshold, 255, 0).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 image as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
