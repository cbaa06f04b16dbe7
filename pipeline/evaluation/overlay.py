"""Heatmap overlays, their colour bar and binary masks of anomaly maps, for people looking at parts."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

#: The colour map of every overlay and colour bar.
CMAP = "jet"


def overlay_range(amap: np.ndarray, threshold: float | None = None) -> tuple[float, float]:
    """The scores that the colours of :func:`heatmap_overlay` span, from the lowest colour to the highest.

    Note:
        With a threshold the scale is fixed at ``[0, 2 * threshold]`` so that the threshold
        sits mid-scale (red means above it) and overlays of different images compare; map
        values beyond it take the top colour. Without one the map's own range is used.
    """
    if threshold is not None and threshold > 0:
        return 0.0, 2.0 * threshold
    return float(amap.min()), float(amap.max())


def heatmap_overlay(
    image: np.ndarray, amap: np.ndarray, threshold: float | None = None, *, alpha: float = 0.45
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over the image.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8.
        amap: ``(H, W)`` float anomaly map of the same size.
        threshold: the bank's decision threshold; it fixes the colour scale
            (:func:`overlay_range`).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if amap.shape != image.shape[:2]:
        raise ValueError(f"map {amap.shape} and image {image.shape[:2]} differ in size")
    low, high = overlay_range(amap, threshold)
    scaled = np.clip((amap - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(amap)
    colour = colormaps[CMAP](scaled)[..., :3] * 255.0  # (H, W, 3)
    return (image * (1.0 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def colour_bar(low: float, high: float, threshold: float | None = None, *, height: int = 240) -> np.ndarray:
    """The score scale of overlays coloured over ``[low, high]`` as a vertical bar with ticks.

    The threshold, when it lies inside the range, is ticked and named; the top tick reads
    ``>= high`` when the scale is the fixed one of a threshold (higher scores are clipped).

    Returns:
        ``(height, W, 3)`` uint8.
    """
    if not high > low:
        raise ValueError(f"a colour bar needs low < high, got {low} and {high}")
    dpi = 100
    fig = Figure(figsize=(1.5, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = fig.add_axes((0.08, 0.05, 0.18, 0.9))
    bar = fig.colorbar(ScalarMappable(Normalize(low, high), colormaps[CMAP]), cax=axes)
    ticks = {low: f"{low:.3g}", high: f"{high:.3g}"}
    if threshold is not None and low < threshold < high:
        ticks[threshold] = f"{threshold:.3g} threshold"
        if high == 2.0 * threshold:
            ticks[high] = f">= {high:.3g}"
    bar.set_ticks(sorted(ticks), labels=[ticks[t] for t in sorted(ticks)], fontsize=8)
    bar.set_label("anomaly score", fontsize=8)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def binary_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """``(H, W)`` uint8 mask, 255 where the map is above ``threshold``."""
    return np.where(amap > threshold, 255, 0).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 image as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
