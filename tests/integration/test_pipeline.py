"""The training pipeline, started as a user starts it: `dvc repro` and the Prefect flow, in a
scratch project directory (its own git repo, DVC repo, registry and BentoML store)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["BENTOML_HOME"] = str(project / ".bentoml")
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def run(project: Path, *args: str, check: bool = True, timeout: int = 900,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=project, env=env or _env(project), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def make_project(root: Path, *, gates: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    with open(root / ".gitignore", "a") as ignore:  # this project's BentoML and Prefect homes
        ignore.write("/.bentoml/\n/.prefect/\n")
    for package in ("pipeline", "flows", "serving"):  # the code the stages depend on
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["coreset"]["ratio"] = 0.05
    params["gates"].update(gates or {"image_auroc_min": 0.5})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(root, "git", "init", "-q")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    run(root, str(BIN / "tracebank"), "import", "elpv:mono", "--limit-train", "24", "--limit-test", "24")
    return root


def production(project: Path) -> str | None:
    """The production bank as every reader of the registry sees it: replayed from the
    promotion log (``PRODUCTION.json`` is rewritten from it, and a kill between the two
    writes leaves the pointer one promotion behind the log until the next one)."""
    from pipeline.lifecycle.registry import Registry

    pointer = Registry(project / "banks").production()
    return pointer["bank_id"] if pointer else None


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory):
    """A project whose production bank was made by the Prefect flow."""
    project = make_project(tmp_path_factory.mktemp("flow"))
    proc = run(project, sys.executable, "-m", "flows.train")
    return project, proc


def test_prefect_flow_trains_gates_packages_and_promotes(flow_project):
    project, proc = flow_project
    bank = production(project)
    assert bank and f"bank {bank}: production" in proc.stdout
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", "production", "--json").stdout)
    for key in ("bank_id", "data_hash", "files", "git_commit", "params", "metrics", "gates", "status", "promoted_at"):
        assert key in lineage, key
    assert lineage["status"] == "production" and lineage["gates"]["passed"]
    assert lineage["git_commit"] and lineage["fit"]["fit"] == "full"
    # 24 good cells imported: the bank holds those not held out to choose the threshold on
    from pipeline.data.datasets import calibration_draw

    held_out = [f for f in (project / "data" / "train" / "good").iterdir() if calibration_draw(str(f)) < 0.1]
    assert len(lineage["files"]) == 24 - max(1, len(held_out))
    assert lineage["threshold"]["chosen_on"] == f"calibration split ({max(1, len(held_out))} good, 0 defective)"
    assert set(lineage["operating_point"]) == {"false_reject_rate", "miss_rate", "f1", "measured_on"}
    assert (project / "runs" / "flow" / "report" / "report.html").is_file()
    stored = json.loads(run(project, str(BIN / "bentoml"), "models", "list", "-o", "json").stdout)
    assert any(m["tag"].startswith("tracebank-bank:") for m in stored)


def test_lineage_names_the_data_hash_dvc_reports(flow_project):
    project, _ = flow_project
    dvc_file = yaml.safe_load((project / "data.dvc").read_text())
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", "production", "--json").stdout)
    assert lineage["data_hash"] == dvc_file["outs"][0]["md5"]
    status = run(project, str(BIN / "dvc"), "data", "status", "--json").stdout
    assert "data" not in json.loads(status or "{}").get("uncommitted", {}).get("modified", [])


def test_gate_failure_leaves_production_unchanged(flow_project):
    project, _ = flow_project
    before = production(project)
    files_before = _tree_sha256(project / "banks" / before)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # another coreset, so the candidate is a bank of its own, and a gate it cannot pass
    strict = dict(params, gates=dict(params["gates"], image_auroc_min=0.999),
                  coreset=dict(params["coreset"], ratio=0.04))
    (project / "params-strict.yaml").write_text(yaml.safe_dump(strict))
    code = (
        "from flows.train import train; import json; "
        "print(json.dumps(train(params_file='params-strict.yaml', work_dir='runs-strict')))"
    )
    outcome = json.loads(run(project, sys.executable, "-c", code).stdout.strip().splitlines()[-1])
    assert outcome["status"] == "rejected" and outcome["gates"]["failures"]
    assert outcome["bank_id"] != before
    assert production(project) == before
    refused = run(project, str(BIN / "tracebank"), "promote", outcome["bank_id"], check=False)
    assert refused.returncode == 2 and "cannot be promoted" in refused.stderr
    assert production(project) == before
    assert _tree_sha256(project / "banks" / before) == files_before  # every file, byte for byte


def _tree_sha256(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_promotion_keeps_a_complete_production_bank(flow_project):
    """``kill -9`` of ``tracebank promote`` of a passing candidate that differs from
    production, at 7 moments from 0 to 10 ms after it took the registry's lock: production
    is always the old or the new bank, complete and hash-valid, and neither bank's files change.

    Note: the command spends seconds importing before its few milliseconds of promotion, so
    delays from its start would all land before the promotion. The test holds the registry's
    lock as another writer would, lets go once the command waits for it, and counts from the
    moment the command writes its pid into the lock file, just after taking it.
    """
    from pipeline.patchcore.bank import read_manifest

    project, _ = flow_project
    old = production(project)
    assert old is not None
    candidate = _passing_candidate(project)
    assert candidate != old, "the candidate is the production bank again: the kills would interrupt nothing"
    old_files = _tree_sha256(project / "banks" / old)
    new_files = _tree_sha256(project / "banks" / candidate)
    seen = []
    for delay in (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01):
        proc = _promote_when_locked(project, candidate)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "`tracebank promote` ended before the kill"
        now = production(project)
        assert now in (old, candidate), f"after a kill {delay} s into the promotion the log names {now}"
        read_manifest(project / "banks" / now)  # complete and hash-valid
        assert _tree_sha256(project / "banks" / old) == old_files  # every file, byte for byte
        assert _tree_sha256(project / "banks" / candidate) == new_files
        seen.append(now)
        if now == candidate:  # the promotion got through: back to the old bank, so the next kill interrupts one
            run(project, str(BIN / "tracebank"), "promote", old)
    assert production(project) == old  # as the tests after this one expect
    print(f"candidate {candidate[:8]} != production {old[:8]}; after each kill: "
          + ", ".join("new" if b == candidate else "old" for b in seen))


def _promote_when_locked(project: Path, bank: str) -> subprocess.Popen:
    """Start ``tracebank promote bank`` and return once it holds the registry's lock."""
    import fcntl

    import psutil

    path = project / "banks" / ".lock"
    held = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # another writer
        os.ftruncate(held, 0)  # no earlier holder's pid
        proc = subprocess.Popen([str(BIN / "tracebank"), "promote", bank], cwd=project, env=_env(project),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = str(path.resolve())
        while not any(f.path == target for f in psutil.Process(proc.pid).open_files()):  # waiting for the lock
            assert proc.poll() is None, "`tracebank promote` ended before it asked for the registry's lock"
            time.sleep(0.005)
    finally:
        os.close(held)  # lets go
    mark = f"pid {proc.pid} ".encode()
    fd = os.open(path, os.O_RDONLY)
    try:
        while not os.pread(fd, len(mark), 0) == mark:  # written just after it took the lock
            assert proc.poll() is None, "`tracebank promote` ended without taking the registry's lock"
    finally:
        os.close(fd)
    return proc


def _passing_candidate(project: Path) -> str:
    """A bank of another coreset ratio, gated (passed) and registered, not promoted."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    other = dict(params, coreset=dict(params["coreset"], ratio=0.08))
    (project / "params-candidate.yaml").write_text(yaml.safe_dump(other))
    code = (
        "from flows.train import train; import json; "
        "print(json.dumps(train(params_file='params-candidate.yaml', work_dir='runs-candidate', auto_promote=False)))"
    )
    outcome = json.loads(run(project, sys.executable, "-c", code).stdout.strip().splitlines()[-1])
    assert outcome["status"] == "candidate", outcome["gates"]
    return str(outcome["bank_id"])


def test_validation_stops_broken_data_before_training(tmp_path):
    project = make_project(tmp_path / "broken")
    (project / "data" / "train" / "good" / "99999_empty.png").write_bytes(b"")
    shutil.copy(next((project / "data" / "train" / "good").glob("00000_*")),
                project / "data" / "train" / "good" / "99998_copy.png")
    proc = run(project, sys.executable, "-m", "flows.train", check=False)
    assert proc.returncode == 1
    assert "99999_empty.png" in proc.stderr and "99998_copy.png" in proc.stderr
    # no bank (the run's lock file may be there)
    assert not (project / "banks").exists() or not [p for p in (project / "banks").iterdir() if p.name != ".run.lock"]
    assert not (project / "runs" / "flow" / "features").exists()
    assert list((project / "runs" / "flow" / "validate").glob("**/index.html"))  # Data Docs written


def git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", *args)


def test_dvc_as_its_users_know_it(tmp_path):
    """`dvc repro` with dvc started as `.venv/bin/dvc` and no venv on PATH; nothing to do the
    second time; metrics in git, so `dvc exp run -S`, `dvc exp show` and `dvc metrics diff`
    show numbers; a plot that cannot be drawn says why; the Prefect flow leaves DVC clean."""
    project = make_project(tmp_path / "dvc")
    (project / ".venv").symlink_to(Path(sys.prefix))  # the project's interpreter, as `make setup` makes it
    bare = {**_env(project), "PATH": "/usr/bin:/bin"}
    bare.pop("PYTHONPATH")
    first = run(project, str(BIN / "dvc"), "repro", env=bare)
    assert "Running stage 'package'" in first.stdout
    assert "plot metrics/plots/pro.csv not drawn: the test split has no defect masks" in first.stderr
    metrics = json.loads(run(project, str(BIN / "dvc"), "metrics", "show", "--json").stdout)
    values = next(iter(metrics.values()))["data"]["metrics/metrics.json"]["data"]
    assert 0.5 <= values["image_auroc"] <= 1.0
    package = json.loads((project / "runs" / "package.json").read_text())
    assert package["status"] == "candidate" and (project / "banks" / package["bank_id"]).is_dir()
    second = run(project, str(BIN / "dvc"), "repro")
    assert "Running stage" not in second.stdout
    plots = run(project, str(BIN / "dvc"), "plots", "show", "-o", "plots-html")
    assert (project / "plots-html" / "index.html").is_file(), plots.stdout
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "baseline bank")
    assert "metrics/metrics.json" in git(project, "ls-files").stdout

    run(project, str(BIN / "dvc"), "exp", "run", "-S", "coreset.ratio=0.02", env=bare)
    rows = json.loads(run(project, str(BIN / "dvc"), "exp", "show", "--json").stdout)
    found = {}
    for commit in rows:
        for exp in [commit, *[e for ex in commit.get("experiments") or [] for e in ex.get("revs") or []]]:
            data = exp.get("data") or {}
            ratio = (((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}).get("coreset", {})
            found[ratio.get("ratio")] = (data.get("metrics") or {}).get("metrics/metrics.json", {}).get("data")
    assert isinstance(found[0.02]["image_auroc"], float) and isinstance(found[0.05]["image_auroc"], float), found
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "smaller coreset")
    diff = json.loads(run(project, str(BIN / "dvc"), "metrics", "diff", "HEAD~1", "--json").stdout)
    auroc = diff["metrics/metrics.json"]["image_auroc"]
    assert auroc["old"] == found[0.05]["image_auroc"] and auroc["new"] == found[0.02]["image_auroc"]

    # the Prefect flow on the same project leaves DVC's outputs as they are
    run(project, sys.executable, "-m", "flows.train", "--no-promote")
    status = json.loads(run(project, str(BIN / "dvc"), "status", "--json").stdout)
    assert status == {}, status


def test_new_nominal_images_trigger_a_retrain_that_is_promoted(flow_project, elpv_mono):
    project, _ = flow_project
    code = ("import asyncio, json; from flows.train import retrain_if_changed; "
            "print(json.dumps(asyncio.run(retrain_if_changed())))")
    unchanged = json.loads(run(project, sys.executable, "-c", code).stdout.strip().splitlines()[-1])
    assert unchanged["retrained"] is False
    before = production(project)
    from pipeline.data.intake import add_nominal

    added = add_nominal([s.path for s in elpv_mono.train[100:106]], project / "data",
                        quarantine=project / "quarantine")
    assert len(added.added) == 6
    outcome = json.loads(run(project, sys.executable, "-c", code).stdout.strip().splitlines()[-1])
    assert outcome["retrained"] is True and outcome["status"] == "production"
    assert production(project) == outcome["bank_id"] != before
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", "production", "--json").stdout)
    from pipeline.data.datasets import calibration_draw

    good = list((project / "data" / "train" / "good").iterdir())
    assert len(good) == 30
    assert len(lineage["files"]) == 30 - max(1, sum(calibration_draw(str(f)) < 0.1 for f in good))
    assert lineage["fit"]["fit"] == "incremental" and lineage["fit"]["parent_bank"] == before
    assert lineage["data_hash"] == yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def test_serve_without_a_prefect_server_stops_with_the_advice(tmp_path):
    """A schedule needs a server that keeps it: without one, `--serve` says so and how."""
    env = {k: v for k, v in _env(tmp_path).items() if k != "PREFECT_API_URL"}
    proc = run(tmp_path, sys.executable, "-m", "flows.train", "--serve", "0 3 * * *", check=False, env=env)
    assert proc.returncode == 2
    assert "needs a running Prefect server" in proc.stderr and "prefect server start" in proc.stderr
