"""``kill -9`` of the training flow at its riskiest moments, while it makes a candidate that
differs from production: the registry must still name a complete, hash-valid production
bank, the old bank's files must be exactly as they were, and the next run must complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.patchcore.bank import read_manifest
from tests.integration.test_pipeline import BIN, _env, make_project, production, run
from tests.reliability.test_service_faults import record

#: Where each kill lands: after the log line announcing the end of the task before the stage,
#: at once or when a path (relative to the project) appears; and the task whose end the
#: kill must come before, so that it is known to have landed inside the stage. Packaging
#: (registration and the model store) and promotion together take about 0.2 s: a fixed delay
#: after the gate would often land after the promotion.
STAGES = {
    "coreset selection": ("Task run 'extract-", None, "Task run 'select-"),
    "packaging": ("Task run 'gate-", "runs/flow/package", "Task run 'package-"),
    "promotion": ("Task run 'package-", None, "Flow run "),
}
#: Production is fitted with one coreset ratio, the runs that are killed with another: their
#: candidate is a bank of its own (a bank id hashes its settings and files), not production again.
PRODUCTION_RATIO = 0.5
CANDIDATE_RATIO = 0.45


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _completed(lines: list[str], task: str) -> bool:
    return any(task in line and "Completed" in line for line in lines)


def _run_and_kill(project: Path, trigger: str, wait_for: str | None) -> list[str]:
    """Start the flow and kill -9 it (and its children) once ``trigger``'s task has completed
    and, when given, ``wait_for`` exists; returns every line it wrote."""
    if wait_for:
        shutil.rmtree(project / wait_for, ignore_errors=True)  # an earlier run's, not this run's
    proc = subprocess.Popen([sys.executable, "-m", "flows.train"], cwd=project, env=_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if trigger in line and "Completed" in line:
            while wait_for and not (project / wait_for).exists() and proc.poll() is None:
                time.sleep(0.001)
            _kill_tree(proc.pid)
            break
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return lines + "".join(rest).splitlines(keepends=True)


def _set_ratio(project: Path, ratio: float) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["coreset"]["ratio"] = ratio
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _files_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project whose production bank the flow made, with params.yaml then changed to
    another coreset ratio; and the id of the candidate those params make, found by a run of
    the flow (``--no-promote``) in a copy of the project, so this project's registry and
    model store have never seen it."""
    project = make_project(tmp_path_factory.mktemp("flow-faults"))
    _set_ratio(project, PRODUCTION_RATIO)
    run(project, sys.executable, "-m", "flows.train")
    first = production(project)
    assert first is not None
    _set_ratio(project, CANDIDATE_RATIO)
    probe = tmp_path_factory.mktemp("flow-faults-probe") / "project"
    shutil.copytree(project, probe, symlinks=True)
    made = run(probe, sys.executable, "-m", "flows.train", "--no-promote")
    candidate = next(line.split()[1].rstrip(":") for line in made.stdout.splitlines() if line.startswith("bank "))
    assert f"bank {candidate}: candidate" in made.stdout, made.stdout  # its gates pass: it can be promoted
    assert candidate != first, "the candidate is the production bank again: the kills would interrupt nothing"
    assert not (project / "banks" / candidate).exists()
    return project, first, candidate


def _production_is_complete(project: Path) -> str:
    """The bank PRODUCTION.json names, after checking it is complete and hash-valid and that
    ``tracebank banks`` works and agrees."""
    now = production(project)
    assert now is not None, "PRODUCTION.json is gone"
    read_manifest(project / "banks" / now)  # every file present, each sha256 as in its manifest
    listed = json.loads(run(project, str(BIN / "tracebank"), "banks", "--json").stdout)
    assert listed["production"] == now
    return now


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_of_the_flow_leaves_the_old_production_bank(trained, stage):
    project, first, candidate = trained
    trigger, wait_for, before_end_of = STAGES[stage]
    assert production(project) == first
    old_files = _files_sha256(project / "banks" / first)
    log = (project / "banks" / "promotions.jsonl").read_text()
    lines = _run_and_kill(project, trigger, wait_for)
    tail = "".join(lines[-12:])
    assert _completed(lines, trigger), "the flow never reached the stage:\n" + tail
    assert not _completed(lines, before_end_of), f"the kill came after {before_end_of!r} ended:\n{tail}"
    now = _production_is_complete(project)
    if stage == "promotion":  # atomic: either the old bank or the new, complete one
        assert now in (first, candidate), tail
    else:
        assert now == first, f"production moved to {now} (candidate {candidate}):\n{tail}"
        assert (project / "banks" / "promotions.jsonl").read_text() == log
    assert _files_sha256(project / "banks" / first) == old_files  # every file, byte for byte
    registered = (project / "banks" / candidate).is_dir()
    if registered:
        read_manifest(project / "banks" / candidate)  # a registered candidate is complete too
    record(f"kill_flow_{stage.replace(' ', '_')}", {
        "production_before": first, "candidate": candidate, "production_after": now,
        "candidate_registered": registered, "old_bank_files_unchanged": len(old_files),
        "last_line": lines[-1].strip()[-200:]})


def test_the_next_run_after_the_kills_completes(trained):
    project, first, candidate = trained
    old_files = _files_sha256(project / "banks" / first)
    proc = run(project, sys.executable, "-m", "flows.train")
    assert f"bank {candidate}: production" in proc.stdout, proc.stdout
    now = _production_is_complete(project)
    assert now == candidate != first
    assert _files_sha256(project / "banks" / first) == old_files
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", "production", "--json").stdout)
    assert lineage["status"] == "production" and lineage["model_tag"]
    assert lineage["params"]["coreset"]["ratio"] == CANDIDATE_RATIO
    moves = json.loads(run(project, str(BIN / "tracebank"), "history", "--json").stdout)
    record("kill_flow_next_run", {"production_before": first, "production_after": now,
                                  "promotions": moves})
