"""The words of the evaluation report: metric names, numbers, operating points and gates in sentences.

Everything here returns plain text or HTML with every string from data escaped (file names,
defect types, bank ids and gate reasons are input, never markup) and every absolute path cut
to its last part, so a page names no folder of the machine it was made on.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.data.datasets import Sample

from .report_figures import BankScores

#: Names of metrics on the page, in the order of the metrics table.
METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pro": "PRO (FPR <= 0.3)",
    "threshold": "Threshold",
    "threshold_method": "Threshold method",
    "threshold_chosen_on": "Threshold chosen on",
    "false_reject_rate": "False-reject rate (good parts rejected)",
    "miss_rate": "Miss rate (defects passed)",
    "f1": "F1 at the threshold",
    "n_good": "Good test images",
    "n_defect": "Defective test images",
    "n_skipped": "Unreadable images skipped",
    "seconds": "Evaluation time",
}
#: Shorter names where a metric key stands inside a gate's name.
GATE_NAMES = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "pro": "PRO (FPR <= 0.3)",
              "false_reject_rate": "False-reject rate", "miss_rate": "Miss rate", "f1": "F1"}
_GATE_KEY = re.compile(r"\b(" + "|".join(GATE_NAMES) + r")\b")
#: An absolute path: a slash at the start of the text or after a space, colon, equals sign, bracket or quote.
_ABSOLUTE = re.compile(r"(?:^|(?<=[\s:=(\[,'\"]))/(?:[^\s/:'\"<>,;()]+/)*([^\s/:'\"<>,;()]+)/?")


def public(text: str) -> str:
    """``text`` with every absolute path cut to ``…/its-last-part``."""
    return _ABSOLUTE.sub(lambda m: f"…/{m.group(1)}", text)


def esc(value: object) -> str:
    """A string from data, made safe to put into HTML text or a quoted attribute."""
    return html.escape(public(str(value)), quote=True)


def number(value: float) -> str:
    return f"{value:.4g}"


def share(count: int, total: int) -> str:
    """``"3 of 120 (2.5%)"``."""
    return f"{count} of {total} ({100.0 * count / total:.1f}%)"


def method_words(method: str | None) -> str:
    """A threshold method as stored in manifests, in words."""
    if not method:
        return "method not recorded"
    if method == "f1_optimal":
        return "F1-optimal"
    if method.startswith("nominal_quantile_"):
        return f"nominal quantile {method.removeprefix('nominal_quantile_')}"
    return method.replace("_", " ")


def threshold_words(info: Mapping[str, Any] | None, metrics: Mapping[str, Any]) -> str:
    """How a threshold was chosen: ``"nominal quantile 0.99 from 55 calibration images; ..."``."""
    given = info or {}
    method = given.get("method") or given.get("estimator") or metrics.get("threshold_method")
    words = method_words(method)
    if given.get("estimator") and given.get("estimator") != method:
        words += f" ({method_words(given['estimator'])})"
    chosen_on = given.get("chosen_on") or metrics.get("threshold_chosen_on")
    if given.get("n_calibration"):
        words += f" from {given['n_calibration']} calibration images"
    elif chosen_on:
        words += f", chosen on the {chosen_on}"
    if info is not None:
        ci = given.get("ci")
        def bound(value: Any) -> str:
            return "unbounded" if value is None else number(value)

        words += (f"; confidence interval {bound(ci[0])} to {bound(ci[1])}"
                  + (" (too few calibration images to bound it above)" if ci[1] is None else "") if ci
                  else "; no confidence interval given")
    return words


def operating_sentence(labels: np.ndarray, scores: np.ndarray, threshold: float | None, how: str) -> str:
    """What deciding at ``threshold`` (``score >= threshold`` rejects) does, counted in parts."""
    if threshold is None:
        return "Has no threshold, so it neither rejects nor passes any part: there is no operating point."
    rejected = scores >= threshold
    good, bad = labels == 0, labels == 1
    false_rejects = (f"Rejects {share(int((rejected & good).sum()), int(good.sum()))} good parts" if good.any()
                     else "Has no good test images to count false rejects on")
    misses = (f"misses {share(int((~rejected & bad).sum()), int(bad.sum()))} defects" if bad.any()
              else "has no defective test images to count misses on")
    return f"{false_rejects} and {misses} at threshold {number(threshold)} ({how})."


def metric_value(key: str, value: Any, *, has_masks: bool) -> str:
    """One metric as a reader reads it; a missing value says why it is missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        if key in ("pixel_auroc", "pro"):
            return "not evaluated (no masks)" if not has_masks else "not evaluated (needs good and defective images)"
        return {"image_auroc": "not evaluated (needs good and defective images)",
                "false_reject_rate": "— (no good test images or no threshold)",
                "miss_rate": "— (no defective test images or no threshold)",
                "f1": "— (no defective test images or no threshold)",
                "threshold": "— (none could be chosen)"}.get(key, "— (not recorded)")
    if key == "threshold_method":
        return method_words(str(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in ("false_reject_rate", "miss_rate") and isinstance(value, int | float):
        return f"{100.0 * value:.1f}%"
    if key == "seconds" and isinstance(value, int | float):
        return f"{value:.1f} s"
    if key == "threshold" and isinstance(value, int | float):
        return number(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def metrics_table(candidate: Mapping[str, Any], production: Mapping[str, Any] | None, production_name: str,
                  *, has_masks: bool) -> str:
    """The metrics of the candidate and, in a second column, of the production bank."""
    keys = [k for k in METRIC_NAMES if k in candidate or (production and k in production)]
    keys += sorted(k for k in {*candidate, *(production or {})} if k not in METRIC_NAMES)
    head = "<tr><th>metric</th><th>candidate</th>" + (f"<th>{esc(production_name)}</th>" if production else "")
    rows = []
    for key in keys:
        cells = [metric_value(key, candidate.get(key), has_masks=has_masks)]
        if production is not None:
            cells.append(metric_value(key, production.get(key), has_masks=has_masks))
        name = METRIC_NAMES.get(key, key.replace("_", " ").capitalize())
        rows.append(f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return f"<table class='metrics'>{head}</tr>{''.join(rows)}</table>"


def gates_section(gates: Mapping[str, Any] | None) -> str:
    """Every check of :func:`pipeline.lifecycle.gates.check_gates`' result with its status in words."""
    if gates is None:
        return "<p>The promotion gates were not run for this report.</p>"
    checks: Sequence[Mapping[str, Any]] = gates.get("checks", [])
    status = [c.get("status") or ("passed" if c.get("passed") else "failed") for c in checks]
    failed, open_ = status.count("failed"), status.count("not evaluated")
    verdict = (f"<p class='verdict passed'>Passed: every gate that could be evaluated holds ({len(checks) - open_} "
               "checks), so the candidate may be promoted." if gates.get("passed") else
               f"<p class='verdict failed'>Failed: {failed} of {len(checks)} checks failed, so the candidate "
               "is not promoted.")
    if open_:
        verdict += f" {open_} could not be evaluated; the reason stands beside each."
    if gates.get("defects") == "synthetic":
        verdict += " The checks are on synthetic defects."
    rows = []
    for check, state in zip(checks, status, strict=True):
        name = _GATE_KEY.sub(lambda m: GATE_NAMES[m.group(1)], str(check.get("name", "unnamed check")))
        value, limit = check.get("value"), check.get("limit")
        shown = (number(value) if isinstance(value, int | float) else
                 "not evaluated" if state == "not evaluated" else "— (not measured)")
        reason = check.get("reason")
        words = state + (f": {reason}" if reason else "")
        rows.append(f"<tr class='gate {esc(state.replace(' ', '-'))}'><td>{esc(name)}</td><td>{esc(shown)}</td>"
                    f"<td>{esc(number(limit) if isinstance(limit, int | float) else '—')}</td>"
                    f"<td class='status'>{esc(words)}</td></tr>")
    table = ("<table class='gates'><tr><th>check</th><th>value</th><th>limit</th><th>status</th></tr>"
             + "".join(rows) + "</table>")
    return verdict + "</p>" + (table if checks else "<p>No gate was configured.</p>")


def defect_type_table(samples: Sequence[Sample], banks: Sequence[BankScores]) -> str:
    """Per defect type, how many images each bank rejects at its threshold; good parts last."""
    kinds = sorted({s.kind for s in samples if s.label == 1})
    groups = [(f"{kind}", "caught", [s.label == 1 and s.kind == kind for s in samples]) for kind in kinds]
    groups.append(("good parts", "falsely rejected", [s.label == 0 for s in samples]))
    head = "<tr><th>type</th><th>images</th>" + "".join(f"<th>{esc(b.name)}</th>" for b in banks) + "</tr>"
    rows = []
    for name, verb, member in groups:
        chosen = np.array(member, dtype=bool)
        if not chosen.any():
            continue
        cells = [f"{verb} {share(int((b.scores[chosen] >= b.threshold).sum()), int(chosen.sum()))}"
                 if b.threshold is not None else "— (no threshold)" for b in banks]
        rows.append(f"<tr><td>{esc(name)}</td><td>{int(chosen.sum())}</td>"
                    + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return f"<table class='types'>{head}{''.join(rows)}</table>"
