"""Bring a dataset into the DVC-tracked data root in one layout (MVTec AD style).

    data/train/good/*.png            nominal training images
    data/test/good/*.png             nominal evaluation images
    data/test/<defect>/*.png         defective evaluation images
    data/ground_truth/<defect>/*_mask.png

Files are copied under names derived from their source paths; a name that would land
outside the data root is refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

from .datasets import Dataset, DatasetError, Sample, open_dataset
from .images import ImageError, read_image

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


def unique_name(folder: Path, source: Path) -> str:
    """A safe file name for ``source`` that is not yet taken in ``folder``."""
    stem = _SAFE.sub("_", source.stem).strip("._") or "image"
    suffix = source.suffix.lower() or ".png"
    name, n = f"{stem}{suffix}", 1
    while (folder / name).exists():
        n += 1
        name = f"{stem}_{n}{suffix}"
    return name


def holds_data(root: Path) -> bool:
    """Whether ``root`` has any file in it (a dataset a command must not silently replace)."""
    return root.is_dir() and any(p.is_file() for p in root.rglob("*"))


def import_dataset(spec: str, root: str | Path = "data", *, n_train: int | None = None,
                   n_test: int | None = None, seed: int = 0, replace: bool = False) -> ImportResult:
    """Copy the dataset named by ``spec`` into ``root`` in the MVTec layout.

    The new tree is built beside ``root`` and swapped in only once every file is copied and
    the result opens as a dataset, so a source that fails half-way leaves ``root`` as it was.
    Source images that do not decode are left out and reported.

    Args:
        spec: the source (``elpv:mono``, ``mtd:PATH``, ``folder:PATH``, ...).
        root: the data root.
        n_train, n_test: import a seeded subset of this many training / test images.
        replace: allow replacing a ``root`` that already holds files; without it such a
            root is refused (``tracebank add`` appends nominal images instead).

    Raises:
        DatasetError: if ``root`` holds data and ``replace`` is false, or the source is
            unusable (then nothing was changed).
    """
    root = Path(root)
    if holds_data(root) and not replace:
        raise DatasetError(
            f"{root} already holds a dataset; `tracebank add PATH` appends good images to it, "
            f"`tracebank import {spec} --replace` replaces it (built beside it, swapped in when complete)"
        )
    source = open_dataset(spec)
    if n_train or n_test:
        source = source.subset(n_train, n_test, seed=seed)
    staging = root.with_name(f".{root.name}.import-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        skipped = _copy_tree(source, staging)
        if not (staging / "train" / "good").is_dir():
            raise DatasetError(f"{spec}: no readable training image to import")
        (staging / "SOURCE.txt").write_text(f"imported from {spec}\n")
        open_dataset(f"mvtec:{staging}")  # the new tree must open before it replaces anything
        if root.exists():
            retired = root.with_name(f".{root.name}.replaced-{os.getpid()}")
            os.replace(root, retired)
            os.replace(staging, root)
            shutil.rmtree(retired)
        else:
            root.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(open_dataset(f"mvtec:{root}"), skipped)


def dataset_name(spec: str) -> str:
    """``spec`` as the user named the data: ``mvtec:data`` filled by ``tracebank import
    elpv:mono`` is ``elpv:mono (imported into data)``; any other spec is itself."""
    kind, _, path = spec.partition(":")
    note = Path(path) / "SOURCE.txt"
    if kind != "mvtec" or not note.is_file() or note.is_symlink():
        return spec
    first = note.read_text(errors="replace")[:500].splitlines()[:1]
    if not first or not first[0].startswith("imported from "):
        return spec
    return f"{first[0].removeprefix('imported from ').strip()} (imported into {Path(path).name})"


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """The dataset as imported (readable again with ``mvtec:ROOT``) and the source files
    left out because they did not decode, as ``(path, reason)``."""

    dataset: Dataset
    skipped: list[tuple[str, str]]


def _copy_tree(source: Dataset, root: Path) -> list[tuple[str, str]]:
    skipped: list[tuple[str, str]] = []

    def copy(sample: Sample, *parts: str) -> Path | None:
        try:
            read_image(sample.path)
        except ImageError as exc:
            skipped.append((sample.path, str(exc)))
            return None
        dest = safe_join(root, *parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, dest)
        return dest

    for i, sample in enumerate(source.train):
        copy(sample, "train", "good", _name(sample, i))
    for i, sample in enumerate(source.test):
        kind = "good" if sample.label == 0 else (_SAFE.sub("_", sample.kind).strip("._") or "defect")
        if sample.label == 1 and kind == "good":
            kind = "defect"
        dest = copy(sample, "test", kind, _name(sample, i))
        if dest is not None and sample.mask:
            mask = safe_join(root, "ground_truth", kind, f"{dest.stem}_mask.png")
            mask.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.mask, mask)
    return skipped
