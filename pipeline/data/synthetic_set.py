"""Evaluation sets with synthetic defects: ``synthetic:SPEC``, for lines without defect pictures.

``synthetic:folder:good`` (or ``synthetic:mvtec:data``, ``synthetic:mtd:PATH``, ...) reads the
dataset named by SPEC and replaces its test split by good images plus one synthetic defective
copy of each (see :mod:`pipeline.data.synthetic`), with exact masks. The good images are the
source's good test images when it has some; otherwise about a ``holdout`` share of its good
training images, chosen by a seeded hash of each file name (so new images never move earlier
ones into the test split), which then leave the training set. Real defective test images are
never used.

The defective copies are written as PNG files with their masks, in the MVTec layout, under
``synthetic/<key>`` in :func:`pipeline.config.cache_root`; ``key`` hashes the generator settings
and the bytes of the good images, so every process (DVC stage, flow task, CLI) that opens the same
spec with the same settings reads the same files, built once and swapped in only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import cache_root
from pipeline.hashing import sha256_file

from .datasets import Dataset, DatasetError, LoadReport, Sample, load_images
from .synthetic import SyntheticConfig, synthesize

#: Bumped whenever the generator's output for the same settings and images changes.
GENERATOR_VERSION = 1
PREFIX = "synthetic:"


def is_synthetic(spec: str) -> bool:
    return spec.startswith(PREFIX)


def synthetic_dataset(source: Dataset, config: SyntheticConfig, cache: str | Path | None = None) -> Dataset:
    """The dataset ``synthetic:<source.spec>``: ``source``'s training images (less the held-out
    ones) and a test split of good images plus their synthetic defective copies.

    Args:
        source: the dataset to take good images from.
        config: generator settings, seed and hold-out fraction.
        cache: where the generated files go (default ``cache_root()/synthetic``).

    Returns:
        A dataset whose ``synthetic`` field records the settings, the seed, the number of
        defects per family, where the good images came from and the folder of the files.

    Raises:
        DatasetError: fewer than 2 readable good images to build on, or no training image left.
    """
    train, bases, origin = _split(source, config)
    report = LoadReport()
    loaded = list(load_images(bases, report=report))
    if len(loaded) < 2:
        raise DatasetError(f"{PREFIX}{source.spec}: needs at least 2 readable good images to make synthetic "
                           f"defects from, found {len(loaded)}; add good images or raise synthetic.holdout")
    key = _key(config, [sample.path for sample, _, _ in loaded])
    root = Path(cache) if cache is not None else cache_root() / "synthetic"
    folder = root / key
    if not (folder / "index.json").is_file():
        _build(folder, [(sample, image) for sample, image, _ in loaded], config)
    index = json.loads((folder / "index.json").read_text())
    defects = [Sample(str(folder / item["image"]), 1, str(folder / item["mask"]), item["family"])
               for item in index["defects"]]
    good = [sample for sample, _, _ in loaded]
    families = {family: sum(1 for d in defects if d.kind == family) for family in config.families}
    record = {"settings": config.as_dict(),
              "seed": config.seed, "generator_version": GENERATOR_VERSION, "good_from": origin,
              "n_good": len(good), "n_defects": len(defects), "defects_per_family": families,
              "skipped": [{"path": p, "reason": r} for p, r in report.skipped], "folder": str(folder)}
    return Dataset(f"{PREFIX}{source.spec}", train, good + defects, synthetic=record)


def holdout_draw(path: str, seed: int) -> float:
    """A number in [0, 1) fixed by the file's name and the synthetic seed alone.

    Note:
        The salt (``synthetic-holdout:<seed>:``) keeps these draws independent of
        :func:`pipeline.data.datasets.calibration_draw`, which hashes the bare name, so the
        synthetic test split and the calibration split do not pick the same images.
    """
    salted = f"synthetic-holdout:{seed}:{Path(path).name}"
    return int(hashlib.sha256(salted.encode()).hexdigest()[:12], 16) / 16**12


def _split(source: Dataset, config: SyntheticConfig) -> tuple[list[Sample], list[Sample], str]:
    """Training images, the good images to build defects on, and where those came from.

    When the source has no good test images, a good training image is held out when its
    :func:`holdout_draw` is below ``config.holdout`` (so ``holdout`` is the expected share);
    when that picks fewer than 2, the 2 lowest draws are held out. Either way an image's fate
    depends on its own name, and on other images only through having a lower draw, so adding
    images never moves an earlier training image into the test split. Only when every image
    draws below the share does the highest draw stay in training, so that one is left.
    """
    good_test = [s for s in source.test if s.label == 0]
    if good_test:
        return list(source.train), good_test, "test split"
    train = list(source.train)
    if len(train) < 3:
        raise DatasetError(f"{PREFIX}{source.spec}: {len(train)} good image(s) cannot be split into training "
                           "and a hold-out of 2 for synthetic defects; add good images")
    draws = {s.path: holdout_draw(s.path, config.seed) for s in train}
    ranked = sorted(draws, key=lambda p: (draws[p], p))
    held = {p for p, d in draws.items() if d < config.holdout}
    if len(held) < 2:
        held = set(ranked[:2])
    if len(held) == len(ranked):
        held.discard(ranked[-1])
    return ([s for s in train if s.path not in held], [s for s in train if s.path in held],
            f"{len(held)} of {len(train)} good training images held out by a hash of their names "
            f"(synthetic.holdout {config.holdout}, seed {config.seed})")


def _key(config: SyntheticConfig, paths: list[str]) -> str:
    content = {"version": GENERATOR_VERSION, "settings": config.as_dict(),
               "images": [sha256_file(p) for p in paths]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def _build(folder: Path, good: list[tuple[Sample, np.ndarray]], config: SyntheticConfig) -> None:
    """Write the defective copies and masks into a temporary folder beside ``folder`` and
    rename it into place when complete (a concurrent builder of the same key loses the race
    harmlessly: both wrote the same bytes)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        items = []
        made = synthesize([image for _, image in good], config)
        for i, ((sample, _), (defective, mask, family)) in enumerate(zip(good, made, strict=True)):
            name = f"{i:04d}_{Path(sample.path).stem}"
            image_rel, mask_rel = f"test/{family}/{name}.png", f"ground_truth/{family}/{name}_mask.png"
            for rel, array in ((image_rel, defective), (mask_rel, mask.astype(np.uint8) * 255)):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(staging / rel)
            items.append({"image": image_rel, "mask": mask_rel, "family": family, "from": sample.path})
        (staging / "index.json").write_text(json.dumps({"defects": items}, indent=1) + "\n")
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe(dataset: Dataset) -> dict[str, Any] | None:
    """What a lineage records about a synthetic evaluation set (None for a real one)."""
    if dataset.synthetic is None:
        return None
    return {k: v for k, v in dataset.synthetic.items() if k != "folder"} | {"synthetic": True}
