"""A bank's exact training data, rebuilt from the local DVC cache by the hash its lineage records.

DVC 3 stores a tracked directory as a listing, ``<md5>.dir``, and one file per distinct content,
both under ``<cache>/files/md5/<first 2 hex digits>/<other 30>``. The listing is a JSON list of
``{"md5": ..., "relpath": ...}``, and its own md5 is the hash ``data.dvc`` records (with a
``.dir`` suffix). This module reads that layout directly, so restoring needs neither a DVC
install nor the ``data.dvc`` the hash came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

_HASH = re.compile(r"[0-9a-f]{32}")
_CHUNK = 1 << 20


class RestoreError(RuntimeError):
    """The data cannot be restored: a hash missing from the cache, a corrupt or unsafe cache
    entry, or a target that already holds files."""


def restore(data_hash: str, to: Path, cache: Path = Path(".dvc/cache")) -> dict[str, Any]:
    """Materialise the DVC directory output ``data_hash`` from ``cache`` as the folder ``to``.

    The folder is built in a temporary sibling of ``to``, every file copied from the cache and
    checked against its md5, and renamed into place only when complete, so ``to`` either does
    not change or holds the whole directory.

    Args:
        data_hash: the directory's md5 as ``data.dvc`` and a bank's lineage record it
            (``"<32 hex>.dir"``; the bare 32 hex digits are accepted too).
        to: the folder to create; it may exist only as an empty folder.
        cache: the DVC cache folder (``cache.dir`` in DVC's config, ``.dvc/cache`` by default).

    Returns:
        ``{"data_hash": "<32 hex>.dir", "files": number of files, "to": str(to)}``.

    Raises:
        ValueError: ``data_hash`` is not a DVC directory md5.
        RestoreError: ``to`` holds something already; the listing or a file is missing from
            the cache (the message names the hash and how to fetch it); a cache entry is a
            symlink or does not match its md5; the listing names a path outside the folder.
    """
    digest = data_hash.removesuffix(".dir")
    if not _HASH.fullmatch(digest):
        raise ValueError(f"data hash must be 32 lowercase hex digits with an optional .dir suffix "
                         f"(as data.dvc records it), got {data_hash!r}")
    data_hash = f"{digest}.dir"
    to, cache = Path(to), Path(cache)
    _check_target(to)
    listing = _entry(cache, data_hash, data_hash)
    raw = listing.read_bytes()
    if hashlib.md5(raw).hexdigest() != digest:
        raise RestoreError(f"the cache's listing {listing} does not match its md5 {digest}: the cache is "
                           f"corrupt; delete that file and fetch {data_hash} again (`dvc fetch`)")
    entries = parse_listing(raw, listing)
    sources = [(_entry(cache, md5, data_hash), md5, relpath) for md5, relpath in entries]

    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.restore-", dir=to.parent))
    try:
        for source, md5, relpath in sources:
            target = staging.joinpath(*relpath.parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                got = _copy(source, target)
            except OSError as error:
                raise RestoreError(f"cannot restore {relpath} of {data_hash} from {source}: {error}") from error
            if got != md5:
                raise RestoreError(f"cache file {source} (for {relpath}) has md5 {got}, expected {md5}: the "
                                   "cache is corrupt; delete that file and fetch it again (`dvc fetch`)")
        try:
            os.rename(staging, to)  # replaces ``to`` only if it is an empty folder
        except OSError as error:
            raise RestoreError(f"{to} appeared while restoring {data_hash} and is not empty; "
                               "choose an empty or new folder") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"data_hash": data_hash, "files": len(sources), "to": str(to)}


def _check_target(to: Path) -> None:
    if to.is_symlink() or (to.exists() and not to.is_dir()):
        raise RestoreError(f"{to} exists and is not a folder; restore into an empty or new folder")
    if to.is_dir() and any(to.iterdir()):
        raise RestoreError(f"{to} is not empty; restore into an empty or new folder (nothing was changed)")


def _entry(cache: Path, md5: str, data_hash: str) -> Path:
    """The cache file of ``md5`` (a file's md5, or ``<md5>.dir`` for a listing)."""
    path = cache / "files" / "md5" / md5[:2] / md5[2:]
    if path.is_symlink():
        raise RestoreError(f"cache entry {path} is a symlink; restore reads only regular files of the cache "
                           "(set `dvc config cache.type copy` and `dvc checkout --relink`, or fetch it again)")
    if not path.is_file():
        what = "the directory listing" if md5 == data_hash else f"file {md5} of"
        raise RestoreError(
            f"{what} {data_hash} is missing from the DVC cache at {cache}. Fetch it from the DVC remote: "
            "`dvc fetch` (or `dvc pull`) when data.dvc names this hash, `dvc fetch --all-commits` for any "
            "version in git history, or `git checkout <commit> -- data.dvc && dvc pull` with the commit "
            "the bank's lineage records (then `dvc checkout` puts data/ back too)")
    return path


def parse_listing(raw: bytes, listing: Path) -> list[tuple[str, PurePosixPath]]:
    try:
        items = json.loads(raw)
        entries = [(str(item["md5"]), str(item["relpath"])) for item in items]
    except (ValueError, TypeError, KeyError) as error:
        raise RestoreError(f"{listing} is not a DVC directory listing (a JSON list of md5 and relpath)") from error
    parsed = []
    for md5, relpath in entries:
        path = PurePosixPath(relpath)
        if not relpath or path.is_absolute() or ".." in path.parts or "\\" in relpath or path == PurePosixPath("."):
            raise RestoreError(f"{listing} names the path {relpath!r}, which is not inside the folder; "
                               "refusing to restore from it")
        if not _HASH.fullmatch(md5):
            raise RestoreError(f"{listing} names {md5!r} for {relpath!r}, which is not an md5")
        parsed.append((md5, path))
    return parsed


def _copy(source: Path, target: Path) -> str:
    """Copy ``source`` (never through a symlink) to a new file ``target``; returns the md5 of
    the bytes written."""
    digest = hashlib.md5()
    with open(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()

