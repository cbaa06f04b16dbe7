"""Image files named by a user: files and folders (searched recursively), and where each
one's output goes so that no two inputs write the same file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .datasets import IMAGE_SUFFIXES


def image_inputs(items: Sequence[str]) -> dict[str, Path]:
    """Image files to read, in order, each with a name for its outputs.

    A folder stands for the image files in it and in its subfolders (hidden ones skipped),
    sorted, each named by its path inside the folder (``good/001.png`` and ``crack/001.png``
    keep apart); a file is named by its file name. A file named twice counts once.

    Raises:
        FileNotFoundError: a folder holds no image file.
    """
    names: dict[str, Path] = {}
    for item in items:
        root = Path(item)
        if not root.is_dir():
            names.setdefault(item, Path(root.name))
            continue
        found = sorted(
            path for path in root.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        if not found:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise FileNotFoundError(f"{item}: no image files ({suffixes}) in this folder or its subfolders")
        for path in found:
            names.setdefault(str(path), path.relative_to(root))
    return names


def relative_names(paths: Iterable[str]) -> dict[str, Path]:
    """Files each named by its path below the folder they all share (``test/crack/001.png``)."""
    paths = list(paths)
    if not paths:
        return {}
    root = Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
    return {path: Path(path).relative_to(root) for path in paths}


def output_paths(names: dict[str, Path], out_dir: Path, suffix: str) -> dict[str, Path]:
    """``out_dir / NAME-without-extension + suffix`` for each input.

    Raises:
        ValueError: two inputs would write the same file (two ``x.png`` from different
            folders named one by one), naming both.
    """
    targets = {path: out_dir / name.parent / f"{name.stem}{suffix}" for path, name in names.items()}
    seen: dict[Path, str] = {}
    for path, target in targets.items():
        if target in seen:
            raise ValueError(f"{seen[target]} and {path} would both write {target}; "
                             "give their common folder instead, or score them in separate runs")
        seen[target] = path
    return targets
