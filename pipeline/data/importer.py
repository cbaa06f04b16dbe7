"""Bring a dataset into the DVC-tracked data root in one layout (MVTec AD style).

    data/train/good/*.png            nominal training images
    data/test/good/*.png             nominal evaluation images
    data/test/<defect>/*.png         defective evaluation images
    data/ground_truth/<defect>/*_mask.png

Files are copied under names derived from their source paths; a name that would land
outside the data root is refused.

Note:
    Replacing ``data/`` is one system call: the complete new tree, built beside it, is
    exchanged with the old one by ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; ext4, xfs,
    btrfs, tmpfs, overlayfs), so at every instant ``data/`` is the whole old tree or the whole
    new one, even under ``kill -9`` or a power cut. A ``data`` symlink swapped over versioned
    folders would do the same, but DVC tracks ``data/`` as a folder and every input path of
    tracebank refuses symlinks. Where the exchange is not available (another system, or a
    file system without it) the old tree is renamed aside and the new one into place, and a
    kill between the two leaves no ``data/`` for a moment: :func:`recover_interrupted`, run
    by every import before it reads ``data/``, puts the old tree back, and removes whatever a
    dead import left beside the data root.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import re
import shutil
import sys
from pathlib import Path

from .datasets import Dataset, DatasetError, Sample, open_dataset
from .images import ImageError, read_image

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
#: what renameat2 answers where the system or the file system has no RENAME_EXCHANGE
_NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


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
    the result opens as a dataset, so a source that fails half-way leaves ``root`` as it was;
    the swap is one atomic exchange (see the module's note), so an import killed at any
    moment leaves ``root`` whole, old or new. What an interrupted import left beside ``root``
    is cleaned up first (:func:`recover_interrupted`). Source images that do not decode are
    left out and reported.

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
    recover_interrupted(root)
    if holds_data(root) and not replace:
        raise DatasetError(
            f"{root} already holds a dataset; `tracebank add PATH` appends good images to it, "
            f"`tracebank import {spec} --replace` replaces it (built beside it, swapped in when complete)"
        )
    source = open_dataset(spec)
    if n_train or n_test:
        source = source.subset(n_train, n_test, seed=seed)
    staging = _beside(root, "import", os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    try:
        skipped = _copy_tree(source, staging)
        if not (staging / "train" / "good").is_dir():
            raise DatasetError(f"{spec}: no readable training image to import")
        (staging / "SOURCE.txt").write_text(f"imported from {spec}\n")
        open_dataset(f"mvtec:{staging}")  # the new tree must open before it replaces anything
        _swap_in(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old tree after a swap, else the unused new one
    return ImportResult(open_dataset(f"mvtec:{root}"), skipped)


def recover_interrupted(root: str | Path = "data") -> list[str]:
    """Complete ``root`` after an import that was killed while replacing it, before anything
    reads it.

    An import leaves two kinds of folder beside ``root`` while it runs: ``.ROOT.import-PID``
    (the new tree being built, or after the exchange the old one) and, without the atomic
    exchange, ``.ROOT.replaced-PID`` (the old tree moved aside). For imports whose process
    is gone: if ``root`` is missing, the old tree is renamed back (the import did not finish,
    so the data stays as it was); then every such folder is removed. Folders of a running
    import are left alone.

    Returns:
        What was done, one line each (empty when nothing was left over).
    """
    root = Path(root)
    leftovers = sorted((p for p in root.parent.glob(f".{root.name}.*-*") if _dead_leftover(root, p)),
                       key=lambda p: p.lstat().st_mtime)
    done: list[str] = []
    retired = [p for p in leftovers if p.name.startswith(f".{root.name}.replaced-")]
    if retired and not os.path.lexists(root):
        os.rename(retired[-1], root)
        _sync_folder(root.parent)
        leftovers.remove(retired[-1])
        done.append(f"restored {root} from {retired[-1].name}, left by an interrupted import")
    for path in leftovers:
        shutil.rmtree(path)
        done.append(f"removed {path.name}, left by an interrupted import")
    return done


def _beside(root: Path, kind: str, pid: int) -> Path:
    return root.with_name(f".{root.name}.{kind}-{pid}")


def _dead_leftover(root: Path, path: Path) -> bool:
    """Whether ``path`` is a folder an import of ``root`` left and whose process has ended."""
    match = re.fullmatch(rf"\.{re.escape(root.name)}\.(import|replaced)-(\d+)", path.name)
    if match is None or path.is_symlink() or not path.is_dir():
        return False
    pid = int(match.group(2))
    if pid == os.getpid():
        return True  # a dead process's id, now ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _swap_in(staging: Path, root: Path) -> None:
    """Make the complete tree ``staging`` the data root ``root``; the old tree (if any) is
    left at ``staging``'s name for the caller to remove."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, root)
    elif not _exchange(staging, root):
        retired = _beside(root, "replaced", os.getpid())
        os.replace(root, retired)  # no root until the next line: recover_interrupted covers a kill here
        try:
            os.replace(staging, root)
        except BaseException:
            os.replace(retired, root)
            raise
        os.replace(retired, staging)
    _sync_folder(root.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (``renameat2(RENAME_EXCHANGE)``); False,
    changing nothing, where the system or the file system cannot.

    Raises:
        OSError: the exchange is supported but failed (permissions, a missing folder).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, some musl builds)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (the renames in it) to disk, where the system allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
