"""``dvc add`` of the data folder, skipped when nothing can have changed since the last one.

A scheduled run starts with ``dvc add data`` to learn the data's hash. When no file arrived,
that is a DVC process (about half a second) whose answer is already in ``data.dvc``. After
each ``dvc add`` it runs, :func:`dvc_add` writes a stamp, ``.dvc/tmp/tracebank-add.json``:
the sha256 of the ``data.dvc`` it produced and the time the add started. The next call skips
DVC only when that ``data.dvc`` is still the one written (not checked out from another
commit, not rewritten by a ``dvc add`` elsewhere), every file and folder under the data
folder last changed (``st_ctime``: any write, copy, rename, delete or ``chmod`` sets it, and
``touch`` cannot set it back) before that add started, none is a symlink, and the files are
exactly those of DVC's cached listing. Anything else runs ``dvc add``, which decides by content.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.hashing import sha256_file

from .restore import RestoreError, parse_listing

STAMP = Path(".dvc") / "tmp" / "tracebank-add.json"


class TrackingError(RuntimeError):
    """``dvc add`` failed; the message is DVC's."""


def recorded_hash(dvc_file: str | Path) -> str | None:
    """The md5 ``dvc_file`` records for its output (``outs[0].md5``), or None."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return str(outs[0]["md5"]) if outs and outs[0].get("md5") else None


def dvc_add(data_dir: str | Path = "data", root: str | Path = ".") -> str | None:
    """``dvc add data_dir`` (run from the DVC repo ``root``) unless :func:`unchanged_since_add`
    says it would change nothing; returns the hash ``<data_dir>.dvc`` records.

    Raises:
        TrackingError: ``dvc add`` failed (DVC's message).
    """
    root = Path(root)
    dvc_file = root / f"{data_dir}.dvc"  # beside the folder, as DVC writes it
    recorded = recorded_hash(dvc_file)
    if recorded is not None and unchanged_since_add(root / data_dir, dvc_file, recorded, root / ".dvc" / "cache",
                                                    root / STAMP):
        return recorded
    started = time.time_ns()
    proc = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(data_dir)], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise TrackingError(f"dvc add {data_dir} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    stamp = root / STAMP
    if stamp.parent.is_dir() and dvc_file.is_file():
        temporary = stamp.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"dvc_file_sha256": sha256_file(dvc_file), "started_ns": started}))
        os.replace(temporary, stamp)
    return recorded_hash(dvc_file)


def unchanged_since_add(data_dir: Path, dvc_file: Path, data_hash: str, cache: Path, stamp: Path) -> bool:
    """Whether ``data_dir`` certainly still holds ``data_hash``, the hash the ``dvc add``
    recorded in ``stamp`` wrote into ``dvc_file``: from file metadata alone (see the module's
    docstring). False whenever that cannot be told, never a wrong True."""
    try:
        seen = json.loads(stamp.read_text())
        if seen.get("dvc_file_sha256") != sha256_file(dvc_file):
            return False
        started = int(seen["started_ns"])
        digest = f"{data_hash.removesuffix('.dir')}.dir"
        listing = cache / "files" / "md5" / digest[:2] / digest[2:]
        expected = {str(relpath) for _, relpath in parse_listing(listing.read_bytes(), listing)}
        found: set[str] = set()
        for folder, _, files in os.walk(data_dir):
            if Path(folder).is_symlink() or os.lstat(folder).st_ctime_ns >= started:
                return False
            for name in files:
                path = Path(folder, name)
                info = os.lstat(path)
                if path.is_symlink() or not path.is_file() or info.st_ctime_ns >= started:
                    return False
                found.add(path.relative_to(data_dir).as_posix())
    except (OSError, ValueError, KeyError, TypeError, RestoreError):
        return False
    return bool(expected) and found == expected


