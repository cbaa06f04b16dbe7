"""Adding new nominal images to the data root: append-only, deduplicated, validated.

New good images (from an operator, a camera's inbox folder) enter ``data/train/good`` only:
the test split and the masks are never touched. A file whose bytes are already anywhere in
the data root is a duplicate and is not copied (a copy of a test image in the training set
would leak it into the bank). Every other file is checked by the same Great Expectations
suite as the training data before it enters; a file that fails goes to a quarantine
folder outside the data root with the reason beside it, never into the training set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .datasets import IMAGE_SUFFIXES, DatasetError, Sample
from .importer import safe_join, unique_name
from .validation import ValidationConfig, describe, run_suite


@dataclasses.dataclass
class AddReport:
    """What :func:`add_nominal` did with each input file.

    Attributes:
        added: ``{"source", "path"}``: copied into ``train/good`` as ``path``.
        duplicates: ``{"source", "same_as"}``: same bytes as a file already in the data root
            (or earlier in the same call), not copied.
        quarantined: ``{"source", "path", "reason"}``: failed validation, copied to ``path``
            in the quarantine folder.
    """

    added: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, str]] = dataclasses.field(default_factory=list)
    quarantined: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "n_added": len(self.added), "n_duplicates": len(self.duplicates), "n_quarantined": len(self.quarantined)}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, with each folder replaced by the files directly inside it, sorted.

    Raises:
        FileNotFoundError: naming an input that does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder to add")
    return files


def add_nominal(
    inputs: Sequence[str | Path],
    root: str | Path = "data",
    *,
    config: ValidationConfig | None = None,
    quarantine: str | Path = "quarantine",
) -> AddReport:
    """Copy new good images into ``root/train/good``, skipping duplicates and quarantining
    files that fail validation.

    Args:
        inputs: image files and folders of them.
        root: the data root (it must already hold ``train/good``, e.g. from ``tracebank import``).
        config: the validation settings (``params.yaml``'s ``validation`` section).
        quarantine: where failing files go, in a folder per call named by its UTC time, with
            ``reasons.json``.

    Raises:
        DatasetError: if ``root/train/good`` does not exist.
    """
    root = Path(root)
    target_dir = root / "train" / "good"
    if not target_dir.is_dir():
        raise DatasetError(f"{target_dir} does not exist: import a dataset first (`tracebank import SPEC`)")
    config = config or ValidationConfig()
    report = AddReport()
    known = {sha256_file(p): str(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    candidates: list[tuple[Path, str]] = []
    rejected: dict[str, str] = {}
    for path in expand_inputs(inputs):
        digest = sha256_file(path)
        if digest in known:
            report.duplicates.append({"source": str(path), "same_as": known[digest]})
            continue
        known[digest] = str(path)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            rejected[str(path)] = f"not an image file type ({', '.join(sorted(IMAGE_SUFFIXES))})"
            continue
        candidates.append((path, digest))
    if candidates:
        table = _metadata([Sample(str(p), 0) for p, _ in candidates])
        with tempfile.TemporaryDirectory(prefix="tracebank-add-") as tmp:
            result = run_suite(table, dataclasses.replace(config, allow_unreadable=False), tmp)
        reasons = dict(zip(table["path"], table["reason"], strict=True))
        for failure in result.failures:
            for file in failure["files"]:
                detail = reasons.get(file) or f"{failure['column']} out of range"
                rejected.setdefault(file, f"{failure['expectation']} on {failure['column']}: {detail}")
    for path, _ in candidates:
        if str(path) in rejected:
            continue
        dest = safe_join(root, "train", "good", unique_name(target_dir, path))
        partial = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(path, partial)
        os.replace(partial, dest)  # a file in train/good is always complete
        report.added.append({"source": str(path), "path": str(dest)})
    if rejected:
        _quarantine(rejected, Path(quarantine), report)
    return report


def _metadata(samples: list[Sample]) -> Any:
    import pandas as pd

    table = pd.DataFrame(describe(samples, "train"))
    table["duplicate"] = False  # duplicates were taken out by hash before
    table["in_both_splits"] = False
    return table


def _quarantine(rejected: dict[str, str], quarantine: Path, report: AddReport) -> None:
    folder = quarantine / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder.mkdir(parents=True, exist_ok=True)
    for source, reason in sorted(rejected.items()):
        dest = folder / unique_name(folder, Path(source))
        shutil.copyfile(source, dest)
        report.quarantined.append({"source": source, "path": str(dest), "reason": reason})
    (folder / "reasons.json").write_text(json.dumps(report.quarantined, indent=2) + "\n")
