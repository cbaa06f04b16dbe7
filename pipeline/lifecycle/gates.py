"""Promotion gates: metric floors and non-regression against the production bank."""

from __future__ import annotations

import dataclasses
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
    """

    image_auroc_min: float | None = 0.8
    pro_min: float | None = 0.6
    pixel_auroc_min: float | None = 0.8
    max_regression: float = 0.02
    require_masks: bool = False
    max_false_reject: float | None = None

    def __post_init__(self) -> None:
        for name in ("image_auroc_min", "pro_min", "pixel_auroc_min"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"gates.{name} must be in [0, 1] or null, got {value}")
        if self.max_false_reject is not None and not 0.0 <= self.max_false_reject <= 1.0:
            raise ValueError(f"gates.max_false_reject must be in [0, 1] or null, got {self.max_false_reject}")
        if self.max_regression < 0:
            raise ValueError(f"gates.max_regression must be >= 0, got {self.max_regression}")


def check_gates(
    metrics: Mapping[str, Any],
    config: GateConfig,
    production: Mapping[str, Any] | None = None,
    *,
    synthetic: bool = False,
) -> dict[str, Any]:
    """Judge a candidate's metrics.

    Args:
        metrics: the candidate's evaluation (keys ``image_auroc``, ``pro``, ``pixel_auroc``,
            ``false_reject_rate``).
        config: the floors.
        production: the production bank's metrics on the same evaluation set, if any.
        synthetic: the metrics come from synthetic defects (``synthetic:SPEC``); every check
            is named so, and the result says it under ``"defects"``.

    Returns:
        ``{"passed": bool, "defects": "real" | "synthetic", "checks": [...], "failures": [reason, ...]}``;
        every check has
        ``name``, ``value``, ``limit``, ``passed`` and ``status`` (``"passed"``, ``"failed"``
        or ``"not evaluated"``, the last with a ``reason``). A floor that cannot be evaluated
        is listed, never silently dropped.
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
    if config.max_false_reject is not None:
        rate = metrics.get("false_reject_rate")
        ok = rate is not None and rate <= config.max_false_reject
        checks.append({"name": f"false_reject_rate <= {config.max_false_reject}", "value": rate,
                       "limit": config.max_false_reject, "passed": ok, "status": "passed" if ok else "failed"}
                      | ({} if rate is not None else {"reason": "no good test images to measure it on"}))
    failures = [
        f"{c['name']} failed (got {c['value'] if c['value'] is None else round(c['value'], 4)})"
        + (f"; {c['reason']}" if "reason" in c else "")
        for c in checks if not c["passed"]
    ]
    return {"passed": not failures, "defects": "synthetic" if synthetic else "real", "checks": checks,
            "failures": failures}
