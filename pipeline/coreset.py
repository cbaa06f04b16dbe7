"""Greedy k-center coreset selection (PatchCore, Sec. 3.2, Alg. 1).

The memory bank keeps the subset that greedily minimises the largest distance from any
patch feature to its nearest kept feature (minimax facility location). Distances are
computed on a Johnson-Lindenstrauss random projection for speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def coreset_size(n: int, ratio: float) -> int:
    """Number of centres kept from ``n`` features at ``ratio`` (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, math.ceil(n * ratio)))


def project(features: np.ndarray, proj_dim: int, *, seed: int, chunk: int = 65536) -> torch.Tensor:
    """Gaussian random projection ``(N, D) -> (N, proj_dim)`` float32, in chunks.

    Note:
        A projection with i.i.d. N(0, 1/proj_dim) entries preserves pairwise distances up
        to a small factor (Johnson-Lindenstrauss); 128 dimensions keep the greedy choice
        close to the one on full features at a fraction of the cost. When ``proj_dim`` is
        not smaller than ``D`` the features are used as they are.
    """
    n, dim = features.shape
    if proj_dim >= dim:
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, proj_dim, generator=generator) / math.sqrt(proj_dim)
    out = torch.empty(n, proj_dim)
    for start in range(0, n, chunk):
        block = torch.from_numpy(np.array(features[start : start + chunk], dtype=np.float32))
        torch.mm(block, matrix, out=out[start : start + len(block)])
    return out


def greedy_coreset(
    features: np.ndarray,
    ratio: float,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    shard_size: int = 8192,
    oversample: float = 8.0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Indices of a greedy k-center coreset, selected in two composable stages.

    Args:
        features: ``(N, D)`` float32 or float16 (may be a memory map).
        ratio: fraction kept, in (0, 1].
        seed: seeds the projection, the shard order and the first centres.
        proj_dim: projection dimension for distance computations.
        shard_size: points per first-stage shard; 0 runs the plain greedy over all points.
        oversample: each shard keeps ``oversample`` times its share of centres.
        progress: called with the number of final centres added since the last call.

    Returns:
        ``(K,)`` int64 unique indices into ``features`` in selection order,
        ``K = ceil(N * ratio)``.

    Note:
        Stage 1 runs the greedy independently on shards of ``shard_size`` points (small
        enough to stay in cache, and each could run on another machine); stage 2 runs it
        over the union of their picks. Greedy k-center picks the outermost points first, so
        the union holds every shard's extremes and the final covering radius stays close to
        that of the greedy over all points (measured in BENCHMARKS.md) for a fraction of
        its O(N * K) distance updates.
    """
    n = len(features)
    if n == 0:
        raise ValueError("cannot select a coreset from zero features")
    k = coreset_size(n, ratio)
    if k == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    projected = project(features, proj_dim, seed=seed)  # (N, P)
    n_shards = n // shard_size if shard_size else 0
    union_size = oversample * k
    if n_shards < 2 or union_size >= n / 2:
        return _greedy_loop(projected, k, int(rng.integers(n)), progress)
    picks = []
    for shard in np.array_split(rng.permutation(n), n_shards):
        k_shard = min(len(shard), math.ceil(union_size / n_shards))
        local = _greedy_loop(projected[torch.from_numpy(shard)], k_shard, int(rng.integers(len(shard))), None)
        picks.append(shard[local])
    union = np.concatenate(picks)  # (U,) indices into features, each shard's picks in order
    return union[_greedy_loop(projected[torch.from_numpy(union)], k, 0, progress)]


def _greedy_loop(
    points: torch.Tensor, k: int, first: int, progress: Callable[[int], None] | None
) -> np.ndarray:
    """The plain greedy loop over all points (used for small inputs and as the reference)."""
    n = len(points)
    sq_norms = (points * points).sum(dim=1)  # (N,)
    min_dist = torch.full((n,), float("inf"))
    dots = torch.empty(n)
    dist = torch.empty(n)
    selected = np.empty(k, dtype=np.int64)
    current = first
    step = max(1, k // 100)
    for i in range(k):
        selected[i] = current
        torch.mv(points, points[current], out=dots)
        torch.add(sq_norms, dots, alpha=-2.0, out=dist)
        dist.add_(sq_norms[current])
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[current] = -1.0  # never chosen again, even among exact duplicates
        current = int(torch.argmax(min_dist))
        if progress is not None and (i + 1) % step == 0:
            progress(step)
    if progress is not None and k % step:
        progress(k % step)
    return selected


def greedy_coreset_naive(
    features: np.ndarray,
    ratio: float,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Reference greedy k-center: updates the distances of all N points per new centre.

    Same arguments and result as :func:`greedy_coreset`, at O(N * K * P) cost; kept for
    tests and the benchmark.
    """
    n = len(features)
    if n == 0:
        raise ValueError("cannot select a coreset from zero features")
    k = coreset_size(n, ratio)
    if k == n:
        return np.arange(n, dtype=np.int64)
    first = int(np.random.default_rng(seed).integers(n))
    return _greedy_loop(project(features, proj_dim, seed=seed), k, first, progress)


def covering_radius(features: np.ndarray, centres: np.ndarray, *, chunk: int = 32768) -> float:
    """Largest distance from any feature to its nearest centre (the k-center objective).

    Args:
        features: ``(N, D)`` float32.
        centres: ``(K, D)`` float32.
    """
    c = torch.from_numpy(np.ascontiguousarray(centres, np.float32))
    c_sq = (c * c).sum(dim=1)
    worst = 0.0
    for start in range(0, len(features), chunk):
        x = torch.from_numpy(np.array(features[start : start + chunk], dtype=np.float32))
        d = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ c.T + c_sq  # (n, K)
        worst = max(worst, float(d.min(dim=1).values.clamp_min(0).max()))
    return math.sqrt(worst)
