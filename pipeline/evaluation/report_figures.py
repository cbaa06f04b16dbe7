"""The figures of the evaluation report: score histograms, ROC and PRO curves, and their CSV files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .metrics import roc_points


@dataclass(frozen=True)
class BankScores:
    """One bank's image scores on the test images and its decision threshold.

    Attributes:
        name: how the page names the bank (``"candidate"``, ``"production abc123"``).
        scores: ``(N,)`` image scores, aligned with the test samples.
        threshold: ``score >= threshold`` rejects; None when the bank has none.
        style: matplotlib line style of its threshold and curve.
    """

    name: str
    scores: np.ndarray
    threshold: float | None
    style: str = "-"


GOOD_COLOUR, DEFECT_COLOUR = "tab:green", "tab:red"
LINE_COLOURS = ("black", "tab:blue")


def write_curve(path: Path, x: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> None:
    rows = [f"{names[0]},{names[1]}"] + [f"{a:.6f},{b:.6f}" for a, b in zip(x, y, strict=True)]
    path.write_text("\n".join(rows) + "\n")


def thin(x: np.ndarray, y: np.ndarray, limit: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` evenly spaced points of a curve, its ends kept."""
    if len(x) <= limit:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
    return x[keep], y[keep]


def score_histograms(path: Path, labels: np.ndarray, banks: Sequence[BankScores]) -> None:
    """One panel per bank: its good and defective images' scores, with every bank's threshold
    drawn as a vertical line (the panel's own bank solid and first in the legend)."""
    fig = Figure(figsize=(5.2 * len(banks), 3.4), dpi=100)
    for k, bank in enumerate(banks):
        ax = fig.add_subplot(1, len(banks), k + 1)
        bins = np.histogram_bin_edges(bank.scores, bins=min(30, max(5, len(bank.scores) // 3))).tolist()
        for label, name, colour in ((0, "good", GOOD_COLOUR), (1, "defective", DEFECT_COLOUR)):
            chosen = bank.scores[labels == label]
            if len(chosen):
                ax.hist(chosen, bins=bins, alpha=0.55, color=colour, label=f"{name} ({len(chosen)})")
        for other in sorted(banks, key=lambda b: b is not bank):
            if other.threshold is not None:
                colour = LINE_COLOURS[list(banks).index(other) % len(LINE_COLOURS)]
                ax.axvline(other.threshold, color=colour, linestyle=other.style, linewidth=1.6,
                           label=f"{other.name} threshold {other.threshold:.4g}")
        ax.set(xlabel="image score", ylabel="images", title=f"scores of the {bank.name} bank")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def roc_figure(path: Path, labels: np.ndarray, banks: Sequence[BankScores]) -> None:
    """The image ROC of every bank, each with a dot where its threshold puts it."""
    fig = Figure(figsize=(4.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for k, bank in enumerate(banks):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        fpr, tpr = roc_points(labels, bank.scores)
        ax.plot(fpr, tpr, color=colour, linestyle=bank.style, label=bank.name)
        if bank.threshold is not None:
            rejected = bank.scores >= bank.threshold
            point = (rejected[labels == 0].mean(), rejected[labels == 1].mean())
            ax.plot(*point, "o", color=colour, label=f"{bank.name} at its threshold")
    ax.set(xlabel="false positive rate (good parts rejected)", ylabel="true positive rate (defects caught)",
           title="Image ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def pro_figure(path: Path, fpr: np.ndarray, pro: np.ndarray) -> None:
    """The per-region-overlap curve up to a false positive rate of 0.3."""
    fig = Figure(figsize=(4.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(fpr, pro, color=LINE_COLOURS[0])
    ax.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title="PRO (FPR <= 0.3)",
           xlim=(0, 0.3), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
