"""`tracebank import --replace` killed with SIGKILL at every step of swapping the new tree in
(issue 29): `data/` is always a complete tree, old or new, and the next import cleans up.

The kill is placed by a `sitecustomize` on the child's PYTHONPATH (the real CLI, the real
system calls): it counts the steps that change the data root (each rename or exchange of
`data` or a `.data.*` folder beside it, and the removal of the replaced tree), performs step
k and then sends the process SIGKILL. The count comes from a run that kills nothing, so
every step is a kill point, whatever the code does. In `no-exchange` the exchange answers as
on a file system without RENAME_EXCHANGE, so the fallback of two renames runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.test_pipeline import BIN, _env, run
from tests.reliability.test_service_faults import record

HOOK = r'''
import os, signal, sys

_at = os.environ.pop("TB_KILL_AT", None)
_log = os.environ.pop("TB_KILL_LOG", None)
_exchange_mode = os.environ.pop("TB_EXCHANGE", "real")
if _at is not None and _log is not None:
    import shutil

    _at = int(_at)  # -1: count only; 0: kill before the first step; k: kill after step k
    _steps = []

    def _mine(*paths):
        names = [os.path.basename(os.fspath(p)) for p in paths]
        return any(n == "data" or n.startswith(".data.") for n in names)

    def _step(name, call):
        if _at == 0 and not _steps:
            _record("killed before " + name)
            os.kill(os.getpid(), signal.SIGKILL)
        result = call()
        _steps.append(name)
        _record(name)
        if len(_steps) == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def _record(line):
        with open(_log, "a") as log:
            log.write(line + "\n")

    def _wrap_rename(original, label):
        def wrapped(src, dst, *args, **kwargs):
            if not _mine(src, dst):
                return original(src, dst, *args, **kwargs)
            what = f"{label} {os.path.basename(os.fspath(src))} -> {os.path.basename(os.fspath(dst))}"
            return _step(what, lambda: original(src, dst, *args, **kwargs))
        return wrapped

    os.replace = _wrap_rename(os.replace, "replace")
    os.rename = _wrap_rename(os.rename, "rename")

    _unlink, _rmtree, _removing = os.unlink, shutil.rmtree, []

    def unlink(path, *args, **kwargs):
        if _removing:
            _removing[1] += 1
            if _removing[1] == 2:  # part-way through removing a tree
                return _step(f"removing {_removing[0]}", lambda: _unlink(path, *args, **kwargs))
        return _unlink(path, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if not _mine(path) or _removing:
            return _rmtree(path, *args, **kwargs)
        _removing[:] = [os.path.basename(os.fspath(path)), 0]
        try:
            return _rmtree(path, *args, **kwargs)
        finally:
            _removing.clear()

    os.unlink = unlink
    shutil.rmtree = rmtree

    import pipeline.data.importer as _importer

    if hasattr(_importer, "_exchange"):
        _real = _importer._exchange
        if _exchange_mode == "none":  # as on a file system without RENAME_EXCHANGE
            _importer._exchange = lambda a, b: False
        else:
            def _exchanged(a, b):
                return _step(f"exchange {os.path.basename(a)} <-> {os.path.basename(b)}", lambda: _real(a, b))
            _importer._exchange = _exchanged
'''


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _state(tree: dict[str, str] | None, old: dict[str, str], new: dict[str, str]) -> str:
    return "missing" if tree is None else "old" if tree == old else "new" if tree == new else "partial"


def leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in project.iterdir() if p.name.startswith(".data."))


@pytest.fixture(scope="module")
def line(tmp_path_factory, elpv_mono):
    """A DVC project whose data/ holds 8 + 4 ELPV cells, and a folder of 5 other cells to
    replace it with."""
    base = tmp_path_factory.mktemp("replace")
    root = base / "line"
    root.mkdir()
    run(root, "git", "init", "-q")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    run(root, str(BIN / "tracebank"), "import", "elpv:mono", "--limit-train", "8", "--limit-test", "4")
    new = base / "new"
    new.mkdir()
    for sample in elpv_mono.train[100:105]:
        shutil.copy(sample.path, new)
    hook = base / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    return {"root": root, "new": new, "hook": hook, "old": tree_hashes(root / "data")}


def _replace(line: dict, project: Path, at: int, exchange: str):
    log = project.parent / f"{project.name}.steps"
    env = _env(project) | {"PYTHONPATH": f"{line['hook']}{os.pathsep}{REPO}", "TB_KILL_AT": str(at),
                           "TB_KILL_LOG": str(log), "TB_EXCHANGE": exchange}
    proc = run(project, str(BIN / "tracebank"), "import", f"folder:{line['new']}", "--replace", "--json",
               check=False, env=env)
    return proc, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("exchange", ["real", "none"], ids=["rename-exchange", "no-exchange"])
def test_import_replace_killed_at_every_step_leaves_a_complete_data_root(line, tmp_path, exchange):
    reference = tmp_path / "reference"
    shutil.copytree(line["root"], reference, symlinks=True)
    done, steps = _replace(line, reference, -1, exchange)
    assert done.returncode == 0, done.stdout + done.stderr
    new, old = tree_hashes(reference / "data"), line["old"]
    assert new != old and steps, steps
    assert leftovers(reference) == []

    problems: list[str] = []
    outcomes: list[dict[str, str]] = []
    for at in range(len(steps) + 1):
        project = tmp_path / f"killed-{at}"
        shutil.copytree(line["root"], project, symlinks=True)
        proc, seen = _replace(line, project, at, exchange)
        where = seen[-1] if seen else "?"
        assert proc.returncode == -signal.SIGKILL, f"not killed at step {at} ({where}): {proc.stderr[-2000:]}"
        data = tree_hashes(project / "data") if (project / "data").is_dir() else None
        state = _state(data, old, new)
        if exchange == "real" and state not in ("old", "new"):  # one exchange: data/ is never incomplete
            problems.append(f"killed after {where!r}: data/ {state}, beside it {leftovers(project)}")

        # the next import finds what the killed one left: data/ whole again, nothing beside it
        again = run(project, str(BIN / "tracebank"), "import", f"folder:{line['new']}", "--json", check=False)
        if again.returncode != 2 or "--replace" not in json.loads(again.stdout).get("error", ""):
            problems.append(f"killed after {where!r} (data/ {state}): the next import without --replace "
                            f"did not refuse to replace data/ ({again.returncode}: {again.stdout[-300:]})")
        recovered = tree_hashes(project / "data") if (project / "data").is_dir() else None
        if recovered != (data if state in ("old", "new") else old):
            problems.append(f"killed after {where!r} (data/ {state}): after the next import data/ is not "
                            f"{'the tree it was' if state in ('old', 'new') else 'the old tree'}")
        if leftovers(project):
            problems.append(f"killed after {where!r}: the next import left {leftovers(project)}")
        outcomes.append({"killed after": re.sub(r"-\d+", "-PID", where), "data/": state,
                         "after the next import": _state(recovered, old, new),
                         "left beside it": ", ".join(leftovers(project)) or "nothing"})
        shutil.rmtree(project)
    record(f"import_replace_{exchange}", {"steps": len(steps), "kills": outcomes, "problems": problems})
    assert not problems, "\n".join(problems)


def test_tracebank_add_after_a_killed_fallback_swap_finds_the_old_data_whole(line, tmp_path, elpv_mono):
    """Without RENAME_EXCHANGE the swap is two renames; killed between them there is no
    data/. The next `tracebank add` (as the next flow run would) renames the old tree back
    before it reads data/, and adds its image to it."""
    for at in range(1, 10):
        project = tmp_path / f"killed-{at}"
        shutil.copytree(line["root"], project, symlinks=True)
        proc, seen = _replace(line, project, at, "none")
        assert proc.returncode == -signal.SIGKILL, seen
        if not (project / "data").exists():
            break
        shutil.rmtree(project)
    else:
        pytest.fail("no kill point of the fallback swap left data/ missing")
    assert any(name.startswith(".data.replaced-") for name in leftovers(project)), leftovers(project)
    image = Path(elpv_mono.train[200].path)
    added = run(project, str(BIN / "tracebank"), "add", str(image), "--json", check=False)
    assert added.returncode == 0, added.stdout + added.stderr
    assert leftovers(project) == []
    tree = tree_hashes(project / "data")
    assert {k: v for k, v in tree.items() if k in line["old"]} == line["old"]
    assert set(tree) - set(line["old"]) == {f"train/good/{image.name}"}
