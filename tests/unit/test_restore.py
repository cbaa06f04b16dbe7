"""Restoring a DVC-tracked data folder from the cache by its hash: against the folder that
`dvc add` hashed (a real DVC repo), and the ways a cache or a target can be wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data.restore import RestoreError, restore
from pipeline.data.tracking import STAMP, dvc_add, unchanged_since_add

DVC = Path(sys.executable).parent / "dvc"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dvc_add(repo: Path) -> str:
    subprocess.run([str(DVC), "add", "-q", "data"], cwd=repo, check=True, capture_output=True)
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture
def repo(tmp_path, mtd_dataset):
    """A DVC repo whose data/ went through two versions; returns (repo, first hash, its files)."""
    root = tmp_path / "repo"
    (root / "data" / "train" / "good").mkdir(parents=True)
    (root / "data" / "test" / "blowhole").mkdir(parents=True)
    for sample in mtd_dataset.train[:4]:
        shutil.copy(sample.path, root / "data" / "train" / "good" / Path(sample.path).name)
    shutil.copy(mtd_dataset.test[-1].path, root / "data" / "test" / "blowhole" / "0001.jpg")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=root, check=True)
    subprocess.run([str(DVC), "config", "core.analytics", "false"], cwd=root, check=True)
    first_files = _tree(root / "data")
    first = _dvc_add(root)
    # the next version: one file more, one gone
    shutil.copy(mtd_dataset.train[4].path, root / "data" / "train" / "good" / "new.jpg")
    next(iter((root / "data" / "train" / "good").glob("*.jpg"))).unlink()
    assert _dvc_add(root) != first
    return root, first, first_files


def _cache_file(repo: Path, md5: str) -> Path:
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_an_earlier_version_comes_back_byte_for_byte(repo):
    root, first, files = repo
    done = restore(first, root / "restored", cache=root / ".dvc" / "cache")
    assert _tree(root / "restored") == files  # what `dvc add` hashed then, not data/ as it is now
    assert done == {"data_hash": first, "files": len(files), "to": str(root / "restored")}
    assert restore(first.removesuffix(".dir"), root / "again", cache=root / ".dvc" / "cache")["files"] == 5


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".restore-" in p.name]


def test_a_corrupt_cache_file_is_named_and_nothing_is_left_behind(repo):
    root, first, files = repo
    listing = json.loads(_cache_file(root, first.removesuffix(".dir") + ".dir").read_bytes())
    victim = listing[-1]
    path = _cache_file(root, victim["md5"])
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(RestoreError, match=f"for {victim['relpath']}.*corrupt"):
        restore(first, root / "restored", cache=root / ".dvc" / "cache")
    assert not (root / "restored").exists()
    _no_leftovers(root)


def test_a_missing_hash_says_which_and_how_to_fetch_it(repo):
    root, first, _ = repo
    missing = "0" * 32 + ".dir"
    with pytest.raises(RestoreError, match=f"{missing} is missing from the DVC cache.*dvc fetch"):
        restore(missing, root / "restored", cache=root / ".dvc" / "cache")
    with pytest.raises(ValueError, match="32 lowercase hex"):
        restore("../../etc", root / "restored", cache=root / ".dvc" / "cache")
    assert not (root / "restored").exists()


def test_a_cache_entry_that_is_a_symlink_is_not_followed(repo, tmp_path):
    root, first, _ = repo
    listing = json.loads(_cache_file(root, first).read_bytes())
    path = _cache_file(root, listing[0]["md5"])
    outside = tmp_path / "outside.jpg"
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)  # the same bytes, elsewhere: still refused
    with pytest.raises(RestoreError, match="is a symlink"):
        restore(first, root / "restored", cache=root / ".dvc" / "cache")
    assert not (root / "restored").exists()


def test_a_listing_that_names_a_path_outside_the_folder_is_refused(repo, tmp_path):
    root, first, _ = repo
    some = json.loads(_cache_file(root, first).read_bytes())[0]["md5"]
    raw = json.dumps([{"md5": some, "relpath": "../escaped.jpg"}]).encode()
    digest = hashlib.md5(raw).hexdigest()
    listing = _cache_file(root, digest + ".dir")
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_bytes(raw)
    with pytest.raises(RestoreError, match="not inside the folder"):
        restore(digest, tmp_path / "out" / "restored", cache=root / ".dvc" / "cache")
    assert not (tmp_path / "out" / "escaped.jpg").exists()


def test_a_folder_that_holds_files_is_left_alone(repo):
    root, first, _ = repo
    target = root / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(RestoreError, match="not empty"):
        restore(first, target, cache=root / ".dvc" / "cache")
    assert _tree(target) == {"keep.txt": b"mine"}
    (root / "empty").mkdir()
    assert restore(first, root / "empty", cache=root / ".dvc" / "cache")["files"] == 5  # an empty one is fine


def test_a_listing_changed_in_the_cache_is_refused(repo):
    root, first, _ = repo
    listing = _cache_file(root, first)
    entries = json.loads(listing.read_bytes())
    listing.chmod(0o644)
    listing.write_text(json.dumps(entries[1:]))  # a file dropped from the version
    with pytest.raises(RestoreError, match="does not match its md5"):
        restore(first, root / "restored", cache=root / ".dvc" / "cache")
    assert not (root / "restored").exists()



def test_dvc_add_is_skipped_only_when_nothing_under_data_changed(repo):
    root, first, _ = repo
    pointer, data = root / "data.dvc", root / "data"
    good = data / "train" / "good"

    def ran_dvc(previous_ctime: int) -> bool:  # DVC rewrites data.dvc on every add
        return os.stat(pointer).st_ctime_ns != previous_ctime

    current = dvc_add("data", root)  # the first add through tracebank: DVC runs, the stamp is written
    assert current == _recorded(pointer) and (root / STAMP).is_file()
    written = os.stat(pointer).st_ctime_ns
    assert dvc_add("data", root) == current and not ran_dvc(written)  # nothing changed: no DVC process
    changes = [
        lambda: (good / "new.jpg").write_bytes((good / "new.jpg").read_bytes()[:-1] + b"\x01"),  # bytes in place
        lambda: shutil.copy(good / "new.jpg", good / "another.jpg"),  # a file more
        lambda: (good / "another.jpg").unlink(),  # a file fewer
        lambda: (good / "new.jpg").rename(good / "renamed.jpg"),
        lambda: (good / "renamed.jpg").chmod(0o600),
    ]
    for change in changes:
        change()
        written = os.stat(pointer).st_ctime_ns
        after = dvc_add("data", root)
        assert ran_dvc(written) and after == _recorded(pointer)
        written = os.stat(pointer).st_ctime_ns
        assert dvc_add("data", root) == after and not ran_dvc(written)
    # an older data.dvc put back (`git checkout OLD -- data.dvc`) while data/ stays as it is:
    # the hash returned is the data's, never the pointer's
    older = _recorded(pointer)
    (good / "renamed.jpg").write_bytes((good / "renamed.jpg").read_bytes()[:-1] + b"\x02")  # same names
    actual = dvc_add("data", root)
    assert actual != older
    pointer.write_text(pointer.read_text().replace(actual.removesuffix(".dir"), older.removesuffix(".dir")))
    assert dvc_add("data", root) == actual
    (good / "linked.jpg").symlink_to(good / "renamed.jpg")  # DVC decides about a symlink, not the shortcut
    assert not unchanged_since_add(data, pointer, _recorded(pointer), root / ".dvc" / "cache", root / STAMP)


def _recorded(pointer: Path) -> str:
    return yaml.safe_load(pointer.read_text())["outs"][0]["md5"]
