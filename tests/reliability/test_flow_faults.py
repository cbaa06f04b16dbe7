"""``kill -9`` of the training flow at its riskiest moments: the registry must still name a
complete, hash-valid production bank, and the next run must complete."""

from __future__ import annotations

import contextlib
import json
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

#: Kill when the line announcing the end of the previous task appears: the named stage is next.
STAGES = {
    "coreset selection": "Task run 'extract-",
    "packaging": "Task run 'gate-",
    "promotion": "Task run 'package-",
}


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _run_and_kill(project: Path, trigger: str, delay: float) -> list[str]:
    """Start the flow, kill -9 it (and its Prefect server) ``delay`` s after ``trigger``."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.train"], cwd=project, env=_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if trigger in line and "Completed" in line:
            if delay:
                time.sleep(delay)
            _kill_tree(proc.pid)
            break
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    proc.wait(timeout=120)
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("flow-faults"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["coreset"]["ratio"] = 0.5  # a coreset of several seconds, so the kill lands inside it
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run(project, sys.executable, "-m", "flows.train")
    return project, production(project)


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_of_the_flow_leaves_the_old_production_bank(trained, stage):
    project, first = trained
    lines = _run_and_kill(project, STAGES[stage], 0.3)
    assert any(STAGES[stage] in line for line in lines), "the flow never reached the stage:\n" + "".join(lines[-30:])
    now = production(project)
    if stage == "promotion":  # atomic: either the old bank or the new, complete one
        assert now is not None
    else:
        assert now == first
    read_manifest(project / "banks" / now)  # complete and hash-valid
    listed = json.loads(run(project, str(BIN / "tracebank"), "banks", "--json").stdout)
    assert listed["production"] == now
    record(f"kill_flow_{stage.replace(' ', '_')}", {"production_before": first, "production_after": now,
                                                    "last_line": lines[-1].strip()[-200:]})


def test_the_next_run_after_the_kills_completes(trained):
    project, first = trained
    proc = run(project, sys.executable, "-m", "flows.train")
    assert "production" in proc.stdout
    now = production(project)
    read_manifest(project / "banks" / now)
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", "production", "--json").stdout)
    assert lineage["status"] == "production" and lineage["model_tag"]
