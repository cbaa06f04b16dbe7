"""One HTML report per evaluation: metrics table, ROC and PRO curves, worst-case heatmaps."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.images import read_image, read_mask  # noqa: E402

from .evaluate import Evaluation  # noqa: E402
from .metrics import pro_curve, roc_points  # noqa: E402
from .overlay import heatmap_overlay  # noqa: E402


def _write_curve(path: Path, x: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> None:
    rows = [f"{names[0]},{names[1]}"] + [f"{a:.6f},{b:.6f}" for a, b in zip(x, y, strict=True)]
    path.write_text("\n".join(rows) + "\n")


def _plot(path: Path, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str, xmax: float = 1.0) -> None:
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(x, y)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, xmax), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thin(x: np.ndarray, y: np.ndarray, limit: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= limit:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
    return x[keep], y[keep]


def _outlined(sample_path: str, mask_path: str) -> np.ndarray:
    """The image in RGB with the mask's boundary drawn in red."""
    from scipy import ndimage

    image = read_image(sample_path)
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()
    mask = read_mask(mask_path, image.shape[:2])
    rgb[mask & ~ndimage.binary_erosion(mask, iterations=1)] = (255, 0, 0)
    return rgb


def _synthetic_section(result: Evaluation, out: Path, synthetic: dict[str, Any], per_family: int = 2) -> str:
    settings = html.escape(json.dumps(synthetic.get("settings"), sort_keys=True))
    tiles = []
    for family in synthetic.get("settings", {}).get("families", []):
        shown = [(i, s) for i, s in enumerate(result.samples) if s.label == 1 and s.kind == family and s.mask]
        for i, sample in shown[:per_family]:
            name = f"synthetic_{family}_{i}.png"
            Image.fromarray(_outlined(sample.path, sample.mask or "")).save(out / name)
            tiles.append(f'<figure><img src="{name}" width="256"><figcaption>{html.escape(family)}: '
                         f"score {result.scores[i]:.3f}</figcaption></figure>")
    return ("<h2>Synthetic defects</h2><p>The defective images of this evaluation are synthetic, made from "
            f"{synthetic.get('n_good')} good images ({html.escape(str(synthetic.get('good_from')))}), seed "
            f"{synthetic.get('seed')}, settings <code>{settings}</code>. Examples, mask outlined in red:</p>"
            + "".join(tiles))


def write_report(result: Evaluation, out_dir: str | Path, *, title: str, threshold: float | None,
                 worst: int = 4, curves_dir: str | Path | None = None,
                 synthetic: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` with its PNGs into ``out_dir`` and ``roc.csv``/``pro.csv`` into
    ``curves_dir`` (default ``out_dir``). ``synthetic`` (the evaluation set's record, for
    synthetic defects) adds a section with the generator settings and examples."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = Path(curves_dir) if curves_dir else out
    curves.mkdir(parents=True, exist_ok=True)
    labels, scores = result.labels, result.scores
    figures: list[str] = []
    # Header-only curves where a curve is undefined (one class only, no masks), so the
    # files DVC tracks as plots always exist.
    (curves / "roc.csv").write_text("fpr,tpr\n")
    (curves / "pro.csv").write_text("fpr,pro\n")
    if (labels == 0).any() and (labels == 1).any():
        fpr, tpr = roc_points(labels, scores)
        _write_curve(curves / "roc.csv", fpr, tpr, ("fpr", "tpr"))
        _plot(out / "roc.png", fpr, tpr, "false positive rate", "true positive rate", "image ROC")
        figures.append("roc.png")
    if result.masks and result.maps is not None and any(m.any() for m in result.masks):
        curve = pro_curve(result.masks, result.maps)
        fx, fy = _thin(curve.fpr, curve.pro)
        _write_curve(curves / "pro.csv", fx, fy, ("fpr", "pro"))
        _plot(out / "pro.png", fx, fy, "false positive rate", "per-region overlap", "PRO (to FPR 0.3)", 0.3)
        figures.append("pro.png")
    cases: list[tuple[str, int]] = []
    if threshold is not None:
        missed = [i for i in np.argsort(scores) if labels[i] == 1 and scores[i] < threshold][:worst]
        false_alarms = [i for i in np.argsort(-scores) if labels[i] == 0 and scores[i] >= threshold][:worst]
        cases = [("false negative", int(i)) for i in missed] + [("false positive", int(i)) for i in false_alarms]
    tiles = []
    for kind, i in cases:
        sample = result.samples[i]
        if result.maps is None:
            break
        overlay = heatmap_overlay(read_image(sample.path), result.maps[i], threshold)
        name = f"{kind.replace(' ', '_')}_{i}.png"
        Image.fromarray(overlay).save(out / name)
        tiles.append(f'<figure><img src="{name}" width="256"><figcaption>{kind}: {html.escape(Path(sample.path).name)}'
                     f" score {scores[i]:.3f}</figcaption></figure>")
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:.4f}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in result.metrics.items())
    body = (
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>"
        + "".join(f'<img src="{f}">' for f in figures)
        + "<h2>Worst misses and false alarms at the threshold</h2>"
        + ("".join(tiles) or "<p>none</p>")
        + (_synthetic_section(result, out, synthetic) if synthetic else "")
    )
    page = out / "report.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>figure{{display:inline-block}}</style></head><body>{body}</body></html>\n")
    return page
