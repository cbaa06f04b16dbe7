"""Dataset readers: MVTec AD layout (also BTAD, MPDD), MTD with its split, ELPV, a folder.

A dataset is named by a SPEC string: ``mvtec:PATH/CATEGORY``, ``mtd:PATH``, ``elpv:mono``,
``elpv:poly`` or ``folder:PATH``, or ``synthetic:SPEC`` for SPEC's good images with synthetic
defects as the test split (:mod:`pipeline.data.synthetic_set`). Readers list files; decoding happens in
:func:`load_images`, which reports unreadable files by path and skips or refuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .images import ImageError, read_image, read_mask

if TYPE_CHECKING:
    from .synthetic import SyntheticConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset spec or layout is wrong; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        path: the image file.
        label: 0 nominal, 1 defective.
        mask: ground-truth mask file (defective images with pixel labels), else None.
        kind: defect type or ``"good"``.
    """

    path: str
    label: int
    mask: str | None = None
    kind: str = "good"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Training (nominal only) and test samples of one dataset.

    ``synthetic`` describes the generator of a ``synthetic:`` test split (None for real ones);
    ``calibration`` holds the images a decision threshold is chosen on, disjoint from both
    splits (empty unless :func:`hold_out_calibration` made it).
    """

    spec: str
    train: list[Sample]
    test: list[Sample]
    synthetic: dict[str, Any] | None = None
    calibration: list[Sample] = dataclasses.field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(s.mask for s in self.test if s.label == 1)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A smaller dataset: the first ``n_train`` training images and a stratified,
        seeded draw of ``n_test`` test images (half good, half defective)."""
        train = self.train[:n_train] if n_train else self.train
        test = self.test
        if n_test:
            rng = random.Random(seed)
            good = [s for s in self.test if s.label == 0]
            bad = [s for s in self.test if s.label == 1]
            half = n_test // 2
            test = rng.sample(good, min(half, len(good))) + rng.sample(bad, min(n_test - half, len(bad)))
        return Dataset(self.spec, list(train), list(test), self.synthetic, list(self.calibration))


def calibration_draw(path: str) -> float:
    """A number in [0, 1) fixed by the file's name alone: an image is held out for calibration
    when it is below the share, so the held-out set stays the same as new images arrive."""
    return int(hashlib.sha256(Path(path).name.encode()).hexdigest()[:12], 16) / 16**12


def hold_out_calibration(dataset: Dataset, share: float, *, defects: bool = False) -> Dataset:
    """Move a ``share`` of the good training images (and, with ``defects``, of the defective
    test images) into ``dataset.calibration``.

    Which images go is decided by :func:`calibration_draw` on each name, so adding images
    never moves an earlier image between training and calibration. At least one good image
    is held out (the lowest draw) while at least one stays for training; with ``share`` 0
    nothing moves.
    """
    if share <= 0 or len(dataset.train) < 2:
        return dataset
    draws = {s.path: calibration_draw(s.path) for s in dataset.train}
    held = {p for p, d in draws.items() if d < share} or {min(draws, key=draws.__getitem__)}
    if len(held) == len(dataset.train):
        held.discard(max(held, key=draws.__getitem__))
    calibration = [s for s in dataset.train if s.path in held]
    test = list(dataset.test)
    if defects:
        bad = [s for s in test if s.label == 1 and calibration_draw(s.path) < share]
        calibration += bad
        test = [s for s in test if s not in bad]
    return dataclasses.replace(dataset, train=[s for s in dataset.train if s.path not in held], test=test,
                               calibration=calibration)


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("mvtec", "mtd", "elpv", "folder", "synthetic") or not arg:
        raise DatasetError(
            f"dataset spec {spec!r} not understood; use mvtec:PATH/CATEGORY, mtd:PATH, "
            "elpv:mono, elpv:poly, folder:PATH or synthetic:SPEC"
        )
    return kind, arg


def open_dataset(spec: str, synthetic: SyntheticConfig | None = None) -> Dataset:
    """Read the file lists of the dataset named by ``spec``.

    No image is decoded, except for ``synthetic:SPEC``, whose defective copies are made (or
    found in the cache) with the settings ``synthetic`` (default :class:`SyntheticConfig`).
    """
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        from .synthetic import SyntheticConfig
        from .synthetic_set import synthetic_dataset

        return synthetic_dataset(open_dataset(arg), synthetic or SyntheticConfig())
    if kind == "mvtec":
        return _mvtec(spec, Path(arg))
    if kind == "mtd":
        return _mtd(spec, Path(arg))
    if kind == "elpv":
        return _elpv(spec, arg)
    return Dataset(spec, [Sample(str(p), 0) for p in _images_in(Path(arg), spec)], [])


def _images_in(directory: Path, spec: str) -> list[Path]:
    if not directory.is_dir():
        raise DatasetError(f"{spec}: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{spec}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return files


def _mvtec(spec: str, root: Path) -> Dataset:
    train = [Sample(str(p), 0) for p in _images_in(root / "train" / "good", spec)]
    test: list[Sample] = []
    test_dir = root / "test"
    if not test_dir.is_dir():
        return Dataset(spec, train, test)  # good images only (imported from folder:), no test split
    for kind_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for image in _images_in(kind_dir, spec):
            if kind_dir.name == "good":
                test.append(Sample(str(image), 0))
                continue
            mask = root / "ground_truth" / kind_dir.name / f"{image.stem}_mask.png"
            test.append(Sample(str(image), 1, str(mask) if mask.is_file() else None, kind_dir.name))
    return Dataset(spec, train, test)


def _mtd(spec: str, root: Path) -> Dataset:
    split_file = root / "split.json"
    if not split_file.is_file():
        raise DatasetError(f"{spec}: {split_file} not found; MTD needs its fixed split file")
    split = json.loads(split_file.read_text())
    missing = [k for k in ("train", "test_good", "test_defect") if k not in split]
    if missing:
        raise DatasetError(f"{split_file}: missing key(s) {', '.join(missing)}")
    train = [Sample(str(root / p), 0) for p in split["train"]]
    test = [Sample(str(root / p), 0) for p in split["test_good"]]
    for item in split["test_defect"]:
        kind = item["image"].split("/")[0].removeprefix("MT_")
        test.append(Sample(str(root / item["image"]), 1, str(root / item["mask"]), kind))
    return Dataset(spec, train, test)


def elpv_root() -> Path:
    """Folder of the ``elpv-dataset`` package's ``labels.csv``."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DatasetError("elpv:... needs the PyPI package elpv-dataset (pip install elpv-dataset)") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def _elpv(spec: str, cell_type: str, holdout: float = 0.2) -> Dataset:
    """ELPV cells of one type. Defect probability 0 is nominal, 1 defective; 1/3 and 2/3
    are left out (annotators were unsure). 20% of nominal cells, drawn with
    ``random.Random(0)`` from the sorted list, are held out for testing."""
    if cell_type not in ("mono", "poly"):
        raise DatasetError(f"{spec}: ELPV cell type must be 'mono' or 'poly', got {cell_type!r}")
    root = elpv_root()
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    good = sorted(root / p for p, prob, t in rows if t == cell_type and float(prob) == 0.0)
    bad = sorted(root / p for p, prob, t in rows if t == cell_type and float(prob) == 1.0)
    random.Random(0).shuffle(good)
    n_hold = round(len(good) * holdout)
    test = [Sample(str(p), 0) for p in sorted(good[:n_hold])]
    test += [Sample(str(p), 1, None, "defect") for p in bad]
    return Dataset(spec, [Sample(str(p), 0) for p in sorted(good[n_hold:])], test)


@dataclasses.dataclass
class LoadReport:
    """Files that could not be used, with the reason for each."""

    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def load_images(
    samples: Sequence[Sample],
    *,
    on_error: str = "skip",
    report: LoadReport | None = None,
    with_masks: bool = False,
) -> Iterator[tuple[Sample, np.ndarray, np.ndarray | None]]:
    """Decode samples one by one.

    Args:
        samples: what to read.
        on_error: ``"skip"`` records a bad file in ``report`` and goes on; ``"raise"``
            stops with the :class:`~pipeline.data.images.ImageError` naming it.
        report: collects skipped files.
        with_masks: also read masks (an all-false mask for defect-free images).

    Yields:
        ``(sample, image, mask)``; ``mask`` is None unless ``with_masks``.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    for sample in samples:
        try:
            image = read_image(sample.path)
            mask = None
            if with_masks:
                shape = image.shape[:2]
                mask = read_mask(sample.mask, shape) if sample.mask else np.zeros(shape, dtype=bool)
        except ImageError as exc:
            if on_error == "raise":
                raise
            if report is not None:
                report.skipped.append((sample.path, str(exc)))
            continue
        yield sample, image, mask


Loaded = tuple[Sample, np.ndarray, np.ndarray | None]


def batched(items: Iterator[Loaded], size: int) -> Iterator[list[Loaded]]:
    """Group an iterator into lists of ``size`` (the last may be shorter)."""
    batch: list[Loaded] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
