"""The service's audit trail on each database it supports: ``bentoml serve`` with two workers
under load, on a SQLite file and on a real PostgreSQL server (tests/postgres.py), and a
PostgreSQL server that is down when the service starts."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipeline.lifecycle.audit import AuditLog
from tests.integration.service_support import BIN, Server, fit_and_register, run
from tests.postgres import free_port, postgres_server

#: BentoML's own setting of the service's worker processes (the ``@bentoml.service`` default is one).
TWO_WORKERS = json.dumps({"services": {"tracebank": {"workers": 2}}})


@pytest.fixture(scope="module")
def project(tmp_path_factory, mtd_dataset):
    """A registry with one real MTD bank in production, packaged."""
    root = tmp_path_factory.mktemp("service-audit")
    bank = fit_and_register(root, "a", limit=30, seed=0)
    run(root, str(BIN / "tracebank"), "promote", bank, "--registry", str(root / "banks"))
    tiles = [s.path for s in mtd_dataset.test][:6]
    return {"root": root, "bank": bank, "tiles": tiles}


def recorded(url: str) -> list[str]:
    log = AuditLog(url)
    try:
        return sorted(d.request_id for d in log.query())
    finally:
        log.dispose()


def load(server: Server, tiles: list[Path], *, clients: int, seconds: float) -> tuple[Counter[str], list[str]]:
    """``clients`` threads posting tiles for ``seconds``, half to ``/predict``, half one-item
    batches to ``/predict_batch``: the status counts and the request ids answered."""
    stop = time.monotonic() + seconds
    outcomes: Counter[str] = Counter()
    ids: list[str] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with httpx.Client() as client:
            i = 0
            while time.monotonic() < stop:
                path = tiles[(k + i) % len(tiles)]
                if k % 2:
                    response = server.predict(client, path, f"load-{k}-{i}")
                    got = [response.json()] if response.status_code == 200 else []
                else:
                    item = {"image_b64": base64.b64encode(Path(path).read_bytes()).decode(), "part_id": f"load-{k}-{i}"}
                    response = client.post(f"{server.url}/predict_batch", json={"items": [item]}, timeout=120)
                    got = response.json() if response.status_code == 200 else []
                with lock:
                    outcomes[str(response.status_code)] += 1
                    ids.extend(a["request_id"] for a in got)
                i += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return outcomes, ids


def test_two_workers_under_load_record_every_answer_once(project, audit_url):
    server = Server(project["root"], TRACEBANK_AUDIT_DB=audit_url, BENTOML_CONFIG_OVERRIDES=TWO_WORKERS).start()
    try:
        workers = [p for p in server.processes() if "_bentoml_impl.worker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in server.processes()]
        outcomes, ids = load(server, project["tiles"], clients=6, seconds=10)
    finally:
        server.stop()
    assert set(outcomes) == {"200"}, outcomes
    assert len(ids) == len(set(ids)) and len(ids) > 6
    assert recorded(audit_url) == sorted(ids)  # every answer has its row, and no row lacks an answer


def _start_unready(server: Server, timeout: float = 240.0) -> None:
    """``bentoml serve`` as :meth:`Server.start` runs it, waiting for ``/healthz`` only (a
    service whose audit database is down is alive but not ready)."""
    log = open(server.log_path, "wb")  # noqa: SIM115 - closed with the process
    server.proc = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", "--host", "127.0.0.1", "--port", str(server.port)],
        cwd=server.cwd, env=server.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"bentoml serve exited:\n{server.log()[-4000:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(1.0)
    raise AssertionError(f"service not alive after {timeout} s:\n{server.log()[-4000:]}")


def test_a_postgresql_server_down_at_start_gives_503_naming_the_host_never_the_password(project):
    """Started while its PostgreSQL server is down, the service answers 503 "not recorded"
    (naming the host, never the password, in the answer and in its log) and is not ready;
    once the server is up, it records and answers."""
    port, password = free_port(), "pw-never-shown-7f3a"
    url = f"postgresql+psycopg://tracebank:{password}@127.0.0.1:{port}/audit"
    server = Server(project["root"], TRACEBANK_AUDIT_DB=url, TRACEBANK_AUDIT_LOCK_S="2")
    try:
        _start_unready(server)
        with httpx.Client() as client:
            refused = server.predict(client, project["tiles"][0], "while-down")
            ready = client.get(f"{server.url}/readyz", timeout=30)
            assert refused.status_code == 503, refused.text
            body = refused.json()["error"]
            assert "not recorded" in body and f'"127.0.0.1", port {port} failed' in body, body
            assert ready.status_code == 503
            with postgres_server(port=port, password=password) as postgres:
                with postgres.admin() as conn:
                    conn.execute('CREATE DATABASE audit OWNER tracebank')
                answered = server.predict(client, project["tiles"][1], "once-up")
                assert answered.status_code == 200, answered.text
                assert client.get(f"{server.url}/readyz", timeout=30).status_code == 200
                assert recorded(url) == [answered.json()["request_id"]]  # nothing of the refused request
        log = server.log()
    finally:
        server.stop()
    assert password not in log and password not in refused.text
    assert f"tracebank:***@127.0.0.1:{port}/audit" in log  # the log names the database, password masked
    assert f'"127.0.0.1", port {port} failed' in log
