"""Estimators of the decision threshold from good calibration scores, with a confidence interval.

A nominal threshold is the ``1 - target_false_reject`` quantile of good parts' scores. Read off
a few dozen calibration images, the 0.99 quantile sits between the largest two or three of
them, so one new good image landing in calibration can move it by the gap between those
(ELPV mono: 21.63 -> 23.10, the miss rate 13.7% -> 21.1%). The estimators here trade that
jump against bias in different ways; ``"hold"`` keeps production's threshold until the
evidence says it is wrong. ``BENCHMARKS.md`` ("Threshold stability") measures them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from scipy import stats

#: The estimators :func:`estimate` knows, and the ones ``"hold"`` can build on.
ESTIMATORS = ("quantile", "unbiased_frr", "harrell_davis", "bootstrap", "normal", "lognormal", "hold")
BASES = ("quantile", "unbiased_frr", "harrell_davis", "bootstrap", "normal", "lognormal")

#: Resamples and seed of the ``"bootstrap"`` estimator (fixed, so an estimate is reproducible).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def estimate(
    good_scores: np.ndarray,
    target_false_reject: float = 0.01,
    estimator: str = "quantile",
    *,
    confidence: float = 0.95,
    previous: float | None = None,
    base: str = "unbiased_frr",
) -> dict[str, Any]:
    """The decision threshold for good parts scoring ``good_scores``, and how sure it is.

    Estimators of the ``p = 1 - target_false_reject`` quantile of good scores:

    - ``"quantile"``: numpy's linear-interpolation quantile, exactly today's ``"nominal"``
      threshold of :func:`~pipeline.evaluation.evaluate.choose_threshold` on the same scores.
      Its expected false-reject rate is about ``target + 1 / (N + 1)``: 2.9% for N = 52 at 1%.
    - ``"unbiased_frr"``: the quantile at position ``p (N + 1)`` (numpy's ``"weibull"``),
      whose expected false-reject rate on new good parts is the target when
      ``N + 1 >= 1 / target``; below that it is the largest score (expected rate ``1 / (N + 1)``).
    - ``"harrell_davis"``: the Harrell-Davis quantile, a Beta((n+1)p, (n+1)(1-p)) weighted
      mean of all order statistics (weights mostly on the largest few at p = 0.99).
    - ``"bootstrap"``: the mean of the quantiles of ``BOOTSTRAP_RESAMPLES`` smoothed bootstrap
      resamples (Gaussian jitter of Silverman's bandwidth), seed ``BOOTSTRAP_SEED``.
    - ``"normal"``: ``mean + z_p * sd`` of a normal fitted to all the scores.
    - ``"lognormal"``: the same on log scores, exponentiated (scores must be positive).
    - ``"hold"``: ``previous`` (production's threshold) while it lies inside the confidence
      interval of the ``base`` estimate on these scores, else that estimate. Without
      ``previous`` it is the ``base`` estimate.

    Args:
        good_scores: ``(N,)`` image scores of good calibration images.
        target_false_reject: the fraction of good parts to reject, in (0, 1).
        estimator: one of :data:`ESTIMATORS`.
        confidence: coverage of the interval, in (0, 1).
        previous: the threshold in use (for ``"hold"``; ignored by the others).
        base: the estimator ``"hold"`` compares ``previous`` with, one of :data:`BASES`.

    Returns:
        ``{"value", "estimator", "ci", "n_calibration", "kept_previous"}``: the threshold, the
        estimator's name (``"hold(unbiased_frr)"`` for a hold), ``[lo, hi]`` the equal-tailed
        ``confidence`` interval of the quantile (of the base for a hold; an end may be
        infinite), the number of scores and whether ``previous`` was kept.

    Raises:
        ValueError: for an unknown estimator or base, a target or confidence outside (0, 1),
            no scores, non-finite scores, fewer than two scores for a normal fit, or a
            non-positive score for a lognormal one.

    Note:
        ``"unbiased_frr"`` is the recommended estimator (BENCHMARKS.md, "Threshold stability"):
        on MTD, ELPV mono and poly at calibration 0.1 no landing of 1 or 5 new good images
        moved its FRR by more than 0.01 in 95% of draws, and its mean FRR over resampled
        calibration sets is 1.1-1.9% against today's quantile's 1.8-2.7%. ``"hold"`` stays still
        by construction but, with the unbounded interval below, cannot lower a threshold that
        is too high.

        The interval of the nonparametric estimators is the distribution-free order-statistic
        interval ``[x_(l), x_(u)]`` (Binomial(N, p) ranks). It is unbounded above until
        ``N`` is large enough (at p = 0.99, 95%: N >= 367): a few dozen good images cannot
        say how high the 0.99 quantile is. The normal and lognormal intervals are exact under
        their model (noncentral t), and much narrower for it.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"threshold estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator == "hold" and base not in BASES:
        raise ValueError(f"base of a hold must be one of {', '.join(BASES)}, got {base!r}")
    if not 0.0 < target_false_reject < 1.0:
        raise ValueError(f"target_false_reject must be in (0, 1), got {target_false_reject}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores = np.asarray(good_scores).ravel()
    if scores.size == 0:
        raise ValueError("no good calibration scores to choose a threshold on")
    if not np.isfinite(scores).all():
        raise ValueError("good calibration scores must be finite")
    p = round(1.0 - target_false_reject, 6)
    name = estimator if estimator != "hold" else base
    value, ci = _ESTIMATE[name](scores, p, confidence)
    kept = estimator == "hold" and previous is not None and ci[0] <= previous <= ci[1]
    return {
        "value": float(previous) if kept and previous is not None else value,
        "estimator": f"hold({base})" if estimator == "hold" else estimator,
        "ci": [ci[0], ci[1]],
        "n_calibration": int(scores.size),
        "kept_previous": bool(kept),
    }


@functools.lru_cache(maxsize=1024)
def order_statistic_ranks(n: int, p: float, confidence: float) -> tuple[int, int]:
    """1-based ranks ``(l, u)`` with ``P(x_(l) <= xi_p <= x_(u)) >= confidence`` for any
    continuous distribution, equal-tailed: each side misses with probability at most
    ``(1 - confidence) / 2``. ``l = 0`` stands for minus infinity, ``u = n + 1`` for infinity.

    Note:
        The number ``B`` of the ``n`` scores below ``xi_p`` is Binomial(n, p), and
        ``x_(l) <= xi_p`` exactly when ``B >= l``: ``l`` is the largest rank with
        ``P(B <= l - 1) <= alpha / 2``, ``u`` the smallest with ``P(B >= u) <= alpha / 2``.
    """
    half = (1.0 - confidence) / 2.0
    ranks = np.arange(n + 2)  # candidate ranks 0..n+1
    below = stats.binom.cdf(ranks - 1, n, p)  # P(B <= r - 1)
    above = stats.binom.sf(ranks - 1, n, p)  # P(B >= r)
    lo = int(ranks[below <= half + 1e-12].max())
    hi = int(ranks[1:][above[1:] <= half + 1e-12].min())
    return lo, hi


def _order_interval(ordered: np.ndarray, p: float, confidence: float) -> tuple[float, float]:
    lo, hi = order_statistic_ranks(len(ordered), p, confidence)
    return (float(ordered[lo - 1]) if lo >= 1 else -math.inf,
            float(ordered[hi - 1]) if hi <= len(ordered) else math.inf)


def _quantile(scores: np.ndarray, p: float, confidence: float) -> tuple[float, tuple[float, float]]:
    # the same call as choose_threshold, on the scores as given (float32 stays float32)
    value = float(np.quantile(scores, p))
    return value, _order_interval(np.sort(scores.astype(np.float64)), p, confidence)


def _unbiased_frr(scores: np.ndarray, p: float, confidence: float) -> tuple[float, tuple[float, float]]:
    # a new good score exceeds the r-th of N order statistics with probability (N + 1 - r) / (N + 1)
    value = float(np.quantile(scores, p, method="weibull"))
    return value, _order_interval(np.sort(scores.astype(np.float64)), p, confidence)


def harrell_davis_weights(n: int, p: float) -> np.ndarray:
    """``(n,)`` weights of the order statistics in the Harrell-Davis ``p`` quantile:
    ``I_{i/n}(a, b) - I_{(i-1)/n}(a, b)`` with ``a = (n+1)p``, ``b = (n+1)(1-p)``."""
    edges = stats.beta.cdf(np.arange(n + 1) / n, (n + 1) * p, (n + 1) * (1 - p))
    return np.diff(edges)


def _harrell_davis(scores: np.ndarray, p: float, confidence: float) -> tuple[float, tuple[float, float]]:
    ordered = np.sort(scores.astype(np.float64))
    value = float(harrell_davis_weights(len(ordered), p) @ ordered)
    return value, _order_interval(ordered, p, confidence)


def _bootstrap(scores: np.ndarray, p: float, confidence: float) -> tuple[float, tuple[float, float]]:
    x = scores.astype(np.float64)
    n = len(x)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    iqr = float(np.subtract(*np.quantile(x, [0.75, 0.25])))
    spread = min(float(x.std(ddof=1)) if n > 1 else 0.0, iqr / 1.349) or float(x.std())
    bandwidth = 0.9 * spread * n ** -0.2  # Silverman's rule
    resamples = x[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))]  # (B, n)
    resamples += bandwidth * rng.standard_normal(resamples.shape)
    replicates = np.quantile(resamples, p, axis=1)  # (B,)
    half = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(replicates, [half, 1.0 - half])
    return float(replicates.mean()), (float(lo), float(hi))


@functools.lru_cache(maxsize=1024)
def normal_quantile_factors(n: int, p: float, confidence: float) -> tuple[float, float, float]:
    """``(k, k_lo, k_hi)``: the ``p`` quantile of a normal sample of size ``n`` is estimated
    as ``mean + k * sd`` and lies in ``[mean + k_lo * sd, mean + k_hi * sd]`` with probability
    ``confidence``. ``k_hi`` is the one-sided tolerance factor at ``(1 + confidence) / 2``.

    Note:
        ``sqrt(n) (xi_p - mean) / sd`` is noncentral t with ``n - 1`` degrees of freedom and
        noncentrality ``z_p sqrt(n)``, so the interval is exact for normal scores.
    """
    z = float(stats.norm.ppf(p))
    half = (1.0 - confidence) / 2.0
    t_lo, t_hi = stats.nct.ppf([half, 1.0 - half], n - 1, z * math.sqrt(n))
    return z, float(t_lo) / math.sqrt(n), float(t_hi) / math.sqrt(n)


def _normal(scores: np.ndarray, p: float, confidence: float) -> tuple[float, tuple[float, float]]:
    x = scores.astype(np.float64)
    if len(x) < 2:
        raise ValueError(f"a normal threshold needs at least 2 good scores, got {len(x)}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    k, k_lo, k_hi = normal_quantile_factors(len(x), p, confidence)
    return mean + k * sd, (mean + k_lo * sd, mean + k_hi * sd)


def _lognormal(scores: np.ndarray, p: float, confidence: float) -> tuple[float, tuple[float, float]]:
    if (scores <= 0).any():
        raise ValueError("a lognormal threshold needs positive scores; use the normal or quantile estimator")
    value, (lo, hi) = _normal(np.log(scores.astype(np.float64)), p, confidence)
    return math.exp(value), (math.exp(lo), math.exp(hi))


_ESTIMATE = {"quantile": _quantile, "unbiased_frr": _unbiased_frr, "harrell_davis": _harrell_davis,
             "bootstrap": _bootstrap, "normal": _normal, "lognormal": _lognormal}
