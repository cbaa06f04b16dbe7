"""Scoring a labelled test set and summarising it: metrics, curves, decision threshold."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.data.datasets import LoadReport, Sample, batched, load_images
from pipeline.patchcore.model import PatchCore

from .metrics import f1_optimal_threshold, image_auroc, pixel_auroc, pro_score

#: Quantile of held-out nominal scores used as the threshold when no defective image exists.
NOMINAL_QUANTILE = 0.99


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
) -> Evaluation:
    """Score ``samples`` with ``model`` and compute the metrics.

    Pixel metrics are computed only when some defective sample has a mask; images without
    a mask then count as all-nominal only if they are labelled good.
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
    metrics = summarise(labels, all_scores, pixel_pairs)
    metrics["n_skipped"] = len(report.skipped)
    return Evaluation(done, all_scores, maps if keep_maps else None, masks if with_masks else None, metrics, report)


def summarise(
    labels: np.ndarray,
    scores: np.ndarray,
    pixels: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Metrics of one evaluation, as JSON-friendly values.

    Keys: ``image_auroc``, ``pixel_auroc``, ``pro`` (None where not computable), ``n_good``,
    ``n_defect``, and the decision ``threshold`` with its ``threshold_method``.
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
    out.update(choose_threshold(labels, scores))
    return out


def choose_threshold(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Decision threshold: F1-optimal when both classes are present, else a high quantile
    of the nominal scores (``NOMINAL_QUANTILE``), so normal-only validation sets still get a
    threshold that flags what scores above almost all good parts."""
    if len(scores) == 0:
        return {"threshold": None, "threshold_method": None}
    if (labels == 1).any() and (labels == 0).any():
        value, f1 = f1_optimal_threshold(labels, scores)
        return {"threshold": value, "threshold_method": "f1_optimal", "f1": f1}
    if (labels == 0).any():
        value = float(np.quantile(scores[labels == 0], NOMINAL_QUANTILE))
        return {"threshold": value, "threshold_method": f"nominal_quantile_{NOMINAL_QUANTILE}"}
    return {"threshold": None, "threshold_method": None}
