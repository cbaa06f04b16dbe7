"""The daily loop as a plant runs it, every part really started.

A project in the state ``make run`` leaves (ELPV mono imported under DVC, a production bank
from the Prefect flow, committed to git), a Prefect server, the inspection service answering
requests, and the inbox deployment served on a one-minute cron. Into the inbox go 50 new good
cells, 2 duplicates (of a training and of a test image) and 1 corrupt file. One scheduled run
must add the 50, report the duplicates, quarantine the corrupt file, extend the production bank
with the new images only, pass the gates, promote, and make the running service reload;
afterwards the audit names both banks with their lineage, ``dvc diff`` lists exactly the 50
added files and the test split is byte for byte what it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.conftest import REPO
from tests.integration.service_support import TOKEN, Server, free_port
from tests.integration.test_pipeline import BIN, _env, production, run

N_TRAIN, N_TEST, N_NEW = 40, 24, 50


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["coreset"]["ratio"] = 0.05
    params["gates"].update({"image_auroc_min": 0.5, "pro_min": None, "pixel_auroc_min": None})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(root, "git", "init", "-q")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "tracebank"), "import", "elpv:mono", "--limit-train", str(N_TRAIN),
        "--limit-test", str(N_TEST))
    run(root, sys.executable, "-m", "flows.train")
    with open(root / ".gitignore", "a") as ignore:  # dvc add wrote /data there
        ignore.write("/runs\n/banks\n/audit\n/quarantine\n/inbox\n/.bentoml\n/.prefect\n*.log\n")
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "make run state")
    return root


@contextlib.contextmanager
def _process(args: list[str], cwd: Path, env: dict[str, str], log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.terminate()
            _, alive = psutil.wait_procs(family, timeout=20)
            for member in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()


def _wait(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            result = check()
            if result:
                return result
        time.sleep(2)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout} s\n{tail}")


def _inbox_runs(api: str) -> list[dict]:
    """Finished runs of the inbox flow, from the server's REST API."""
    final = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]  # not the runs the schedule queued ahead
    body = {"flows": {"name": {"any_": ["tracebank-inbox"]}}, "flow_runs": {"state": {"type": {"any_": final}}},
            "sort": "START_TIME_ASC", "limit": 10}
    return list(httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json())


def _artifact(api: str, key: str) -> str:
    body = {"artifacts": {"key": {"any_": [key]}}, "limit": 1}
    found = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    return found[0]["data"] if found else ""


def test_inbox_to_served_bank_in_one_scheduled_run(tmp_path, elpv_mono):
    project = _project(tmp_path / "plant")
    old_bank = production(project)
    assert old_bank
    test_before = _tree_digest(project / "data" / "test")

    imported = {p.name.split("_", 1)[1] for p in (project / "data" / "train" / "good").iterdir()}
    fresh = [s.path for s in elpv_mono.train if Path(s.path).name not in imported][:N_NEW]
    inbox = project / "inbox"
    inbox.mkdir()
    for path in fresh:
        shutil.copy(path, inbox / Path(path).name)
    shutil.copy(next((project / "data" / "train" / "good").iterdir()), inbox / "again_train.png")
    shutil.copy(next((project / "data" / "test" / "good").iterdir()), inbox / "again_test.png")
    (inbox / "corrupt.png").write_bytes(Path(fresh[0]).read_bytes()[:300])  # a truncated PNG

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(project) | {"PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                           "TRACEBANK_ADMIN_TOKEN": TOKEN}
    server_log, serve_log = project / "prefect-server.log", project / "serve.log"
    with _process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  project, env, server_log):
        service = Server(project, TRACEBANK_REGISTRY=str(project / "banks"),
                         TRACEBANK_AUDIT_DB=str(project / "audit" / "decisions.sqlite")).start()
        try:
            _wait("Prefect server healthy", lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200,
                  180, server_log)
            cell = project / "data" / "test" / "good" / sorted(os.listdir(project / "data" / "test" / "good"))[0]
            with httpx.Client() as client:
                first = service.predict(client, cell, "cell-1").json()
            assert first["bank_id"] == old_bank

            with _process([sys.executable, "-m", "flows.train", "--inbox", str(inbox), "--serve", "* * * * *",
                           "--reload-url", service.url], project, env, serve_log):
                runs = _wait("a scheduled inbox run that finished", lambda: _inbox_runs(api), 300, serve_log)
            assert runs[0]["state_type"] == "COMPLETED", serve_log.read_text(errors="replace")[-4000:]
            assert runs[0]["auto_scheduled"]  # started by the schedule, not by hand

            new_bank = production(project)
            assert new_bank and new_bank != old_bank
            with httpx.Client() as client:
                second = service.predict(client, cell, "cell-1").json()
            assert second["bank_id"] == new_bank  # the running service reloaded
        finally:
            service.stop()
        summary = _artifact(api, "inbox-run")
        # Prefect's own commands list them too (they fail with some FastAPI releases, see constraints.txt)
        wide = env | {"COLUMNS": "300"}  # rich truncates table cells to the terminal's width
        runs_ls = run(project, str(BIN / "prefect"), "flow-run", "ls", "--state", "COMPLETED", env=wide).stdout
        assert "tracebank-inbox" in runs_ls and "COMPLETED" in runs_ls
        assert "inbox-run" in run(project, str(BIN / "prefect"), "artifact", "ls", env=wide).stdout

    assert f"{N_NEW} added, 2 duplicate(s), 1 quarantined" in summary
    assert f"bank {new_bank} production" in summary and "incremental fit" in summary

    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", new_bank, "--json").stdout)
    assert lineage["fit"]["fit"] == "incremental" and lineage["fit"]["parent_bank"] == old_bank
    from pipeline.data.datasets import calibration_draw

    trained_on = {Path(p).name for p in fresh if calibration_draw(p) >= 0.1}  # the rest calibrate
    extracted = {Path(f["path"]).name for f in lineage["added_files"]}
    assert extracted == trained_on and lineage["fit"]["n_added"] == len(trained_on)
    assert lineage["gates"]["passed"] and lineage["status"] == "production"

    common = ["--db", str(project / "audit" / "decisions.sqlite"), "--registry", str(project / "banks"), "--json"]
    rows = [json.loads(line) for line in run(project, str(BIN / "tracebank"), "audit", "--part", "cell-1",
                                             *common).stdout.splitlines()]
    assert [r["bank_id"] for r in rows] == [old_bank, new_bank]
    assert rows[0]["lineage"]["data_hash"] != rows[1]["lineage"]["data_hash"]
    # each decision joins its bank's record as it was then, and says what the bank is now
    assert rows[0]["lineage"]["status"] == rows[1]["lineage"]["status"] == "production"
    assert rows[0]["lineage"]["status_now"] == "retired" and rows[1]["lineage"]["status_now"] == "production"

    diff = json.loads(run(project, str(BIN / "dvc"), "diff", "--json", "--targets", "data").stdout)
    assert sorted(Path(entry["path"]).name for entry in diff["added"]) == sorted(Path(p).name for p in fresh)
    assert not diff["deleted"] and all(e["path"].rstrip("/") == "data" for e in diff["modified"])
    assert _tree_digest(project / "data" / "test") == test_before

    quarantined = list((project / "quarantine").rglob("corrupt.png"))
    assert len(quarantined) == 1
    processed = {p.name for p in (inbox / "processed").rglob("*") if p.is_file()}
    assert len(processed) == N_NEW + 3 and not [p for p in inbox.iterdir() if p.is_file()]
