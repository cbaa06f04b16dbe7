"""Greedy k-center coreset selection (PatchCore, Sec. 3.2, Alg. 1).

The memory bank keeps the subset that greedily minimises the largest distance from any
patch feature to its nearest kept feature (minimax facility location). Distances are
computed on a Johnson-Lindenstrauss random projection for speed.

The greedy is run lazily (:func:`_lazy_greedy`): it picks the same centres as the plain
loop that updates every point per new centre, but keeps only the points that can still be
picked soon in the per-centre update and brings the others up to date in batched matrix
products when they might be. Above ``EXACT_LIMIT`` points it runs in two stages over shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

EXACT_LIMIT = 1 << 21  # points above which the default selection runs in two stages
SHARD_SIZE = 16384  # first-stage shard size of the two-stage selection
_GEMM_ELEMENTS = 1 << 22  # distance block (rows * centres) of one refresh product with several threads


def coreset_size(n: int, ratio: float) -> int:
    """Number of centres kept from ``n`` features at ``ratio`` (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, math.ceil(n * ratio)))


def ratio_for(n: int, k: int) -> float:
    """The ratio that keeps exactly ``k`` of ``n`` features (``ceil(n * (k / n))`` can be ``k + 1``)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} features")
    ratio = k / n
    while coreset_size(n, ratio) > k:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def project(
    features: np.ndarray, proj_dim: int, *, seed: int, rows: np.ndarray | None = None, chunk: int = 65536
) -> torch.Tensor:
    """Gaussian random projection ``(N, D) -> (N, proj_dim)`` float32, in chunks.

    Args:
        features: ``(N, D)`` float32 or float16 (may be a memory map).
        proj_dim: output dimension.
        seed: seeds the projection matrix (the same seed gives the same matrix).
        rows: project only these rows, in this order (read chunk by chunk).
        chunk: rows converted to float32 at a time.

    Note:
        A projection with i.i.d. N(0, 1/proj_dim) entries preserves pairwise distances up
        to a small factor (Johnson-Lindenstrauss); 128 dimensions keep the greedy choice
        close to the one on full features at a fraction of the cost. When ``proj_dim`` is
        not smaller than ``D`` the features are used as they are.
    """
    dim = features.shape[1]
    n = len(features) if rows is None else len(rows)
    matrix = None
    if proj_dim < dim:
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(dim, proj_dim, generator=generator) / math.sqrt(proj_dim)
    out = torch.empty(n, proj_dim if matrix is not None else dim)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = features[start:stop] if rows is None else features[rows[start:stop]]
        block = torch.from_numpy(np.array(block, dtype=np.float32))  # (chunk, D)
        if matrix is None:
            out[start:stop] = block
        else:
            torch.mm(block, matrix, out=out[start:stop])
    return out


def _checked_size(n: int, ratio: float) -> int:
    if n == 0:
        raise ValueError("cannot select a coreset from zero features")
    return coreset_size(n, ratio)


def greedy_coreset(
    features: np.ndarray,
    ratio: float,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    shard_size: int | None = None,
    oversample: float = 8.0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Indices of a greedy k-center coreset.

    Args:
        features: ``(N, D)`` float32 or float16 (may be a memory map).
        ratio: fraction kept, in (0, 1].
        seed: seeds the projection, the first centre and the shards.
        proj_dim: projection dimension for distance computations.
        shard_size: points per first-stage shard; 0 runs one greedy over all points (the
            same centres as :func:`greedy_coreset_naive`); None chooses 0 up to
            ``EXACT_LIMIT`` points and ``SHARD_SIZE`` above.
        oversample: with shards, each shard keeps ``oversample`` times its share of centres.
        progress: called with the number of final centres added since the last call.

    Returns:
        ``(K,)`` int64 unique indices into ``features`` in selection order,
        ``K = ceil(N * ratio)``.

    Note:
        With shards, stage 1 runs the greedy independently on random shards and stage 2 runs
        it over the union of their picks. Greedy k-center picks the outermost points first,
        so the union holds every shard's extremes and the covering radius stays close to that
        of one greedy over all points, while only one shard and the union are ever projected
        in memory at once (``python -m benchmarks.accuracy --coreset`` measures both).
    """
    n, k = len(features), _checked_size(len(features), ratio)
    if k == n:
        return np.arange(n, dtype=np.int64)
    if shard_size is None:
        shard_size = 0 if n <= EXACT_LIMIT else SHARD_SIZE
    rng = np.random.default_rng(seed)
    first = int(rng.integers(n))
    n_shards = n // shard_size if shard_size else 0
    if n_shards < 2 or oversample * k >= n / 2:
        return _lazy_greedy(project(features, proj_dim, seed=seed), k, first, progress)
    picks = _shard_picks(features, k, n_shards, rng, proj_dim=proj_dim, seed=seed, oversample=oversample)
    union = np.sort(np.concatenate(picks))  # (U,)
    points = project(features, proj_dim, seed=seed, rows=union)  # (U, P)
    return union[_lazy_greedy(points, k, int(np.searchsorted(union, picks[0][0])), progress)]


def shard_candidates(
    features: np.ndarray,
    ratio: float,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    shard_size: int = SHARD_SIZE,
    oversample: float = 8.0,
) -> np.ndarray:
    """The first stage of the two-stage selection, alone: candidates from one part of the data.

    A fit spread over machines (``flows/distributed.py``) runs this on each worker's part and
    one greedy over the union of all parts' candidates, which composes as the two stages of
    :func:`greedy_coreset` do.

    Args:
        features: ``(N, D)`` float32 or float16 (may be a memory map), one part of the data.
        ratio: the final coreset ratio; each shard of ``shard_size`` points keeps ``oversample``
            times its share of ``ratio``.

    Returns:
        Sorted int64 indices into ``features``; all of them when the candidates would be over
        half the part anyway.
    """
    n = len(features)
    if n == 0:
        raise ValueError("cannot select coreset candidates from zero features")
    k = coreset_size(n, ratio)
    if oversample * k >= n / 2:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picks = _shard_picks(features, k, max(1, n // shard_size), rng, proj_dim=proj_dim, seed=seed,
                         oversample=oversample)
    return np.sort(np.concatenate(picks))


def _shard_picks(
    features: np.ndarray, k: int, n_shards: int, rng: np.random.Generator, *, proj_dim: int, seed: int,
    oversample: float,
) -> list[np.ndarray]:
    """Stage one: ``n_shards`` random shards each keep ``oversample`` times their share of ``k``."""
    picks = []
    for shard in np.array_split(rng.permutation(len(features)), n_shards):
        shard.sort()  # sequential reads from a memory map
        k_shard = min(len(shard), math.ceil(oversample * k / n_shards))
        points = project(features, proj_dim, seed=seed, rows=shard)  # (S, P)
        picks.append(shard[_lazy_greedy(points, k_shard, int(rng.integers(len(shard))), None)])
    return picks


def greedy_coreset_naive(
    features: np.ndarray,
    ratio: float,
    *,
    seed: int = 0,
    proj_dim: int = 128,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Reference greedy k-center: updates the distances of all N points per new centre.

    Same arguments and result as :func:`greedy_coreset` with ``shard_size=0``, at
    O(N * K * P) memory-bound cost; kept for tests and the benchmark.
    """
    n, k = len(features), _checked_size(len(features), ratio)
    if k == n:
        return np.arange(n, dtype=np.int64)
    first = int(np.random.default_rng(seed).integers(n))
    points = project(features, proj_dim, seed=seed)  # (N, P)
    sq_norms = (points * points).sum(dim=1)  # (N,)
    min_dist = torch.full((n,), float("inf"))
    dist = torch.empty(n)
    selected = np.empty(k, dtype=np.int64)
    current = first
    reporter = _Progress(k, progress)
    for i in range(k):
        selected[i] = current
        torch.addmv(sq_norms, points, points[current], alpha=-2.0, out=dist)
        dist.add_(sq_norms[current]).clamp_min_(0.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[current] = -1.0  # never chosen again, even among exact duplicates
        current = int(torch.argmax(min_dist))
        reporter.step()
    return selected


def _lazy_greedy(
    points: torch.Tensor,
    k: int,
    first: int,
    progress: Callable[[int], None] | None,
    *,
    slack: float = 0.95,
) -> np.ndarray:
    """Greedy k-center over ``points`` ``(N, P)`` from row ``first``: the plain loop's centres.

    Note:
        The next centre is the point farthest from all centres so far, at squared distance
        ``r2``. A point whose squared distance is below ``(slack * r)^2`` cannot be picked
        until ``r`` has shrunk by that factor, so it leaves the per-centre update and keeps
        its last distance as an upper bound. Whenever a bound reaches the current ``r2``,
        the points with bounds above ``(slack * r)^2`` are brought up to date against the
        centres added meanwhile in one matrix product and rejoin the update if still far.
        The farthest active point is then the farthest of all, so the picks are those of the
        plain loop (up to float rounding among near ties). On MTD patch features about half
        of the point-centre distances are computed, as compute-bound matrix products instead
        of memory-bound matrix-vector products, and the per-centre update runs on a few
        thousand points.
    """
    n = len(points)
    sq_all = (points * points).sum(dim=1)  # (N,)
    selected = np.empty(k, dtype=np.int64)
    active = torch.arange(n)  # rows of ``points`` in the per-centre update
    pts, sq = points, sq_all
    min_dist = torch.full((n,), float("inf"))  # of the active rows
    buffer = torch.empty(n)
    # one thread is fastest with blocks that stay in cache; several need big blocks to hide
    # their synchronisation, which costs a scheduler slice whenever another process holds a core
    scratch = torch.empty(_GEMM_ELEMENTS if torch.get_num_threads() > 1 else _GEMM_ELEMENTS >> 4)
    # dormant rows, their squared distance to the first ``since`` centres (an upper bound)
    d_rows, d_bound, d_since = torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0, dtype=torch.long)
    bound_max = -math.inf
    reporter = _Progress(k, progress)
    current = first  # position in ``active``
    for i in range(k):
        row = int(active[current])
        selected[i] = row
        dist = buffer[: len(pts)]
        torch.addmv(sq, pts, points[row], alpha=-2.0, out=dist)
        dist.add_(sq_all[row]).clamp_min_(0.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[current] = -1.0  # never chosen again, even among exact duplicates
        current = int(torch.argmax(min_dist))
        r2 = float(min_dist[current])
        reporter.step()
        if i + 1 == k:
            break
        if bound_max > r2:  # a dormant row may be the farthest: refresh the likely ones
            (d_rows, d_bound, d_since), active, min_dist = _revive(
                points, sq_all, selected[: i + 1], (d_rows, d_bound, d_since), active, min_dist, r2, slack, scratch
            )
            bound_max = float(d_bound.max()) if len(d_bound) else -math.inf
            pts, sq = points[active], sq_all[active]  # (A, P), (A,)
            current = int(torch.argmax(min_dist))
            r2 = float(min_dist[current])
        if ((i + 1) % 16 == 0 or ((i + 1) & i) == 0) and r2 > 0:
            near = min_dist < slack * slack * r2
            if 4 * int(near.sum()) > len(active):
                bound_max = max(bound_max, float(min_dist[near].max()))
                (d_rows, d_bound, d_since), active, min_dist = _retire(
                    near, i + 1, (d_rows, d_bound, d_since), active, min_dist)
                pts, sq = points[active], sq_all[active]  # (A, P), (A,)
                current = int(torch.argmax(min_dist))
    return selected


Dormant = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _retire(
    near: torch.Tensor, step: int, dormant: Dormant, active: torch.Tensor, min_dist: torch.Tensor,
) -> tuple[Dormant, torch.Tensor, torch.Tensor]:
    """Move the ``near`` active rows (well inside the radius) to the dormant set at ``step``."""
    rows, bounds, since = dormant
    since = torch.cat([since, torch.full((int(near.sum()),), step)])
    return (torch.cat([rows, active[near]]), torch.cat([bounds, min_dist[near]]), since), active[~near], min_dist[~near]


def _revive(
    points: torch.Tensor, sq_all: torch.Tensor, centres: np.ndarray, dormant: Dormant, active: torch.Tensor,
    min_dist: torch.Tensor, r2: float, slack: float, scratch: torch.Tensor,
) -> tuple[Dormant, torch.Tensor, torch.Tensor]:
    """Refresh dormant rows (``(rows, bounds, since)``, bounds: upper bounds of squared
    distances) when one may be farther than ``r2``, the largest squared distance of the
    ``active`` rows; returns the rows still dormant and the grown ``active``/``min_dist``."""
    d_rows, d_bound, d_since = dormant
    threshold = min(slack * slack * max(r2, 0.0), float(d_bound.max()))
    hot = d_bound >= threshold
    rows, bounds, since = _refresh(points, sq_all, centres, d_rows[hot], d_bound[hot], d_since[hot], threshold,
                                   scratch)
    far = bounds >= threshold  # up to date: they rejoin the update
    cold = ~hot
    dormant = (torch.cat([d_rows[cold], rows[~far]]), torch.cat([d_bound[cold], bounds[~far]]),
               torch.cat([d_since[cold], since[~far]]))
    return dormant, torch.cat([active, rows[far]]), torch.cat([min_dist, bounds[far]])


def _refresh(
    points: torch.Tensor,
    sq_all: torch.Tensor,
    selected: np.ndarray,
    rows: torch.Tensor,
    bounds: torch.Tensor,
    since: torch.Tensor,
    threshold: float,
    scratch: torch.Tensor,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bring dormant ``rows`` up to date with the ``selected`` centres, or below ``threshold``.

    Each row's ``bounds`` is its squared distance to the first ``since`` centres. The newer
    centres are visited ``chunk`` at a time in matrix products; a row stops as soon as its
    bound falls below ``threshold`` (it stays dormant). Returns the rows with their new
    bounds and ``since``: rows at or above ``threshold`` have seen every centre.
    """
    order = torch.argsort(since)
    rows, bounds, since = rows[order], bounds[order].clone(), since[order].clone()
    live = torch.arange(len(rows))  # positions still above threshold, in ``since`` order
    for start in range(int(since[0]) if len(rows) else len(selected), len(selected), chunk):
        stop = min(len(selected), start + chunk)
        n_due = int(torch.searchsorted(since[live], stop))  # rows that have not seen all of them
        if n_due == 0:
            continue
        due = live[:n_due]
        centres = torch.from_numpy(selected[start:stop])
        bounds[due] = torch.minimum(bounds[due], _min_sq_dist(points, sq_all, rows[due], centres, scratch))
        since[due] = stop
        live = torch.cat([due[bounds[due] >= threshold], live[n_due:]])
    return rows, bounds, since


def _min_sq_dist(
    points: torch.Tensor, sq_all: torch.Tensor, rows: torch.Tensor, centres: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """Squared distance from each of ``points[rows]`` to its nearest of ``points[centres]``."""
    c = points[centres]  # (C, P)
    c_sq = sq_all[centres]  # (C,)
    out = torch.empty(len(rows))
    step = max(1, len(scratch) // len(centres))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        d = scratch[: len(block) * len(centres)].view(len(block), len(centres))
        torch.addmm(c_sq.unsqueeze(0), points[block], c.T, alpha=-2.0, out=d)  # (B, C)
        torch.amin(d, dim=1, out=out[start : start + len(block)])
    return out.add_(sq_all[rows]).clamp_min_(0.0)


class _Progress:
    """Reports finished centres to ``callback`` in about a hundred steps."""

    def __init__(self, total: int, callback: Callable[[int], None] | None) -> None:
        self.total, self.callback, self.done = total, callback, 0
        self.every = max(1, total // 100)

    def step(self) -> None:
        self.done += 1
        if self.callback is not None and (self.done % self.every == 0 or self.done == self.total):
            self.callback(self.every if self.done % self.every == 0 else self.done % self.every)


def covering_radius(features: np.ndarray, centres: np.ndarray, *, chunk: int = 65536) -> float:
    """Largest distance from any feature to its nearest centre (the k-center objective).

    Args:
        features: ``(N, D)`` float32 or float16 (may be a memory map).
        centres: ``(K, D)``.
    """
    import faiss

    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    worst = 0.0
    for start in range(0, len(features), chunk):
        block = np.ascontiguousarray(features[start : start + chunk], dtype=np.float32)
        dist_sq, _ = index.search(block, 1)
        worst = max(worst, float(dist_sq.max()))
    return math.sqrt(max(worst, 0.0))
