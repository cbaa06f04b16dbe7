"""One HTML report per evaluation, the page a quality engineer decides from.

It says what the candidate bank does to the test parts at its threshold and, beside it, what
the production bank does to the same parts at its own; the promotion gates with the status
of every check; score histograms with both thresholds; ROC and PRO curves; detection per
defect type; and examples of caught defects, misses and false alarms (original, heatmap with
its score scale, mask). The folder is self-contained: ``report.html`` and its PNGs, linked by
relative names, nothing fetched from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import Evaluation
from .metrics import pro_curve, roc_points
from .report_examples import examples_section, synthetic_section
from .report_figures import BankScores, pro_figure, roc_figure, score_histograms, thin, write_curve
from .report_text import (
    defect_type_table,
    esc,
    gates_section,
    method_words,
    metrics_table,
    operating_sentence,
    threshold_words,
)

STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.banks{display:flex;gap:1em;flex-wrap:wrap}.bank{flex:1;min-width:22em;border:1px solid #bbb;padding:.2em 1em}
.verdict.passed{color:#05620a}.verdict.failed{color:#a00}.gate.failed td{background:#fde4e4}
.gate.not-evaluated td{background:#f3f3f3}.note{color:#555}
table.examples td{vertical-align:top}td.heat{white-space:nowrap}td.heat img{vertical-align:top;margin-right:4px}
.no-mask{width:10em;height:240px;display:flex;flex-direction:column;justify-content:center;text-align:center;
background:#eee;color:#555}
"""


def _production_scores(result: Evaluation, production: dict[str, Any]) -> BankScores:
    scores = np.asarray(production.get("scores", []), dtype=np.float64)
    if scores.shape != result.scores.shape:
        raise ValueError(f"production scores must be aligned with the {len(result.samples)} test images "
                         f"(same images, same order), got {scores.shape[0] if scores.ndim else 0}")
    threshold = production.get("threshold")
    return BankScores(f"production {production.get('bank_id') or 'bank'}", scores,
                      None if threshold is None else float(threshold), "--")


def _decision(result: Evaluation, banks: list[BankScores], threshold_info: dict[str, Any] | None,
              production: dict[str, Any] | None) -> str:
    labels = result.labels
    candidate = banks[0]
    how = threshold_words(threshold_info, result.metrics)
    boxes = [f"<section class='bank' id='operating-candidate'><h3>Candidate</h3><p>"
             f"{esc(operating_sentence(labels, candidate.scores, candidate.threshold, how))}</p></section>"]
    if production is None:
        boxes.append("<section class='bank' id='operating-production'><h3>Production</h3><p>There is no "
                     "production bank, so there is nothing to compare with: the candidate would be the "
                     "first bank in production.</p></section>")
    else:
        bank = banks[1]
        how = f"production's own threshold, {method_words((production.get('metrics') or {}).get('threshold_method'))}"
        boxes.append(f"<section class='bank' id='operating-production'><h3>{esc(bank.name)}</h3><p>"
                     f"{esc(operating_sentence(labels, bank.scores, bank.threshold, how))}</p></section>")
    return ("<h2>Decision at the threshold</h2><p class='note'>A part whose score is at or above a bank's "
            "threshold is rejected. Both banks scored the same test images.</p>"
            f"<div class='banks'>{''.join(boxes)}</div>")


def _figures(result: Evaluation, banks: list[BankScores], out: Path, curves: Path) -> str:
    """The histograms and curves as PNGs in ``out``, the candidate's curves as CSV in ``curves``."""
    labels = result.labels
    # Header-only curves where a curve is undefined (one class only, no masks), so the files
    # DVC tracks as plots always exist.
    (curves / "roc.csv").write_text("fpr,tpr\n")
    (curves / "pro.csv").write_text("fpr,pro\n")
    parts = []
    if len(labels):
        score_histograms(out / "histogram.png", labels, banks)
        parts.append("<h2>Scores</h2><img class='figure' src='histogram.png' alt='score histograms'>")
    curve_images = []
    if (labels == 0).any() and (labels == 1).any():
        fpr, tpr = roc_points(labels, result.scores)
        write_curve(curves / "roc.csv", fpr, tpr, ("fpr", "tpr"))
        roc_figure(out / "roc.png", labels, banks)
        curve_images.append("<img class='figure' src='roc.png' alt='image ROC'>")
    if result.masks and result.maps is not None and any(m.any() for m in result.masks):
        curve = pro_curve(result.masks, result.maps)
        fx, fy = thin(curve.fpr, curve.pro)
        write_curve(curves / "pro.csv", fx, fy, ("fpr", "pro"))
        pro_figure(out / "pro.png", fx, fy)
        curve_images.append("<img class='figure' src='pro.png' alt='PRO curve'>")
    else:
        curve_images.append("<p>No PRO curve: the test images have no ground-truth masks.</p>")
    return "".join(parts) + "<h2>Curves</h2>" + "".join(curve_images)


def write_report(result: Evaluation, out_dir: str | Path, *, title: str, threshold: float | None,
                 worst: int = 4, curves_dir: str | Path | None = None,
                 synthetic: dict[str, Any] | None = None, dataset: str | None = None,
                 threshold_info: dict[str, Any] | None = None, production: dict[str, Any] | None = None,
                 gates: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` with its PNGs into ``out_dir`` and ``roc.csv``/``pro.csv`` into
    ``curves_dir`` (default ``out_dir``).

    Args:
        result: the candidate's evaluation; its maps give the examples' heatmaps.
        title: the heading; with ``dataset`` it reads ``"{title} on {dataset}"``, so the
            title then names the bank only.
        threshold: the candidate's threshold (``score >= threshold`` rejects); None falls
            back to ``threshold_info["value"]``.
        worst: examples shown per group (caught defects, misses, false alarms).
        synthetic: the evaluation set's record, for synthetic defects; adds a section with
            the generator settings and examples.
        dataset: the test images' dataset as the user named it (``"elpv:mono"``).
        threshold_info: how the threshold was chosen: ``value``, ``method`` or ``estimator``,
            ``n_calibration``, ``ci`` (``[low, high]`` or None) and ``chosen_on``.
        production: the production bank on the same test images: ``bank_id``,
            ``threshold``, ``scores`` (aligned with ``result.samples``) and ``metrics``;
            None when there is no production bank.
        gates: the result of :func:`pipeline.lifecycle.gates.check_gates`.

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: ``production["scores"]`` is not one score per test image.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = Path(curves_dir) if curves_dir else out
    curves.mkdir(parents=True, exist_ok=True)
    if threshold is None and threshold_info and threshold_info.get("value") is not None:
        threshold = float(threshold_info["value"])
    banks = [BankScores("candidate", result.scores, threshold)]
    if production is not None:
        banks.append(_production_scores(result, production))
    labels = result.labels
    heading = f"{title} on {dataset}" if dataset else title
    has_masks = any(s.mask for s in result.samples if s.label == 1)
    skipped = result.report.skipped
    summary = (f"{int((labels == 0).sum())} good and {int((labels == 1).sum())} defective test images"
               + (f"; {len(skipped)} unreadable file(s) skipped (listed at the end)" if skipped else "") + ".")
    production_metrics = (production.get("metrics") or {}) if production is not None else None
    body = (
        f"<h1>{esc(heading)}</h1><p>{esc(summary)}</p>"
        + _decision(result, banks, threshold_info, production)
        + "<h2>Promotion gates</h2>" + gates_section(gates)
        + _figures(result, banks, out, curves)
        + "<h2>Metrics</h2>" + metrics_table(result.metrics, production_metrics, banks[-1].name, has_masks=has_masks)
        + "<h2>Detection by defect type</h2>" + defect_type_table(result.samples, banks)
        + "<h2>Examples at the candidate's threshold</h2>"
        + examples_section(result.samples, result.scores, result.maps, threshold, out, per_group=worst,
                           production=banks[1] if production is not None else None)
        + (synthetic_section(result.samples, result.scores, out, synthetic) if synthetic else "")
        + ("<h2>Unreadable files</h2><ul>" + "".join(f"<li>{esc(Path(p).name)}: {esc(r)}</li>" for p, r in skipped)
           + "</ul>" if skipped else "")
    )
    page = out / "report.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(heading)}</title>"
                    f"<style>{STYLE}</style></head><body>{body}</body></html>\n", encoding="utf-8")
    return page
