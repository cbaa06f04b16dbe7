"""Bring a dataset into the DVC-tracked data root in one layout (MVTec AD style).

    data/train/good/*.png            nominal training images
    data/test/good/*.png             nominal evaluation images
    data/test/<defect>/*.png         defective evaluation images
    data/ground_truth/<defect>/*_mask.png

Files are copied under names derived from their source paths; a name that would land
outside the data root is refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .datasets import Dataset, DatasetError, Sample, open_dataset

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts`` resolved, refusing anything that escapes ``root``."""
    target = (root.joinpath(*parts)).resolve()
    base = root.resolve()
    if target != base and base not in target.parents:
        raise DatasetError(f"refusing to write {target}: it is outside the data root {base}")
    return target


def _name(sample: Sample, index: int) -> str:
    stem = _SAFE.sub("_", Path(sample.path).stem).strip("._") or "image"
    return f"{index:05d}_{stem}{Path(sample.path).suffix.lower() or '.png'}"


def import_dataset(spec: str, root: str | Path = "data", *, n_train: int | None = None,
                   n_test: int | None = None, seed: int = 0, replace: bool = True) -> Dataset:
    """Copy the dataset named by ``spec`` into ``root``; returns the dataset as imported
    (readable again with ``mvtec:ROOT``)."""
    source = open_dataset(spec)
    if n_train or n_test:
        source = source.subset(n_train, n_test, seed=seed)
    root = Path(root)
    if replace and root.exists():
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(source.train):
        dest = safe_join(root, "train", "good", _name(sample, i))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, dest)
    for i, sample in enumerate(source.test):
        kind = "good" if sample.label == 0 else (_SAFE.sub("_", sample.kind).strip("._") or "defect")
        if sample.label == 1 and kind == "good":
            kind = "defect"
        dest = safe_join(root, "test", kind, _name(sample, i))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, dest)
        if sample.mask:
            mask = safe_join(root, "ground_truth", kind, f"{dest.stem}_mask.png")
            mask.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.mask, mask)
    (root / "SOURCE.txt").write_text(f"imported from {spec}\n")
    return open_dataset(f"mvtec:{root}")


def add_nominal(paths: list[str | Path], root: str | Path = "data") -> list[Path]:
    """Copy new nominal images into ``root/train/good`` (for scheduled retraining)."""
    root = Path(root)
    existing = len(list((root / "train" / "good").glob("*")))
    out = []
    for i, path in enumerate(paths):
        dest = safe_join(root, "train", "good", _name(Sample(str(path), 0), existing + i))
        shutil.copyfile(path, dest)
        out.append(dest)
    return out
