"""Where a bank came from: the commit of the code, the data pointer committed beside it, and
a hash of its training files where DVC does not track them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """Commit of the code that made a bank and whether the tree had uncommitted changes."""
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = run("rev-parse", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"git_commit": commit or None, "git_dirty": dirty}


def commit_data_pointer(paths: list[str | Path], message: str, root: str | Path = ".") -> str | None:
    """Commit exactly ``paths`` (DVC's pointer files) to git, leaving everything else staged
    or not as it was; returns the new commit, or None when nothing changed.

    Raises:
        RuntimeError: not a git checkout, or git refused (the message is git's).
    """
    present = [str(p) for p in paths if (Path(root) / p).is_file()]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    if not present:
        return None
    if git("rev-parse", "--git-dir").returncode != 0:
        raise RuntimeError(f"retrain.git_commit is true but {Path(root).resolve().name} is not a git checkout")
    if not git("status", "--porcelain", "--", *present).stdout.strip():
        return None
    done = git("commit", "--only", "-m", message, "--", *present)
    if done.returncode != 0 and "did not match" in done.stderr:  # never added: add, then commit only them
        git("add", "--", *present)
        done = git("commit", "--only", "-m", message, "--", *present)
    if done.returncode != 0:
        raise RuntimeError(f"git commit of {', '.join(present)} failed: {(done.stderr or done.stdout).strip()}")
    return git("rev-parse", "HEAD").stdout.strip() or None


def files_data_hash(files: list[dict[str, str]]) -> str | None:
    """A hash of a bank's training files (names relative to their common folder, and contents
    by sha256), for banks whose data DVC does not track."""
    if not files:
        return None
    paths = [Path(f["path"]) for f in files]
    common = Path(os.path.commonpath([str(p.parent) for p in paths])) if len(paths) > 1 else paths[0].parent
    rows = sorted([p.relative_to(common).as_posix() if p.is_relative_to(common) else p.name, f["sha256"]]
                  for p, f in zip(paths, files, strict=True))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
