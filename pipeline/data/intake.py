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
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.hashing import sha256_file

from .datasets import IMAGE_SUFFIXES, DatasetError, Sample
from .importer import recover_interrupted, safe_join, unique_name
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
        refused: ``{"source", "reason"}``: not a regular file (a symbolic link, a device, a
            FIFO): never opened, copied or quarantined.
    """

    added: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, str]] = dataclasses.field(default_factory=list)
    quarantined: list[dict[str, str]] = dataclasses.field(default_factory=list)
    refused: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "n_added": len(self.added), "n_duplicates": len(self.duplicates), "n_quarantined": len(self.quarantined),
            "n_refused": len(self.refused)}


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, with each folder replaced by the entries directly inside it that are not
    folders, sorted. Symbolic links are listed as themselves, never followed (not even a
    link to a folder), so that :func:`add_nominal` can refuse them.

    Raises:
        FileNotFoundError: naming an input that does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not path.is_symlink():
            files += sorted(p for p in path.iterdir() if (p.is_symlink() or not p.is_dir())
                            and not p.name.startswith("."))
        elif path.is_symlink() or path.exists():
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
    recover_interrupted(root)  # an import --replace killed mid-swap: data/ back whole first
    target_dir = root / "train" / "good"
    if not target_dir.is_dir():
        raise DatasetError(f"{target_dir} does not exist: import a dataset first (`tracebank import SPEC`)")
    config = config or ValidationConfig()
    report = AddReport()
    known = {sha256_file(p): str(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    candidates: list[tuple[Path, str]] = []
    rejected: dict[str, str] = {}
    for path in expand_inputs(inputs):
        if not _regular(path):
            report.refused.append({"source": str(path), "reason": "not a regular file (a symbolic link is never "
                                   "followed): copy the image itself into the folder"})
            continue
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
        try:
            _copy_regular(path, partial)
        except OSError as exc:  # replaced by a link or removed since it was listed
            partial.unlink(missing_ok=True)
            report.refused.append({"source": str(path), "reason": f"could not be read as a regular file: {exc}"})
            continue
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
        _copy_regular(Path(source), dest)
        report.quarantined.append({"source": source, "path": str(dest), "reason": reason})
    (folder / "reasons.json").write_text(json.dumps(report.quarantined, indent=2) + "\n")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _copy_regular(source: Path, dest: Path) -> None:
    """Copy the regular file ``source`` (never through a symbolic link) to a new file ``dest``
    whose mode is the source's, read and write bits only, less the umask: a copy is never
    readable by more people than the original."""
    reader_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    with open(reader_fd, "rb") as reader:
        info = os.fstat(reader.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{source} is not a regular file")
        mode = stat.S_IMODE(info.st_mode) & 0o666
        writer_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with open(writer_fd, "wb") as writer:
            shutil.copyfileobj(reader, writer)
