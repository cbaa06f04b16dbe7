"""Extend a memory bank with new nominal images instead of refitting it.

The greedy k-center selection of :mod:`.coreset` is continued from the centres the bank
already holds: every new patch feature starts at its distance to the nearest bank vector,
and the farthest new feature is added until the bank reaches its new size. Only the new
features are candidates and the old ones are not needed: each is already within the bank's
covering radius, and added centres can only bring it closer. So the radius over old and
new features together is at most the larger of the old radius and the new features' one.

Distances are taken in the same random projection as the coreset (:func:`.coreset.project`
with the same seed gives the same matrix), so an extension measures distances as the fit
that made the bank did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .coreset import _retire, _revive, coreset_size, covering_radius, project

_BLOCK_ROWS = 4096  # new features per block of the nearest-bank-vector product
_BLOCK_CENTRES = 1024  # bank vectors per block of that product (16 MiB of float32 distances)
_SCRATCH = 1 << 20  # distance block (rows * centres) of one refresh product


def extended_bank_size(n_old_patches: int, n_new_patches: int, ratio: float) -> int:
    """Size of the bank after adding ``n_new_patches`` features to ``n_old_patches``.

    The bank keeps the same fraction of all features it has seen as a fit on all of them
    would: ``coreset_size(n_old_patches + n_new_patches, ratio)``.

    Args:
        n_old_patches: patch features the bank was selected from.
        n_new_patches: patch features of the new nominal images.
        ratio: the coreset ratio of the bank, in (0, 1].

    Returns:
        The number of bank vectors ``k_total`` to pass to :func:`extend_coreset`.
    """
    if n_old_patches < 0 or n_new_patches < 0:
        raise ValueError(f"patch counts must be non-negative, got {n_old_patches} and {n_new_patches}")
    if n_old_patches + n_new_patches == 0:
        raise ValueError("cannot size a memory bank for zero patch features")
    return coreset_size(n_old_patches + n_new_patches, ratio)


def extend_coreset(
    bank: np.ndarray, new_features: np.ndarray, k_total: int, *, seed: int = 0, proj_dim: int = 128
) -> np.ndarray:
    """Indices of the new features to add to ``bank``: the greedy k-center, continued.

    Args:
        bank: ``(M, D)`` float32 or float16, the current memory bank (its centres).
        new_features: ``(N, D)`` float32 or float16 (may be a memory map), patch features of
            the new nominal images.
        k_total: size of the bank after the extension (see :func:`extended_bank_size`).
        seed: seeds the projection; use the seed the bank was fitted with.
        proj_dim: projection dimension; use the one the bank was fitted with.

    Returns:
        ``(max(0, k_total - M),)`` int64 unique indices into ``new_features`` in selection
        order; empty when the bank already holds ``k_total`` vectors or more.

    Note:
        The first pick is the new feature farthest from every bank vector, not a random
        one as in a fresh fit: the bank's vectors already play the part of the first
        centres. The nearest-bank-vector pass is a dense ``(N, M)`` product computed in
        blocks, so memory stays at the ``(N, proj_dim)`` projection plus one 16 MiB block.
    """
    if bank.ndim != 2 or new_features.ndim != 2:
        raise ValueError(f"bank and new features must be 2-D, got {bank.shape} and {new_features.shape}")
    if bank.shape[1] != new_features.shape[1]:
        raise ValueError(
            f"bank vectors have {bank.shape[1]} dimensions but new features have {new_features.shape[1]}; "
            "extract the new features with the bank's feature settings"
        )
    if len(bank) == 0:
        raise ValueError("cannot extend an empty memory bank; select one with greedy_coreset first")
    if k_total > len(bank) + len(new_features):
        raise ValueError(
            f"cannot grow a bank of {len(bank)} to {k_total} vectors with {len(new_features)} new features"
        )
    n_picks = k_total - len(bank)
    if n_picks <= 0:
        return np.empty(0, dtype=np.int64)
    points = project(new_features, proj_dim, seed=seed)  # (N, P)
    start = _nearest_sq_dist(points, project(bank, proj_dim, seed=seed))  # (N,)
    return _continued_greedy(points, start, n_picks)


def union_covering_radius(parts: Sequence[np.ndarray], centres: np.ndarray) -> float:
    """Covering radius of the union of ``parts`` by ``centres``, without concatenating them.

    Args:
        parts: ``(N_i, D)`` float32 or float16 arrays (may be memory maps), e.g. the old and
            the new patch features.
        centres: ``(K, D)``, e.g. the extended bank.

    Returns:
        The largest distance, in feature space, from any row of any part to its nearest centre.
    """
    if not any(len(part) for part in parts):
        raise ValueError("the covering radius needs at least one feature")
    return max(covering_radius(part, centres) for part in parts if len(part))


def _nearest_sq_dist(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared distance from each of ``points`` ``(N, P)`` to its nearest of ``centres`` ``(M, P)``."""
    sq_points = (points * points).sum(dim=1)  # (N,)
    sq_centres = (centres * centres).sum(dim=1)  # (M,)
    out = torch.full((len(points),), math.inf)
    block = torch.empty(_BLOCK_ROWS * _BLOCK_CENTRES)
    for c0 in range(0, len(centres), _BLOCK_CENTRES):
        c = centres[c0 : c0 + _BLOCK_CENTRES]  # (C, P)
        c_sq = sq_centres[c0 : c0 + _BLOCK_CENTRES].unsqueeze(0)  # (1, C)
        for r0 in range(0, len(points), _BLOCK_ROWS):
            rows = points[r0 : r0 + _BLOCK_ROWS]  # (B, P)
            d = block[: len(rows) * len(c)].view(len(rows), len(c))
            torch.addmm(c_sq, rows, c.T, alpha=-2.0, out=d)  # (B, C), without the rows' own norms
            torch.minimum(out[r0 : r0 + len(rows)], d.amin(dim=1), out=out[r0 : r0 + len(rows)])
    return out.add_(sq_points).clamp_min_(0.0)


def _continued_greedy(points: torch.Tensor, start: torch.Tensor, k: int, *, slack: float = 0.95) -> np.ndarray:
    """Greedy k-center over ``points`` ``(N, P)`` whose squared distances to earlier centres are ``start``.

    Each step picks the point farthest from all centres so far (earlier and picked), as the
    plain loop that updates every point per pick does.

    Note:
        Lazy like :func:`.coreset._lazy_greedy`: with ``r2`` the current largest squared
        distance, a point below ``(slack * r)^2`` cannot be picked until ``r`` shrinks by
        that factor, so it leaves the per-pick update and keeps its distance as an upper
        bound (to the earlier centres and the first ``since`` picks). When a bound reaches
        ``r2``, the likely rows are brought up to date in matrix products and rejoin the
        update if still far. New nominal images mostly resemble the old ones, so most new
        points start near a bank vector and never enter the per-pick update at all.
    """
    n = len(points)
    sq_all = (points * points).sum(dim=1)  # (N,)
    selected = np.empty(k, dtype=np.int64)
    scratch = torch.empty(_SCRATCH)
    near = start < slack * slack * float(start.max())
    active, min_dist = torch.nonzero(~near).squeeze(1), start[~near].clone()  # rows in the per-pick update
    d_rows, d_bound = torch.nonzero(near).squeeze(1), start[near].clone()  # dormant rows, their bounds
    d_since = torch.zeros(len(d_rows), dtype=torch.long)  # picks each bound has seen
    bound_max = float(d_bound.max()) if len(d_bound) else -math.inf
    pts, sq = points[active], sq_all[active]  # (A, P), (A,)
    buffer = torch.empty(n)
    for i in range(k):
        current = int(torch.argmax(min_dist))
        r2 = float(min_dist[current])
        if bound_max > r2:  # a dormant row may be the farthest: refresh the likely ones
            (d_rows, d_bound, d_since), active, min_dist = _revive(
                points, sq_all, selected[:i], (d_rows, d_bound, d_since), active, min_dist, r2, slack, scratch
            )
            bound_max = float(d_bound.max()) if len(d_bound) else -math.inf
            pts, sq = points[active], sq_all[active]
            current = int(torch.argmax(min_dist))
            r2 = float(min_dist[current])
        row = int(active[current])
        selected[i] = row
        if i + 1 == k:
            break
        dist = buffer[: len(pts)]
        torch.addmv(sq, pts, points[row], alpha=-2.0, out=dist)  # (A,)
        dist.add_(sq_all[row]).clamp_min_(0.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[current] = -1.0  # never chosen again, even among exact duplicates
        r2 = float(min_dist.max())
        if (i + 1) % 16 == 0 and r2 > 0:  # retire the points now well inside the radius
            near = min_dist < slack * slack * r2  # never the farthest: the update keeps a point
            if 4 * int(near.sum()) > len(active):
                bound_max = max(bound_max, float(min_dist[near].max()))
                (d_rows, d_bound, d_since), active, min_dist = _retire(
                    near, i + 1, (d_rows, d_bound, d_since), active, min_dist)
                pts, sq = points[active], sq_all[active]
    return selected
