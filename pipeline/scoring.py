"""Patch scores, the image score of Eq. 7, and smoothed anomaly maps (PatchCore, Sec. 3.3)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .features import Placement
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
    scores = np.empty(len(worst), dtype=np.float64)
    for i in range(len(worst)):
        others = [j for j in neigh[i] if j != m_star[i]][: num_neighbors - 1]
        members = np.concatenate([[m_star[i]], np.asarray(others, dtype=np.int64)])
        diff = bank[members].astype(np.float64) - queries[i, worst[i]].astype(np.float64)
        dist = np.sqrt((diff * diff).sum(axis=1))  # (b,), dist[0] is ||m_test* - m*||
        top = dist.max()
        log_softmax0 = dist[0] - (top + math.log(np.exp(dist - top).sum()))
        scores[i] = (1.0 - math.exp(log_softmax0)) * s_star[i]
    return scores.astype(np.float32)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma (as ``scipy.ndimage``)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Upsample patch scores to the input size and smooth them.

    Args:
        patch_scores: ``(B, h, w)`` float32.
        size: side of the square network input.
        sigma: Gaussian standard deviation in input pixels; 0 disables smoothing.

    Returns:
        ``(B, size, size)`` float32.

    Note:
        Bilinear upsampling then a Gaussian with sigma 4 (the paper's choice) removes the
        blockiness of the patch grid without moving region boundaries much; the blur is
        separable and padded by reflection so borders are not darkened.
    """
    maps = F.interpolate(patch_scores[:, None], size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel(sigma)
        r = len(kernel) // 2
        maps = F.pad(maps, (r, r, r, r), mode="reflect")
        maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
        maps = F.conv2d(maps, kernel.view(1, 1, -1, 1))
    return maps[:, 0]


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
