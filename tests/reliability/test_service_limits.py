"""What one client may cost the others (issue 29, findings 3, 4 and 10), against a real
`bentoml serve` on 127.0.0.1: a huge heatmap, a request past its deadline, uploads that
trickle a byte at a time, and a full audit disk. Figures go to runs/reliability/."""

from __future__ import annotations

import base64
import contextlib
import select
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.service_support import Server, png, running
from tests.reliability.test_service_faults import record, rows_of

RECEIVE_S = 6.0  # the body deadline of the shared server: short, so the slow uploads end soon


@pytest.fixture(scope="module")
def limited(project, tmp_path_factory):
    """One server with the default request limits, a short body deadline and an audit
    database that may be filled (TRACEBANK_AUDIT_MAX_MB)."""
    db = tmp_path_factory.mktemp("limits") / "audit.sqlite"
    with running(project["root"], TRACEBANK_AUDIT_DB=str(db), TRACEBANK_AUDIT_MAX_MB="0.25",
                 TRACEBANK_RECEIVE_TIMEOUT_S=str(RECEIVE_S)) as server:
        yield server, db


def normal_clients(server: Server, paths: list[str], clients: int = 5, each: int = 2) -> list[tuple[int, float, str]]:
    """``clients`` threads posting ``each`` real tiles: (status, seconds, request id or error) per request."""

    def client(k: int) -> list[tuple[int, float, str]]:
        answers = []
        with httpx.Client(timeout=120) as http:
            for i in range(each):
                started = time.perf_counter()
                response = server.predict(http, paths[(k + i) % len(paths)], f"normal-{k}-{i}")
                body = response.json()
                answers.append((response.status_code, time.perf_counter() - started,
                                body.get("request_id") or body.get("error", "")))
        return answers

    with ThreadPoolExecutor(clients) as pool:
        return [answer for answers in pool.map(client, range(clients)) for answer in answers]


def test_a_6000_px_heatmap_is_refused_naming_its_budget_and_normal_clients_are_answered(limited, project):
    """35 KB of zeros that decode to 6000 x 6000 px: the heatmap used to take 16 s and 4 GB
    while everyone else waited."""
    server, db = limited
    bomb = png(np.zeros((6000, 6000), np.uint8))
    before = {r["request_id"] for r in rows_of(db)} if db.exists() else set()
    baseline = normal_clients(server, project["good"])
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=120) as http:
        heatmap = pool.submit(http.post, f"{server.url}/predict", files={"image": ("zeros.png", bomb, "image/png")},
                              data={"part_id": "heatmap-6000", "output": "heatmap"})
        attacked = normal_clients(server, project["good"])
        refused = heatmap.result()
    rows = [r for r in rows_of(db) if r["request_id"] not in before]
    record("heatmap_budget", {"image_bytes": len(bomb), "heatmap_status": refused.status_code,
                              "normal_s_alone": [round(s, 3) for _, s, _ in baseline],
                              "normal_s_with_heatmap": [round(s, 3) for _, s, _ in attacked]})
    assert refused.status_code == 422, refused.text[:300]
    assert refused.json()["field"] == "output"
    assert "4,194,304 pixels" in refused.json()["error"] and "6000 x 6000" in refused.json()["error"]
    assert {status for status, _, _ in baseline + attacked} == {200}
    assert sorted(r["request_id"] for r in rows) == sorted(rid for _, _, rid in baseline + attacked)


def test_a_request_past_its_deadline_gets_503_and_leaves_no_row(project, tmp_path):
    """A heatmap (budget raised) that takes longer than TRACEBANK_REQUEST_TIMEOUT_S, with
    three normal clients and a batch queued behind it: whoever is not answered in time gets
    503 and no row, whoever is answered has one (the 504 whose decision was recorded, finding 3)."""
    db = tmp_path / "deadline.sqlite"
    heavy = png(np.zeros((4000, 4000), np.uint8))
    with running(project["root"], TRACEBANK_AUDIT_DB=str(db), TRACEBANK_REQUEST_TIMEOUT_S="1",
                 TRACEBANK_MAX_MAP_PIXELS="40000000") as server, ThreadPoolExecutor(2) as pool, \
            httpx.Client(timeout=120) as http:
        started = time.perf_counter()
        heatmap = pool.submit(http.post, f"{server.url}/predict", files={"image": ("zeros.png", heavy, "image/png")},
                              data={"part_id": "heatmap-4000", "output": "heatmap"})
        time.sleep(0.2)
        tile = base64.b64encode(Path(project["good"][1]).read_bytes()).decode()
        batch = pool.submit(http.post, f"{server.url}/predict_batch",
                            json={"items": [{"image_b64": tile, "part_id": "queued-batch"}]})
        queued = normal_clients(server, project["good"], clients=3, each=1)
        late = heatmap.result()
        batched = batch.result()
        late_s = time.perf_counter() - started
        deadline = time.monotonic() + 90
        while True:  # the abandoned heatmap finishes in the background, then requests are answered again
            after = server.predict(http, project["good"][0], "after-deadline")
            if after.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
    rows = rows_of(db)
    record("request_deadline", {"heatmap_status": late.status_code, "heatmap_answer_s": round(late_s, 3),
                                "queued": [(status, round(s, 3)) for status, s, _ in queued],
                                "queued_batch_status": batched.status_code})
    assert late.status_code == 503 and "not recorded" in late.json()["error"], late.text[:300]
    assert {status for status, _, _ in queued} | {batched.status_code} <= {200, 503}
    assert after.status_code == 200
    answered = [rid for status, _, rid in queued if status == 200] + [after.json()["request_id"]]
    answered += [batched.json()[0]["request_id"]] if batched.status_code == 200 else []
    assert sorted(r["request_id"] for r in rows) == sorted(answered)
    assert "heatmap-4000" not in {r["part_id"] for r in rows}


SLOW = 100  # issue 29's count: more trickling uploads than the 64 concurrency slots


def _slow_upload(url: str) -> socket.socket:
    """A POST /predict that declares 100 kB and sends its first byte."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 "Content-Length: 100000\r\n\r\n-".encode())
    return sock


def test_a_hundred_slow_uploads_do_not_lock_out_a_normal_client(limited, project):
    """More trickling uploads than there are concurrency slots (64) used to answer every
    other client 429 for as long as they stayed open; they now take no slot while their
    body arrives and are cut off with 408 after TRACEBANK_RECEIVE_TIMEOUT_S."""
    server, _ = limited
    alone = []
    with httpx.Client(timeout=120) as http:
        for i, path in enumerate(project["good"][:3]):
            start = time.perf_counter()
            assert server.predict(http, path, f"alone-{i}").status_code == 200
            alone.append(round(time.perf_counter() - start, 3))
    slow = [_slow_upload(server.url) for _ in range(SLOW)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(b"-")

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        trickler.start()
        time.sleep(1.5)  # every slow upload accepted and waiting for its body
        with httpx.Client(timeout=120) as http:
            answered, seconds = [], []
            for i, path in enumerate(project["good"][:3]):
                start = time.perf_counter()
                answered.append(server.predict(http, path, f"beside-slow-{i}"))
                seconds.append(round(time.perf_counter() - start, 3))
        still_open = not select.select(slow, [], [], 0)[0]  # no slow upload answered yet
        firsts: list[bytes] = []
        for sock in slow:
            sock.settimeout(RECEIVE_S + 30)
            with contextlib.suppress(OSError):
                firsts.append(sock.recv(64))
    finally:
        stop.set()
        for sock in slow:
            sock.close()
    record("slow_uploads", {"slow": SLOW, "alone_answer_s": alone, "normal_status": [a.status_code for a in answered],
                            "normal_answer_s": seconds, "slow_first_lines": sorted({f[:12].decode() for f in firsts})})
    assert [a.status_code for a in answered] == [200, 200, 200], [a.text for a in answered]
    assert still_open
    assert len(firsts) == SLOW and all(f.startswith(b"HTTP/1.1 408") for f in firsts), set(f[:12] for f in firsts)


def test_readyz_is_false_while_the_audit_disk_is_full_and_true_once_it_is_freed(limited, project):
    """A full audit database still answers reads: /readyz said 200 while every request got 503."""
    server, db = limited
    with httpx.Client(timeout=120) as http:
        assert server.predict(http, project["good"][0], "before-full").status_code == 200
        filler = sqlite3.connect(db, isolation_level=None, timeout=10)
        filler.execute(f"PRAGMA max_page_count={int(0.25 * 1024 * 1024 // 4096)}")
        filler.execute("CREATE TABLE filler (blob BLOB)")
        with contextlib.suppress(sqlite3.OperationalError):  # "database or disk is full"
            while True:
                filler.execute("INSERT INTO filler VALUES (zeroblob(2048))")
        statuses: list[int] = []
        while len(statuses) < 80 and 503 not in statuses:  # until the audit table's last page is full
            statuses.append(server.predict(http, project["good"][0], f"full-{len(statuses)}").status_code)
        full = [http.get(f"{server.url}/readyz").status_code for _ in range(3)]
        filler.execute("DROP TABLE filler")  # frees its pages for the audit rows
        filler.close()
        freed = http.get(f"{server.url}/readyz").status_code
        after = server.predict(http, project["good"][0], "after-full")
    assert statuses[-1] == 503, statuses
    assert full == [503, 503, 503]
    assert freed == 200 and after.status_code == 200
    parts = {r["part_id"] for r in rows_of(db)}
    assert {"before-full", "after-full"} <= parts and f"full-{len(statuses) - 1}" not in parts
    assert not any(p and p.startswith("p" * 8) for p in parts)  # the readiness probe leaves no row
