"""Example images of the evaluation report: caught defects, misses and false alarms.

Each example is a row of three pictures: the original, its anomaly map over it with the
score scale beside it, and the ground-truth mask (or a note that there is none). Files are
named by group and index, never by the image's own name, which is input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.datasets import Sample
from pipeline.data.images import read_image, read_mask

from .overlay import colour_bar, heatmap_overlay, overlay_range
from .report_figures import BankScores
from .report_text import esc, number

#: Height in pixels of every picture of an example row (the colour bar's too); width at most MAX_WIDTH.
ROW_HEIGHT, MAX_WIDTH = 240, 360

GROUPS = {
    "caught": ("Caught defects", "defective images the candidate rejects, the highest-scoring of each type first"),
    "missed": ("Missed defects", "defective images the candidate passes, the lowest-scoring first"),
    "false_alarm": ("False alarms", "good images the candidate rejects, the highest-scoring first"),
}


def pick_examples(samples: Sequence[Sample], scores: np.ndarray, threshold: float, per_group: int
                  ) -> dict[str, list[int]]:
    """Indices of the examples of each group of :data:`GROUPS`, at most ``per_group`` each."""
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    by_kind: dict[str, list[int]] = {}
    for i in order:
        if samples[i].label == 1 and scores[i] >= threshold:
            by_kind.setdefault(samples[i].kind, []).append(i)
    caught: list[int] = []
    queues = list(by_kind.values())
    while len(caught) < per_group and any(queues):
        caught += [q.pop(0) for q in queues if q][: per_group - len(caught)]
    return {
        "caught": caught,
        "missed": [i for i in reversed(order) if samples[i].label == 1 and scores[i] < threshold][:per_group],
        "false_alarm": [i for i in order if samples[i].label == 0 and scores[i] >= threshold][:per_group],
    }


def _save(array: np.ndarray, path: Path, *, nearest: bool = False) -> None:
    """Save ``array`` scaled to :data:`ROW_HEIGHT` pixels high (at most :data:`MAX_WIDTH` wide)."""
    picture = Image.fromarray(array)
    scale = min(ROW_HEIGHT / picture.height, MAX_WIDTH / picture.width)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR).save(path)


def _row(group: str, i: int, sample: Sample, amap: np.ndarray, threshold: float, score: float,
         production: BankScores | None, out: Path) -> str:
    stem = f"{group}_{i}"
    image = read_image(sample.path)
    _save(image, out / f"{stem}_original.png")
    _save(heatmap_overlay(image, amap, threshold), out / f"{stem}_heatmap.png")
    low, high = overlay_range(amap, threshold)
    Image.fromarray(colour_bar(low, high if high > low else low + 1.0, threshold, height=ROW_HEIGHT)).save(
        out / f"{stem}_scale.png")
    if sample.mask:
        _save(read_mask(sample.mask, image.shape[:2]).astype(np.uint8) * 255, out / f"{stem}_mask.png", nearest=True)
        mask = f"<img class='mask' src='{stem}_mask.png' alt='ground-truth mask'>"
    else:
        why = "a good part: nothing to mark" if sample.label == 0 else "the dataset marks no pixels of this image"
        mask = f"<div class='no-mask'>no mask<br><small>{why}</small></div>"
    words = [f"<b>{esc(Path(sample.path).name)}</b>", f"type {esc(sample.kind)}",
             f"candidate score {number(score)} (threshold {number(threshold)})"]
    if production is not None:
        other = float(production.scores[i])
        verdict = ("— (no threshold)" if production.threshold is None else
                   "rejects it" if other >= production.threshold else "passes it")
        words.append(f"{esc(production.name)} {verdict}: score {number(other)}"
                     + (f" (threshold {number(production.threshold)})" if production.threshold is not None else ""))
    return (f"<tr class='example {group}'><td><img class='original' src='{stem}_original.png' alt='original'></td>"
            f"<td class='heat'><img class='heatmap' src='{stem}_heatmap.png' alt='anomaly map'>"
            f"<img class='colour-bar' src='{stem}_scale.png' alt='score scale'></td>"
            f"<td>{mask}</td><td class='caption'>{'<br>'.join(words)}</td></tr>")


def examples_section(samples: Sequence[Sample], scores: np.ndarray, maps: Sequence[np.ndarray] | None,
                     threshold: float | None, out: Path, *, per_group: int,
                     production: BankScores | None = None) -> str:
    """The example rows of every group, their pictures written into ``out``."""
    if threshold is None:
        return "<p>No threshold was set, so no image is a caught defect, a miss or a false alarm.</p>"
    if maps is None:
        return "<p>The anomaly maps of this evaluation were not kept, so no example can be shown.</p>"
    parts = []
    for group, chosen in pick_examples(samples, scores, threshold, per_group).items():
        name, what = GROUPS[group]
        rows = "".join(_row(group, i, samples[i], maps[i], threshold, float(scores[i]), production, out)
                       for i in chosen)
        parts.append(f"<h3>{name}</h3><p class='note'>{what}.</p>" + (
            "<table class='examples'><tr><th>original</th><th>anomaly map and score scale</th>"
            f"<th>ground-truth mask</th><th>image</th></tr>{rows}</table>" if rows else "<p>none</p>"))
    return "".join(parts)


def _outlined(sample_path: str, mask_path: str) -> np.ndarray:
    """The image in RGB with the mask's boundary drawn in red."""
    from scipy import ndimage

    image = read_image(sample_path)
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()
    mask = read_mask(mask_path, image.shape[:2])
    rgb[mask & ~ndimage.binary_erosion(mask, iterations=1)] = (255, 0, 0)
    return rgb


def synthetic_section(samples: Sequence[Sample], scores: np.ndarray, out: Path, synthetic: dict[str, Any],
                      per_family: int = 2) -> str:
    """How the synthetic defects of the evaluation set were made, with examples outlined."""
    settings = esc(json.dumps(synthetic.get("settings"), sort_keys=True))
    tiles = []
    for family in synthetic.get("settings", {}).get("families", []):
        shown = [(i, s) for i, s in enumerate(samples) if s.label == 1 and s.kind == family and s.mask]
        for i, sample in shown[:per_family]:
            name = f"synthetic_{i}.png"
            Image.fromarray(_outlined(sample.path, sample.mask or "")).save(out / name)
            tiles.append(f"<figure><img src='{name}' width='256'><figcaption>{esc(family)}: "
                         f"score {number(float(scores[i]))}</figcaption></figure>")
    return ("<h2>Synthetic defects</h2><p>The defective images of this evaluation are synthetic, made from "
            f"{esc(synthetic.get('n_good'))} good images ({esc(synthetic.get('good_from'))}), seed "
            f"{esc(synthetic.get('seed'))}, settings <code>{settings}</code>. Examples, mask outlined in red:</p>"
            + "".join(tiles))
