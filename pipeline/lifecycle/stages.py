"""The steps of a training run as plain functions: extract, select, evaluate, package.

The CLI, the DVC stages and the Prefect flow call these same functions, so a bank made by
any of them is made the same way. Feature extraction streams to a memory-mapped file on
disk, so the number of training images is bounded by disk, not by memory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.datasets import LoadReport, Sample, batched, load_images
from pipeline.hashing import sha256_file

if TYPE_CHECKING:  # torch loads with the extractor a caller builds, not with this module
    from pipeline.patchcore.features import FeatureExtractor

FEATURES_FILE = "features.npy"
FEATURES_META = "features.json"


@dataclasses.dataclass(frozen=True)
class FeatureStore:
    """Patch features of a training set on disk.

    Attributes:
        directory: holds ``features.npy`` and ``features.json``.
        rows: number of valid rows (patches) in ``features.npy``.
        files: the images used, ``[{"path", "sha256"}]``, in row order.
        skipped: ``[{"path", "reason"}]`` of unreadable images.
    """

    directory: Path
    rows: int
    files: list[dict[str, str]]
    skipped: list[dict[str, str]]

    def array(self) -> np.ndarray:
        """The features as a read-only memory map ``(rows, D)``."""
        return np.load(self.directory / FEATURES_FILE, mmap_mode="r")[: self.rows]

    @classmethod
    def open(cls, directory: str | Path) -> FeatureStore:
        directory = Path(directory)
        meta_path = directory / FEATURES_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found; run feature extraction first")
        meta = json.loads(meta_path.read_text())
        return cls(directory, int(meta["rows"]), meta["files"], meta["skipped"])


def extract_features(
    samples: Sequence[Sample],
    extractor: FeatureExtractor,
    directory: str | Path,
    *,
    batch_size: int = 8,
    dtype: str = "float32",
    on_batch: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Extract patch features of nominal ``samples`` into ``directory``, streaming to disk.

    Unreadable images are skipped and listed in the result, never a crash mid-run.

    Args:
        samples: training images (labels are not looked at).
        extractor: the feature extractor of the model being fitted.
        directory: created if missing; ``features.npy`` ``(rows, D)`` and ``features.json``.
        batch_size: images per backbone pass.
        dtype: ``"float32"`` or ``"float16"`` storage.
        on_batch: called with the number of images of each finished batch.
    """
    if not samples:
        raise ValueError("no training images: a memory bank needs at least one nominal image")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    per_image = extractor.grid * extractor.grid
    out = np.lib.format.open_memmap(
        directory / FEATURES_FILE, mode="w+", dtype=np.dtype(dtype), shape=(len(samples) * per_image, extractor.dim)
    )
    report = LoadReport()
    files: list[dict[str, str]] = []
    row = 0
    for batch in batched(load_images(samples, report=report), batch_size):
        feats, _ = extractor([image for _, image, _ in batch])  # (B, h, w, D)
        flat = feats.reshape(-1, feats.shape[-1]).numpy()
        out[row : row + len(flat)] = flat
        row += len(flat)
        files += [{"path": s.path, "sha256": sha256_file(s.path)} for s, _, _ in batch]
        if on_batch is not None:
            on_batch(len(batch))
    skipped = [{"path": path, "reason": reason} for path, reason in report.skipped]
    if on_batch is not None and skipped:
        on_batch(len(skipped))
    out.flush()
    del out
    if row == 0:
        raise ValueError(f"none of the {len(samples)} training images could be read: {skipped[:3]}")
    meta = {"rows": row, "dim": extractor.dim, "dtype": dtype, "files": files, "skipped": skipped}
    (directory / FEATURES_META).write_text(json.dumps(meta, indent=1) + "\n")
    return FeatureStore(directory, row, files, skipped)


def training_record(spec: str, store: FeatureStore, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``training`` section of a bank manifest: where the nominal images came from."""
    record = {"spec": spec, "n_images": len(store.files), "n_patches": store.rows, "fit": "full",
              "files": store.files, "skipped": store.skipped}
    record.update(extra or {})
    return record
