"""Promotion gates: metric floors and non-regression against the production bank."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Floors a candidate must reach, and how much worse than production it may be.

    Attributes:
        image_auroc_min, pro_min, pixel_auroc_min: floors; ``None`` disables one. PRO and
            pixel AUROC floors apply only where the evaluation set has masks.
        max_regression: largest allowed drop of any gated metric against the production
            bank on the same evaluation set.
        require_masks: a PRO or pixel-AUROC floor that cannot be evaluated (the evaluation
            set has no masks) fails instead of being reported as not evaluated.
        max_false_reject: ceiling on the fraction of good test images rejected at the bank's
            threshold (``None`` disables it): the re-inspections a plant pays for.
        max_miss_rate: ceiling on the fraction of defective test images the bank lets pass at
            its threshold (``None`` disables it): the defects that reach a customer.
        max_miss_increase, max_false_reject_increase: how much the miss rate and the false-reject
            rate may rise against the production bank, each bank deciding the same test images
            at its own threshold (``None`` disables one).
        confidence: a rise past ``max_*_increase`` fails only when it is beyond noise at this
            one-sided confidence (exact McNemar test on the images the two banks decide
            differently); a rise within noise passes and is flagged. ``None`` fails every
            observed rise past the setting.
    """

    image_auroc_min: float | None = 0.8
    pro_min: float | None = 0.6
    pixel_auroc_min: float | None = 0.8
    max_regression: float = 0.02
    require_masks: bool = False
    max_false_reject: float | None = None
    max_miss_rate: float | None = None
    max_miss_increase: float | None = 0.02
    max_false_reject_increase: float | None = 0.02
    confidence: float | None = 0.95

    def __post_init__(self) -> None:
        for name in ("image_auroc_min", "pro_min", "pixel_auroc_min"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"gates.{name} must be in [0, 1] or null, got {value}")
        for name in ("max_false_reject", "max_miss_rate", "max_miss_increase", "max_false_reject_increase"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"gates.{name} must be in [0, 1] or null, got {value}")
        if self.confidence is not None and not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"gates.confidence must be in [0.5, 1) or null, got {self.confidence}")
        if self.max_regression < 0:
            raise ValueError(f"gates.max_regression must be >= 0, got {self.max_regression}")


def check_gates(
    metrics: Mapping[str, Any],
    config: GateConfig,
    production: Mapping[str, Any] | None = None,
    *,
    synthetic: bool = False,
    decisions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Judge a candidate's metrics.

    Args:
        metrics: the candidate's evaluation (keys ``image_auroc``, ``pro``, ``pixel_auroc``,
            ``false_reject_rate``).
        config: the floors.
        production: the production bank's metrics on the same evaluation set, if any.
        synthetic: the metrics come from synthetic defects (``synthetic:SPEC``); every check
            is named so, and the result says it under ``"defects"``.
        decisions: the test images decided by both banks, each at its own threshold:
            ``labels`` (1 defective), ``candidate`` and ``production`` (True rejected; None
            without a production bank, with ``unavailable`` saying why where there is one),
            in the same image order. The operating-point gates
            against production need it; without it they are reported as not evaluated.

    Returns:
        ``{"passed": bool, "defects": "real" | "synthetic", "checks": [...], "failures": [reason, ...],
        "flags": [note, ...]}``;
        every check has
        ``name``, ``value``, ``limit``, ``passed`` and ``status`` (``"passed"``, ``"failed"``
        or ``"not evaluated"``, the last with a ``reason``). A floor that cannot be evaluated
        is listed, never silently dropped. ``flags`` are rises past a setting that passed
        because they are within noise.
    """
    checks: list[dict[str, Any]] = []
    prefix = "synthetic " if synthetic else ""
    floors = {
        "image_auroc": config.image_auroc_min,
        "pro": config.pro_min,
        "pixel_auroc": config.pixel_auroc_min,
    }
    for key, floor in floors.items():
        if floor is None:
            continue
        value = metrics.get(key)
        check = {"name": f"{prefix}{key} >= {floor}", "value": value, "limit": floor}
        if value is None and key != "image_auroc" and not config.require_masks:
            checks.append(check | {"passed": True, "status": "not evaluated",
                                   "reason": "the evaluation set has no masks (gates.require_masks: false)"})
            continue
        ok = value is not None and value >= floor
        checks.append(check | {"passed": ok, "status": "passed" if ok else "failed"}
                      | ({} if value is not None or key == "image_auroc" else
                         {"reason": "gates.require_masks is true but the evaluation set has no masks"}))
    if production:
        for key in floors:
            new, old = metrics.get(key), production.get(key)
            if new is None or old is None:
                continue
            limit = old - config.max_regression
            checks.append({
                "name": f"{prefix}{key} not below production {old:.4f} - {config.max_regression}",
                "value": new, "limit": limit, "passed": new >= limit,
                "status": "passed" if new >= limit else "failed",
            })
    for key, ceiling, count, what in (("false_reject_rate", config.max_false_reject, "n_good", "good"),
                                      ("miss_rate", config.max_miss_rate, "n_defect", "defective")):
        if ceiling is None:
            continue
        rate, n = metrics.get(key), metrics.get(count)
        check = {"name": f"{prefix}{key} <= {ceiling}", "value": rate, "limit": ceiling}
        if rate is None:
            checks.append(check | {"passed": False, "status": "failed",
                                   "reason": f"no {what} test images to measure it on"})
            continue
        check |= {"passed": rate <= ceiling, "status": "passed" if rate <= ceiling else "failed"}
        if n:
            low, high = rate_interval(round(rate * n), n, config.confidence or 0.95)
            check |= {"n": n, "interval": [low, high],
                      "detail": f"{round(rate * n)} of {n} {what} test images, interval {low:.3f}-{high:.3f}"}
        checks.append(check)
    for key, limit, label, what in (("miss_rate", config.max_miss_increase, 1, "defective"),
                                    ("false_reject_rate", config.max_false_reject_increase, 0, "good")):
        if limit is not None:
            checks.append(_rise_check(f"{prefix}{key}", limit, label, what, decisions, config.confidence))
    failures = [
        f"{c['name']} failed (got {c['value'] if c['value'] is None else round(c['value'], 4)})"
        + (f"; {c['reason']}" if "reason" in c else "") + (f"; {c['detail']}" if "detail" in c else "")
        for c in checks if not c["passed"]
    ]
    flags = [f"{c['name']}: {c['note']}" for c in checks if c["passed"] and "note" in c]
    return {"passed": not failures, "defects": "synthetic" if synthetic else "real", "checks": checks,
            "failures": failures, "flags": flags}


def rate_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a rate of ``k`` in ``n`` at ``confidence``."""
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k))
    return low, high


def rise_p_value(worse: int, better: int) -> float:
    """One-sided exact McNemar test: the chance of ``worse`` or more of the ``worse + better``
    images the two banks decide differently going against the candidate if neither bank
    were better (each such image a fair coin)."""
    n = worse + better
    # P(worse or more against) = P(better or fewer for), by the coin's symmetry: a sum
    # that ends where the binomial does, with no bound past it to get wrong.
    return sum(math.comb(n, i) for i in range(better + 1)) / 2**n


def _rise_check(key: str, limit: float, label: int, what: str, decisions: Mapping[str, Any] | None,
                confidence: float | None) -> dict[str, Any]:
    """How far the candidate's rate of wrong decisions on the ``label`` images rose against
    production's, on the same images, each bank at its own threshold."""
    name = f"{key} not above production's + {limit}"
    labels = list((decisions or {}).get("labels") or [])
    candidate, production = (decisions or {}).get("candidate"), (decisions or {}).get("production")
    idx = [i for i, y in enumerate(labels) if y == label]
    if production is None or candidate is None or not idx:
        why = (((decisions or {}).get("unavailable") or "there is no production bank to compare with")
               if decisions is not None and production is None
               else f"no {what} test images decided by both banks" if decisions is not None
               else "the banks' decisions on the test images were not given")
        return {"name": name, "value": None, "limit": limit, "passed": True, "status": "not evaluated", "reason": why}
    wrong = (lambda d: not d) if label == 1 else (lambda d: bool(d))  # a miss, or a false reject
    pairs = [(wrong(candidate[i]), wrong(production[i])) for i in idx]  # (candidate, production)
    n, new, old = len(pairs), sum(a for a, _ in pairs), sum(b for _, b in pairs)
    worse = sum(a and not b for a, b in pairs)
    better = sum(b and not a for a, b in pairs)
    value, base = new / n, old / n
    rise, p = value - base, rise_p_value(worse, better)
    detail = (f"{old} -> {new} of {n} {what} test images; {worse} decided worse and {better} better "
              f"than by production, p = {p:.3g}")
    check = {"name": name, "value": value, "limit": base + limit, "production": base, "rise": rise, "n": n,
             "worse": worse, "better": better, "p_value": p, "detail": detail}
    if rise <= limit + 1e-12:
        return check | {"passed": True, "status": "passed"}
    if confidence is not None and p >= 1.0 - confidence:
        return check | {"passed": True, "status": "passed",
                        "note": f"rose {rise:+.4f}, past the setting but within noise at {confidence:.0%} ({detail})"}
    return check | {"passed": False, "status": "failed"}


def judge(evaluation: Mapping[str, Any], config: GateConfig) -> dict[str, Any]:
    """The gates of an ``evaluation.json``: floors, non-regression and the operating point
    against production, each bank deciding the same test images at its own threshold."""
    metrics, production = evaluation["metrics"], evaluation.get("production")
    per_image, threshold = evaluation.get("per_image") or {}, metrics.get("threshold")
    decisions: dict[str, Any] | None = None
    if per_image.get("labels") is not None and threshold is not None:
        labels = per_image["labels"]
        scores, own = (production or {}).get("scores"), (production or {}).get("threshold")
        theirs = (None if scores is None or own is None or len(scores) != len(labels)
                  else [s >= own for s in scores])
        decisions = {"labels": labels, "candidate": [s >= threshold for s in per_image["scores"]],
                     "production": theirs}
        if production is not None and theirs is None:
            decisions["unavailable"] = "production was not scored on the same test images at a threshold"
    shown = None if production is None else {k: v for k, v in production.items() if k != "scores"}
    return check_gates(metrics, config, shown, synthetic=evaluation.get("evaluation_set") is not None,
                       decisions=decisions) | {"production_metrics": shown}
