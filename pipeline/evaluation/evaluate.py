"""Scoring a labelled test set and summarising it: metrics, curves, decision threshold."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.data.datasets import LoadReport, Sample, batched, load_images
from pipeline.patchcore.model import PatchCore

from .metrics import f1_optimal_threshold, image_auroc, pixel_auroc, pro_score

#: Methods of :func:`choose_threshold`.
THRESHOLD_METHODS = ("auto", "nominal", "f1")


@dataclasses.dataclass
class Evaluation:
    """Per-image results of a test set and the metrics computed from them.

    Attributes:
        samples: the images scored (unreadable ones are in ``report``, not here).
        scores: ``(N,)`` image scores.
        maps: anomaly maps at original size (when kept).
        masks: ground-truth masks (when the dataset has them and maps were kept).
        metrics: see :func:`summarise`.
        report: files skipped as unreadable.
    """

    samples: list[Sample]
    scores: np.ndarray
    maps: list[np.ndarray] | None
    masks: list[np.ndarray] | None
    metrics: dict[str, Any]
    report: LoadReport

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def evaluate(
    model: PatchCore,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    keep_maps: bool = True,
    on_batch: Callable[[int], None] | None = None,
    threshold_method: str = "auto",
    target_false_reject: float = 0.01,
    fixed_threshold: tuple[float, str] | None = None,
) -> Evaluation:
    """Score ``samples`` with ``model`` and compute the metrics.

    Pixel metrics are computed only when some defective sample has a mask; images without
    a mask then count as all-nominal only if they are labelled good. ``threshold_method`` and
    ``target_false_reject`` choose the decision threshold from these images (see
    :func:`choose_threshold`); ``fixed_threshold`` ``(value, method)``, chosen elsewhere (on a
    calibration split), is used instead. The operating point is measured at the threshold.
    """
    with_masks = any(s.mask for s in samples if s.label == 1)
    report = LoadReport()
    done: list[Sample] = []
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for batch in batched(load_images(samples, report=report, with_masks=with_masks), batch_size):
        pred = model.predict([img for _, img, _ in batch], maps=keep_maps or with_masks)
        batch_maps: list[np.ndarray | None] = list(pred.maps) if pred.maps else [None] * len(batch)
        for (sample, _, mask), amap in zip(batch, batch_maps, strict=True):
            done.append(sample)
            if amap is not None and (keep_maps or (with_masks and (sample.label == 0 or sample.mask))):
                maps.append(amap)
                if with_masks:
                    assert mask is not None
                    masks.append(mask)
        scores.append(pred.scores)
        if on_batch is not None:
            on_batch(len(batch))
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    labels = np.array([s.label for s in done], dtype=np.int64)
    pixel_pairs = None
    if with_masks:
        usable = [i for i, s in enumerate(done) if s.label == 0 or s.mask]
        pixel_pairs = ([masks[i] for i in usable], [maps[i] for i in usable]) if keep_maps else (masks, maps)
    metrics = summarise(labels, all_scores, pixel_pairs, threshold_method, target_false_reject, fixed_threshold)
    metrics["n_skipped"] = len(report.skipped)
    return Evaluation(done, all_scores, maps if keep_maps else None, masks if with_masks else None, metrics, report)


def summarise(
    labels: np.ndarray,
    scores: np.ndarray,
    pixels: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    threshold_method: str = "auto",
    target_false_reject: float = 0.01,
    fixed_threshold: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """Metrics of one evaluation, as JSON-friendly values.

    Keys: ``image_auroc``, ``pixel_auroc``, ``pro`` (None where not computable), ``n_good``,
    ``n_defect``, the decision ``threshold`` with its ``threshold_method``, and the operating
    point there (:func:`operating_point`).
    """
    n_good, n_defect = int((labels == 0).sum()), int((labels == 1).sum())
    both = n_good > 0 and n_defect > 0
    out: dict[str, Any] = {
        "image_auroc": image_auroc(labels, scores) if both else None,
        "pixel_auroc": None,
        "pro": None,
        "n_good": n_good,
        "n_defect": n_defect,
    }
    if pixels is not None and both:
        out["pixel_auroc"] = pixel_auroc(*pixels)
        out["pro"] = pro_score(*pixels)
    if fixed_threshold is not None:
        out.update({"threshold": fixed_threshold[0], "threshold_method": fixed_threshold[1]})
    else:
        out.update(choose_threshold(labels, scores, threshold_method, target_false_reject))
    out.update(operating_point(labels, scores, out["threshold"]))
    return out


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """What deciding at ``threshold`` (``score >= threshold`` rejects) does to these images:
    ``false_reject_rate`` of the good ones, ``miss_rate`` of the defective ones and ``f1``
    (each None where its class is absent or there is no threshold)."""
    if threshold is None:
        return {"false_reject_rate": None, "miss_rate": None, "f1": None}
    rejected = scores >= threshold
    good, bad = labels == 0, labels == 1
    tp, fp, fn = int((rejected & bad).sum()), int((rejected & good).sum()), int((~rejected & bad).sum())
    return {"false_reject_rate": float(fp / good.sum()) if good.any() else None,
            "miss_rate": float(fn / bad.sum()) if bad.any() else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if bad.any() else None}


def default_method(synthetic: bool) -> str:
    """The threshold method of an evaluation without settings (``tracebank fit``/``evaluate``):
    never tuned on synthetic defects (``"nominal"``), else ``"auto"``."""
    return "nominal" if synthetic else "auto"


def choose_threshold(
    labels: np.ndarray, scores: np.ndarray, method: str = "auto", target_false_reject: float = 0.01
) -> dict[str, Any]:
    """The decision threshold of a bank, from scored images.

    Args:
        labels: 1 defective, 0 good.
        scores: image scores.
        method: ``"nominal"``: the ``1 - target_false_reject`` quantile of the good images'
            scores, so about that fraction of good parts is rejected; ``"f1"``: the F1-optimal
            threshold over good and defective images (both must be present); ``"auto"``:
            ``"f1"`` when both classes are present, else ``"nominal"``.
        target_false_reject: the fraction of good parts a ``"nominal"`` threshold rejects.

    Returns:
        ``{"threshold", "threshold_method"}`` (both None when nothing fits), plus ``"f1"`` for
        an F1-optimal threshold. The method is named as stored in manifests:
        ``"f1_optimal"`` or ``"nominal_quantile_<q>"``.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {', '.join(THRESHOLD_METHODS)}, got {method!r}")
    if not 0.0 <= target_false_reject < 1.0:
        raise ValueError(f"target_false_reject must be in [0, 1), got {target_false_reject}")
    good, bad = (labels == 0).any(), (labels == 1).any()
    if method == "f1" or (method == "auto" and good and bad):
        if not (good and bad):
            return {"threshold": None, "threshold_method": None}
        value, f1 = f1_optimal_threshold(labels, scores)
        return {"threshold": value, "threshold_method": "f1_optimal", "f1": f1}
    if not good:
        return {"threshold": None, "threshold_method": None}
    quantile = round(1.0 - target_false_reject, 6)
    value = float(np.quantile(scores[labels == 0], quantile))
    return {"threshold": value, "threshold_method": f"nominal_quantile_{quantile:g}"}
