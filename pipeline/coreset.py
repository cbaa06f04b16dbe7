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
        block = torch.from_numpy(np.ascontiguousarray(features[start : start + chunk], np.float32))
        torch.mm(block, matrix, out=out[start : start + len(block)])
    return out


def greedy_coreset(
    features: np.ndarray,
    ratio: float,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Indices of a greedy k-center coreset, computed with triangle-inequality pruning.

    Args:
        features: ``(N, D)`` float32 (may be a memory map).
        ratio: fraction kept, in (0, 1].
        seed: seeds the projection, the partition and the first centre; same seed, same result.
        proj_dim: projection dimension for distance computations.
        progress: called with the number of centres added since the last call.

    Returns:
        ``(K,)`` int64 unique indices into ``features`` in selection order,
        ``K = ceil(N * ratio)``.

    Note:
        This makes the same choices as :func:`greedy_coreset_naive` but does not touch all N
        points per centre. Points are grouped into blocks around k-means pivots with radius
        ``r_b``. A new centre ``c`` can lower the distance of a point of block ``b`` only if
        ``||c - p_b|| - r_b`` is below the block's largest current distance, so every other
        block is skipped. As the covering radius shrinks, almost all blocks are skipped.
    """
    n = len(features)
    if n == 0:
        raise ValueError("cannot select a coreset from zero features")
    k = coreset_size(n, ratio)
    if k == n:
        return np.arange(n, dtype=np.int64)
    first = int(np.random.default_rng(seed).integers(n))
    projected = project(features, proj_dim, seed=seed)  # (N, P)
    n_blocks = int(min(4096, max(1, round(math.sqrt(n)))))
    if n_blocks < 16:
        return _greedy_loop(projected, k, first, progress)
    order, starts, sizes, pivots = _partition(projected, n_blocks, seed)
    points = projected[torch.from_numpy(order)]  # (N, P), grouped by block
    del projected
    position = int(np.nonzero(order == first)[0][0])
    block_of = torch.repeat_interleave(torch.arange(n_blocks), sizes)  # (N,)
    sq = (points * points).sum(dim=1)  # (N,)
    pivot_sq = (pivots * pivots).sum(dim=1)  # (M,)
    radius = torch.zeros(n_blocks).scatter_reduce_(
        0, block_of, (points - pivots[block_of]).norm(dim=1), "amax", include_self=False
    )
    slack = 1e-4 * float(radius.max()) + 1e-6  # absorbs float rounding in the bound
    min_dist = torch.full((n,), float("inf"))  # squared distance to the nearest centre
    block_max = torch.full((n_blocks,), float("inf"))  # largest min_dist within each block
    scratch = torch.empty(n_blocks)
    selected = np.empty(k, dtype=np.int64)
    step = max(1, k // 100)
    for i in range(k):
        selected[i] = order[position]
        centre = points[position]
        c_sq = sq[position]
        to_pivot = (pivot_sq - 2.0 * (pivots @ centre) + c_sq).clamp_min_(0).sqrt_()  # (M,)
        touched = torch.nonzero(to_pivot - radius < block_max.sqrt() + slack)[:, 0]
        lengths = sizes[touched]
        offsets = torch.repeat_interleave(starts[touched] - (torch.cumsum(lengths, 0) - lengths), lengths)
        ids = offsets + torch.arange(len(offsets))  # point positions in touched blocks
        dist = sq[ids] - 2.0 * (points[ids] @ centre) + c_sq
        new = torch.minimum(min_dist[ids], dist)
        min_dist[ids] = new
        min_dist[position] = -1.0  # never chosen again, even among exact duplicates
        new[ids == position] = -1.0
        scratch.fill_(-1.0).scatter_reduce_(0, block_of[ids], new, "amax")
        block_max[touched] = scratch[touched]
        best = int(torch.argmax(block_max))
        lo = int(starts[best])
        position = lo + int(torch.argmax(min_dist[lo : lo + int(sizes[best])]))
        if progress is not None and (i + 1) % step == 0:
            progress(step)
    if progress is not None and k % step:
        progress(k % step)
    return selected


def _partition(
    points: torch.Tensor, n_blocks: int, seed: int
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group points around k-means pivots (trained on a sample).

    Returns:
        ``order`` (N,) int64 point indices grouped by block; ``starts`` and ``sizes`` (M,)
        int64 of each block within ``order``; ``pivots`` (M, P) float32.
    """
    import faiss

    x = points.numpy()
    kmeans = faiss.Kmeans(
        x.shape[1], n_blocks, niter=8, seed=seed, max_points_per_centroid=32, verbose=False
    )
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), min(len(x), n_blocks * 32), replace=False))]
    kmeans.train(sample)
    _, assign = kmeans.index.search(x, 1)
    assign = assign[:, 0]
    order = np.argsort(assign, kind="stable").astype(np.int64)
    sizes = np.bincount(assign, minlength=n_blocks).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return order, torch.from_numpy(starts), torch.from_numpy(sizes), torch.from_numpy(kmeans.centroids.copy())


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
        x = torch.from_numpy(np.ascontiguousarray(features[start : start + chunk], np.float32))
        d = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ c.T + c_sq  # (n, K)
        worst = max(worst, float(d.min(dim=1).values.clamp_min(0).max()))
    return math.sqrt(worst)
