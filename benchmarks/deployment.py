"""The deployed unit: the Bento served from an environment built only from its own requirements,
against the same Bento served from the development venv.

    python -m benchmarks.deployment [--limit 100] [--rounds 3] [--requests 48] [--clients 4]

Fits a small real MTD bank (``--limit`` training tiles, 5% coreset) into a scratch registry,
builds and exports the Bento, and then does what a deployment does (README, "Deploying the
Bento to another machine"; the same steps as tests/integration/test_deployment.py, whose
helpers in tests/integration/service_support.py it uses): a new venv, ``pip install -r`` the
Bento's own ``env/python/requirements.txt`` (no constraints; pip's cache as it is), ``bentoml
import`` into an empty BentoML home. Prints

- the size of that venv (``du``; goal under 600 MB) beside the development venv's,
- per round and side, the time from starting ``bentoml serve`` to the first answer of
  ``/predict`` (goal under 15 s on 2 cores), the resident memory (``VmRSS`` of
  ``/proc/PID/status``) of the arbiter and of each worker after the load,
- throughput, requests/s, of ``--requests`` sequential predicts from one client and of as
  many spread over ``--clients`` concurrent ones, and the deployed/development ratio
  (goal at least 0.95x).

Both sides serve the same imported Bento from the same empty folder with the same
environment but for the venv. Each round starts them one at a time (the first answer is timed
with nothing else starting), then loads them in alternating blocks of ``--block`` predicts,
the idle one waiting, so that the noise of a shared machine falls on both; the side that goes
first alternates between rounds. The ratio is taken per round, and its median reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from pipeline.lifecycle.registry import Registry
from pipeline.patchcore.bank import read_manifest
from tests.conftest import MTD_SPEC
from tests.integration.service_support import (
    BIN,
    Server,
    bento_venv,
    bentoml_import,
    build_and_export,
    fit_and_register,
    machine_environ,
    run,
)


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0]) / 1024


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _post(client: httpx.Client, url: str, payload: tuple[str, bytes], part_id: str) -> None:
    response = client.post(f"{url}/predict", files={"image": (payload[0], payload[1], "image/png")},
                           data={"part_id": part_id}, timeout=120)
    if response.status_code != 200:
        raise SystemExit(f"/predict answered {response.status_code}: {response.text[:300]}")


def _first_answer(server: Server, payload: tuple[str, bytes]) -> float:
    """Start ``server`` (nothing else starting) and return the seconds to its first answer."""
    start = time.monotonic()
    server.start(interval=0.05)
    with httpx.Client() as client:
        _post(client, server.url, payload, "first")
        for k in range(3):  # warm-up, not timed
            _post(client, server.url, payload, f"warm-{k}")
    return time.monotonic() - start


def _sequential(server: Server, payloads: list[tuple[str, bytes]], count: int, offset: int) -> float:
    """Seconds for ``count`` predicts from one client, one after the other."""
    with httpx.Client() as client:
        t0 = time.perf_counter()
        for k in range(offset, offset + count):
            _post(client, server.url, payloads[k % len(payloads)], f"seq-{k}")
        return time.perf_counter() - t0


def _concurrent(server: Server, payloads: list[tuple[str, bytes]], count: int, offset: int, clients: int) -> float:
    """Seconds for ``count`` predicts spread over ``clients`` concurrent clients."""

    def one_client(c: int) -> None:
        with httpx.Client() as own:
            for k in range(offset + c, offset + count, clients):
                _post(own, server.url, payloads[k % len(payloads)], f"par-{k}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return time.perf_counter() - t0


def _memory(server: Server) -> dict[str, Any]:
    processes = server.processes()
    return {"arbiter": _rss_mb(processes[0].pid),
            "workers": [_rss_mb(p.pid) for p in processes[1:] if "worker" in " ".join(p.cmdline())]}


def _round(servers: dict[str, Server], payloads: list[tuple[str, bytes]], args: argparse.Namespace,
           first: str) -> dict[str, dict[str, Any]]:
    """One round: each side started alone and timed to its first answer, then both loaded in
    alternating blocks of ``--block`` predicts (so that the machine's noise falls on both)."""
    order = [first, *(name for name in servers if name != first)]
    row: dict[str, dict[str, Any]] = {}
    for name in order:
        row[name] = {"first_s": _first_answer(servers[name], payloads[0]), "seq_s": 0.0, "conc_s": 0.0}
    for block, offset in enumerate(range(0, args.requests, args.block)):
        count = min(args.block, args.requests - offset)
        for name in order if block % 2 == 0 else reversed(order):
            row[name]["seq_s"] += _sequential(servers[name], payloads, count, offset)
            row[name]["conc_s"] += _concurrent(servers[name], payloads, count, offset, args.clients)
    for name in order:
        row[name].update(_memory(servers[name]), sequential=args.requests / row[name]["seq_s"],
                         concurrent=args.requests / row[name]["conc_s"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="MTD training tiles of the bank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="predicts per load (sequential, then concurrent)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--block", type=int, default=8, help="predicts to one side before the other's turn")
    args = parser.parse_args(argv)

    from pipeline.data.datasets import open_dataset

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tracebank-deployment-") as tmp:
        root = Path(tmp)
        bank_id = fit_and_register(root, "bank", limit=args.limit, seed=0)
        run(root, str(BIN / "tracebank"), "promote", bank_id, "--registry", str(root / "banks"))
        threshold = read_manifest(Registry(root / "banks").bank_dir(bank_id))["threshold"]["value"]
        archive = root / "tracebank.bento"
        tag = build_and_export(root, archive)
        machine = root / "machine"
        elsewhere = machine / "elsewhere"
        elsewhere.mkdir(parents=True)
        t0 = time.perf_counter()
        venv = bento_venv(archive, machine / "venv")
        install_s = time.perf_counter() - t0
        home = machine / "home"
        bentoml_import(archive, venv, machine_environ(home, venv), elsewhere)
        sides = {"deployed": venv, "development": Path(sys.prefix)}
        sizes = {name: _du_mb(path) for name, path in sides.items()}
        files = [Path(s.path) for s in open_dataset(MTD_SPEC).test][::7][:24]
        payloads = [(f.name, f.read_bytes()) for f in files]

        results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for r in range(args.rounds):
            servers = {name: Server(machine, target=tag, cwd=elsewhere, environ=machine_environ(home, venv_),
                                    bentoml=venv_ / "bin" / "bentoml") for name, venv_ in sides.items()}
            try:
                row = _round(servers, payloads, args, first=list(sides)[r % 2])
            finally:
                for server in servers.values():
                    server.stop()
            for name in sides:
                results[name].append(row[name])

    print(f"Bento {tag}: bank {bank_id} ({args.limit} MTD training tiles, threshold {threshold:.4f}); "
          f"{os.cpu_count()} CPUs, load average at the start {', '.join(f'{v:.2f}' for v in load)}")
    print(f"deployment venv: {sizes['deployed']:.0f} MB (goal < 600), built in {install_s:.1f} s "
          f"(venv + pip install -r env/python/requirements.txt); development venv: {sizes['development']:.0f} MB")
    print(f"{args.rounds} rounds; in each, {args.requests} predicts per side sequential (1 client) and as many "
          f"concurrent ({args.clients} clients), in blocks of {args.block} alternating between the sides; "
          f"{len(payloads)} MTD test tiles")
    print(f"{'side':12} {'first answer s':>15} {'arbiter MB':>11} {'worker MB':>10} {'seq req/s':>10} "
          f"{'conc req/s':>11}")
    for name, rows in results.items():
        for row in rows:
            workers = ", ".join(f"{m:.0f}" for m in row["workers"])
            print(f"{name:12} {row['first_s']:15.2f} {row['arbiter']:11.0f} {workers:>10} "
                  f"{row['sequential']:10.2f} {row['concurrent']:11.2f}")
    for key, label in (("first_s", "first answer s (lower wins)"), ("sequential", "sequential req/s"),
                       ("concurrent", "concurrent req/s")):
        deployed = [float(r[key]) for r in results["deployed"]]
        development = [float(r[key]) for r in results["development"]]
        ratios = [a / b for a, b in zip(deployed, development, strict=True)]  # the two runs of one round
        print(f"{label:28} median deployed {statistics.median(deployed):7.2f}  development "
              f"{statistics.median(development):7.2f}  deployed/development per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.3f}")
    print(f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
