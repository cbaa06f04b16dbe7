"""A scheduled run after a rejected retrain, against that retrain, on `make run`'s data.

    python -m benchmarks.skip [--source elpv:mono] [--repeat 3]

In a scratch project (its own git and DVC repo, registry and BentoML store) with ``--source``
imported whole: one training run whose gate cannot pass (``gates.image_auroc_min: 0.999``, so
its bank is registered as rejected), then the scheduled flow (``retrain_if_changed``) on the
same data and params, ``--repeat`` times, each a separate ``python -c`` process. As in the
README's scheduled retraining, a Prefect server runs (``prefect server start`` on a free
port, ``PREFECT_API_URL`` set), so no run pays for starting a temporary one. The figures are
wall seconds of the flow call (what a scheduled run costs in the served process) and of the
whole process (interpreter start and imports included). Goal (issue 27): the scheduled run
under a tenth of the retrain, extracting nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

_CALL = """
import asyncio, inspect, json, time
from flows.train import {name}
start = time.perf_counter()
outcome = {name}(params_file="params.yaml", work_dir={work!r})
outcome = asyncio.run(outcome) if inspect.iscoroutine(outcome) else outcome  # retrain_if_changed is async
print(json.dumps({{"flow_s": time.perf_counter() - start, "outcome": outcome}}, default=str))
"""


def _run(project: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(list(args), cwd=project, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _timed(project: Path, env: dict[str, str], name: str, work: str) -> dict:
    start = time.perf_counter()
    out = _run(project, env, sys.executable, "-c", _CALL.format(name=name, work=work))
    row = json.loads(out.strip().splitlines()[-1])
    return row | {"process_s": time.perf_counter() - start}


def _measure(project: Path, env: dict[str, str], repeat: int) -> tuple[dict, list[dict]]:
    retrain = _timed(project, env, "train", "runs/retrain")
    if retrain["outcome"]["status"] != "rejected":
        raise SystemExit(f"the retrain was meant to be rejected, got {retrain['outcome']['status']}")
    skips = [_timed(project, env, "retrain_if_changed", f"runs/skip-{i}") for i in range(repeat)]
    if any(skip["outcome"]["retrained"] for skip in skips):
        raise SystemExit("a scheduled run retrained")
    return retrain, skips


def _prefect_run_times(api: str) -> dict[str, list[float]]:
    """``total_run_time`` of each flow run, by flow name, as the Prefect UI shows them."""
    import httpx

    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=30).json()}
    runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC"}, timeout=30).json()
    times: dict[str, list[float]] = {}
    for run in runs:
        times.setdefault(flows.get(run["flow_id"], "?"), []).append(float(run["total_run_time"]))
    return times


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(api: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the Prefect server at {api} did not become healthy in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="elpv:mono")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "line"
        project.mkdir()
        for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
            shutil.copy(REPO / name, project / name)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["gates"]["image_auroc_min"] = 0.999
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        env = dict(os.environ, PYTHONPATH=str(REPO), BENTOML_HOME=str(project / ".bentoml"),
                   PREFECT_HOME=str(project / ".prefect"), DO_NOT_TRACK="1",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        _run(project, env, "git", "init", "-q")
        _run(project, env, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty",
             "-m", "init")
        _run(project, env, str(BIN / "dvc"), "init", "-q")
        _run(project, env, str(BIN / "tracebank"), "import", args.source)

        port = _free_port()
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        with open(project / "prefect-server.log", "w") as log:
            server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(port)], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(env["PREFECT_API_URL"])
            retrain, skips = _measure(project, env, args.repeat)
            recorded = _prefect_run_times(env["PREFECT_API_URL"])
        finally:
            server.terminate()
            server.wait(timeout=60)
        extracted = sorted(p.name for p in (project / "runs").iterdir() if p.name.startswith("skip-"))

    outcome = retrain["outcome"]
    flow = [s["flow_s"] for s in skips]
    process = [s["process_s"] for s in skips]
    print(f"source {args.source}; retrain: bank {outcome['bank_id']} {outcome['status']} "
          f"({', '.join(outcome['gates']['failures'])})")
    print(f"{'':<28} {'flow call s':>12} {'process s':>10}")
    print(f"{'retrain (rejected)':<28} {retrain['flow_s']:>12.1f} {retrain['process_s']:>10.1f}")
    print(f"{'scheduled run, median':<28} {statistics.median(flow):>12.2f} {statistics.median(process):>10.1f}"
          f"   (min {min(flow):.2f} / max {max(flow):.2f})")
    print(f"ratio scheduled / retrain: flow call {statistics.median(flow) / retrain['flow_s']:.3f}, "
          f"process {statistics.median(process) / retrain['process_s']:.3f}")
    for name, times in sorted(recorded.items()):
        print(f"Prefect's recorded run time of {name}: {', '.join(f'{t:.2f}' for t in times)} s")
    if "tracebank-train" in recorded and "tracebank-retrain-if-changed" in recorded:
        ratio = statistics.median(recorded["tracebank-retrain-if-changed"]) / recorded["tracebank-train"][0]
        print(f"ratio of the recorded run times, scheduled / retrain: {ratio:.3f}")
    print(f"work folders the scheduled runs wrote: {extracted or 'none'}")
    print(f"decision: {skips[0]['outcome']['decision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
