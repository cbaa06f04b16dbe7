"""Detection and segmentation metrics: image AUROC, pixel AUROC, PRO, F1-optimal threshold."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

#: 8-connectivity for defect regions, as in the MVTec AD evaluation code.
_EIGHT = np.ones((3, 3), dtype=bool)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; ``labels`` 1 = defective."""
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """ROC AUC over all pixels of all images (``masks`` boolean, ``maps`` float, same shapes)."""
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    return float(roc_auc_score(y, s))


@dataclasses.dataclass(frozen=True)
class ProCurve:
    """Per-region overlap against false-positive rate, one point per distinct threshold.

    Attributes:
        fpr: ascending false-positive rates over nominal pixels.
        pro: mean over defect regions of the fraction of the region above the threshold.
        thresholds: the score thresholds, descending.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray


def pro_curve(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> ProCurve:
    """Exact PRO curve over every distinct threshold.

    Each defect pixel gets weight ``1 / (R * |region|)`` with R the number of connected
    regions (8-connectivity) over all images, so the cumulative weight of pixels at or above a
    threshold is the mean per-region overlap. Pixels are sorted once by descending score and
    ties are grouped, so the result is exact rather than sampled at fixed thresholds.
    """
    weights, background, scores = [], [], []
    n_regions = 0
    labelled = []
    for mask, amap in zip(masks, maps, strict=True):
        if mask.shape != amap.shape:
            raise ValueError(f"mask shape {mask.shape} differs from map shape {amap.shape}")
        lab, n = ndimage.label(mask, structure=_EIGHT)
        labelled.append((lab, n))
        n_regions += n
    if n_regions == 0:
        raise ValueError("PRO needs at least one defect region in the masks")
    for (lab, n), amap in zip(labelled, maps, strict=True):
        w = np.zeros(lab.shape, dtype=np.float64)
        if n:
            sizes = np.bincount(lab.ravel())[1:]  # (n,)
            inside = lab > 0
            w[inside] = 1.0 / (n_regions * sizes[lab[inside] - 1])
        weights.append(w.ravel())
        background.append((lab == 0).ravel())
        scores.append(amap.ravel())
    w = np.concatenate(weights)
    bg = np.concatenate(background)
    s = np.concatenate(scores).astype(np.float64)
    if not bg.any():
        raise ValueError("PRO needs nominal (background) pixels to measure false positives")
    order = np.argsort(-s, kind="stable")
    s, w, bg = s[order], w[order], bg[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    pro = np.cumsum(w)[last_of_tie]
    fpr = np.cumsum(bg)[last_of_tie] / bg.sum()
    return ProCurve(fpr=np.r_[0.0, fpr], pro=np.r_[0.0, pro], thresholds=np.r_[np.inf, s[last_of_tie]])


def pro_score(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in ``[0, max_fpr]``, divided by ``max_fpr``.

    Returns a value in [0, 1]; 1 means every region is fully found before any nominal pixel.
    """
    curve = pro_curve(masks, maps)
    return integrate_to(curve.fpr, curve.pro, max_fpr) / max_fpr


def integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[0, limit]`` (``x`` ascending from 0),
    interpolating ``y`` at ``limit``."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.sum() < len(x):
        nxt = np.argmax(~keep)
        frac = (limit - x[nxt - 1]) / (x[nxt] - x[nxt - 1])
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y[nxt - 1] + frac * (y[nxt] - y[nxt - 1])]
    return float(np.trapezoid(ys, xs))


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Score threshold maximising F1 on labelled images; returns ``(threshold, f1)``.

    An image is called defective when ``score >= threshold``.
    """
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return float(thresholds[best]), float(f1[best])


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the image ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr
