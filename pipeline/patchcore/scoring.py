"""Patch scores, the image score of Eq. 7 or of the smoothed grid, and smoothed anomaly maps (Sec. 3.3)."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from .geometry import Placement
from .index import NNIndex


def reweighted_image_scores(
    queries: np.ndarray,
    patch_scores: np.ndarray,
    nearest: np.ndarray,
    bank: np.ndarray,
    index: NNIndex,
    num_neighbors: int,
) -> np.ndarray:
    """Image scores: the largest patch score, reweighted as in the paper's Eq. 7.

    With ``m_test*`` the patch of largest score ``s* = ||m_test* - m*||`` and ``N_b(m*)`` the
    ``b`` bank neighbours of its nearest bank feature ``m*`` (``m*`` itself included),

        s = (1 - exp ||m_test* - m*|| / sum_{m in N_b(m*)} exp ||m_test* - m||) * s*

    Args:
        queries: ``(B, P, D)`` float32 patch features of B images.
        patch_scores: ``(B, P)`` distance of each patch to its nearest bank feature.
        nearest: ``(B, P)`` int64 index of that bank feature.
        bank: ``(M, D)`` float32 memory bank.
        index: the fitted index over ``bank``.
        num_neighbors: ``b``; 1 turns the reweighting off (``s = s*``).

    Returns:
        ``(B,)`` float32 image scores.

    Note:
        The fraction is a softmax over the ``b`` distances, evaluated with log-sum-exp
        so feature distances in the tens do not overflow. Because ``m*`` is the nearest bank
        feature its distance is the smallest, so the weight lies in ``[1 - 1/b, 1)``: it is
        close to 1 when ``m*`` sits far from its neighbours (a rare nominal feature, so the
        match is less trustworthy) and ``1 - 1/b`` in a dense region.
    """
    worst = patch_scores.argmax(axis=1)  # (B,)
    rows = np.arange(len(worst))
    s_star = patch_scores[rows, worst].astype(np.float64)
    if num_neighbors <= 1:
        return s_star.astype(np.float32)
    m_star = nearest[rows, worst]  # (B,)
    _, neigh = index.search(bank[m_star], num_neighbors)  # (B, b)
    scores = np.empty(len(worst))  # float64
    for i in range(len(worst)):
        others = [j for j in neigh[i] if j != m_star[i]][: num_neighbors - 1]
        members = np.concatenate([[m_star[i]], np.asarray(others, dtype=np.int64)])
        diff = bank[members].astype(np.float64) - queries[i, worst[i]].astype(np.float64)
        dist = np.sqrt((diff * diff).sum(axis=1))  # (b,), dist[0] is ||m_test* - m*||
        top = dist.max()
        log_softmax0 = dist[0] - (top + math.log(np.exp(dist - top).sum()))
        scores[i] = (1.0 - math.exp(log_softmax0)) * s_star[i]
    return scores.astype(np.float32)


@functools.lru_cache(maxsize=16)
def grid_blur_operator(cells: int, sigma: float) -> np.ndarray:
    """The Gaussian of ``sigma`` cells along one grid axis, reflect-padded, as a matrix.

    Row ``i`` holds the weights the blurred value at ``i`` gives each cell: the taps of
    :func:`gaussian_kernel` at ``i + t``, an index past an end mirrored back into the grid
    (``... 2 1 | 0 1 2 ... g-1 | g-2 ...``, the edge not repeated, as ``mode="reflect"``)
    as often as the kernel's radius needs, so any radius works on any grid. Rows sum to 1.

    Returns:
        ``(cells, cells)`` float64.
    """
    kernel = gaussian_kernel(sigma).astype(np.float64)
    radius = len(kernel) // 2
    op = np.zeros((cells, cells))
    if cells == 1:
        op[0, 0] = 1.0
        return op
    period = 2 * (cells - 1)
    for i in range(cells):
        for t in range(-radius, radius + 1):
            j = (i + t) % period
            op[i, j if j < cells else period - j] += kernel[t + radius]
    op.flags.writeable = False  # shared by every caller through the cache
    return op


def smoothed_image_scores(grid: np.ndarray, single: np.ndarray, sigma: float, weight: float) -> np.ndarray:
    """Image scores from the patch-score grid smoothed over a neighbourhood.

        s = weight * single + (1 - weight) * max_(i, j) (G_sigma * grid)_(i, j)

    with ``G_sigma`` a Gaussian of ``sigma`` grid cells (reflect padding, as the maps). A
    single patch that matches the bank badly, which nominal texture produces now and then,
    lifts its own cell only; a defect lifts a neighbourhood, so after the blur it keeps
    its height while the lone patch is spread out. ``single`` keeps the Eq. 7 score of the
    worst patch in the sum, so small, sharp defects still count.

    Args:
        grid: ``(B, h, w)`` patch scores.
        single: ``(B,)`` the single-patch image scores (Eq. 7).
        sigma: Gaussian standard deviation in grid cells (> 0).
        weight: share of ``single`` in the score, in ``[0, 1]``.

    Returns:
        ``(B,)`` float32.
    """
    b, h, w = grid.shape
    a_h = grid_blur_operator(int(h), float(sigma))
    a_w = grid_blur_operator(int(w), float(sigma))
    blurred = a_h @ grid.astype(np.float64) @ a_w.T  # (h, h) @ (B, h, w) @ (w, w) -> (B, h, w)
    peak = blurred.reshape(b, -1).max(axis=1)
    return (weight * single.astype(np.float64) + (1.0 - weight) * peak).astype(np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, truncated at 4 sigma (as ``scipy.ndimage``): ``(2r + 1,)`` float32."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)
    return (kernel / kernel.sum(dtype=np.float32)).astype(np.float32)


def _upsample_operator(grid: int, size: int) -> np.ndarray:
    """Bilinear upsampling of ``grid`` cells to ``size`` (``align_corners=False``, as
    ``torch.nn.functional.interpolate``) as a ``(size, grid)`` float64 matrix."""
    source = np.maximum((np.arange(size, dtype=np.float64) + 0.5) * (grid / size) - 0.5, 0.0)
    low = np.minimum(source.astype(np.int64), grid - 1)  # source >= 0: truncation is floor
    high = np.minimum(low + 1, grid - 1)
    weight = source - low
    op = np.zeros((size, grid))
    rows = np.arange(size)
    np.add.at(op, (rows, low), 1.0 - weight)
    np.add.at(op, (rows, high), weight)
    return op


@functools.lru_cache(maxsize=16)
def map_operator(grid: int, size: int, sigma: float) -> np.ndarray:
    """The linear map from a grid axis to a smoothed map axis, as a matrix.

    Bilinear upsampling (``align_corners=False``), reflection padding and the Gaussian are
    each separable and linear, so one axis of :func:`anomaly_maps` is ``A @ x`` with
    ``A = blur @ pad @ upsample``, built in float64.

    Args:
        grid: number of patch positions along the axis.
        size: side of the network input.
        sigma: Gaussian standard deviation in input pixels; 0 disables smoothing.

    Returns:
        ``(size, grid)`` float32.
    """
    op = _upsample_operator(grid, size)  # (S, g)
    if sigma > 0:
        kernel = gaussian_kernel(sigma).astype(np.float64)
        r = len(kernel) // 2
        if r >= size:
            raise ValueError(f"map sigma {sigma} needs a kernel radius {r} below the input size {size}")
        where = np.abs(np.arange(-r, size + r))  # reflection padding: ... 2 1 | 0 1 ... S-1 | S-2 ...
        where = np.where(where > size - 1, 2 * (size - 1) - where, where)
        padded = op[where]  # (S + 2r, g)
        op = sum(kernel[t] * padded[t : t + size] for t in range(2 * r + 1))  # (S, g)
    out = np.ascontiguousarray(op, dtype=np.float32)
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def anomaly_maps(patch_scores: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Upsample patch scores to the input size and smooth them.

    Args:
        patch_scores: ``(B, h, w)`` float32 (any array-like: a CPU tensor too).
        size: side of the square network input.
        sigma: Gaussian standard deviation in input pixels; 0 disables smoothing.

    Returns:
        ``(B, size, size)`` float32.

    Note:
        Bilinear upsampling then a Gaussian (the paper's sigma is 4; the default
        ``scoring.sigma`` is 10, which scores better per pixel on MTD) removes the
        blockiness of the patch grid without moving region boundaries much; the blur is
        padded by reflection so borders are not darkened. Both steps are separable and
        linear, so the map is ``A_h @ scores @ A_w.T`` with the small matrices of
        :func:`map_operator`: the same result as upsampling and convolving (to float
        rounding, ~1e-6 relative) without running 33-tap convolutions over the full-size
        map, 2-3x faster on CPU for a batch of 16.
    """
    scores = np.asarray(patch_scores, dtype=np.float32)
    h, w = scores.shape[-2:]
    a_h = map_operator(int(h), size, float(sigma))  # (S, h)
    a_w = map_operator(int(w), size, float(sigma))  # (S, w)
    return a_h @ scores @ a_w.T  # (S, h) @ (B, h, w) @ (w, S) -> (B, S, S)


def to_original(amap: np.ndarray, placement: Placement) -> np.ndarray:
    """Crop a ``(S, S)`` map to the image's content box and resize it to ``(H, W)``."""
    crop = amap[
        placement.top : placement.top + placement.inner_h,
        placement.left : placement.left + placement.inner_w,
    ]
    if crop.shape == (placement.height, placement.width):
        return np.ascontiguousarray(crop, dtype=np.float32)
    image = Image.fromarray(crop.astype(np.float32), mode="F")
    resized = image.resize((placement.width, placement.height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)
