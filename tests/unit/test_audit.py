"""The audit log on each database it supports: a SQLite file and a real PostgreSQL server
(tests/postgres.py), every test on both through the ``audit_url`` fixture."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.lifecycle.audit import AuditError, AuditLog, Decision
from tests.conftest import REPO
from tests.postgres import free_port

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)


def decision(request_id: str, minutes: float = 0.0, *, part_id: str | None = "part-1", bank_id: str = "a" * 16,
             score: float = 1.5) -> Decision:
    return Decision(request_id, T0 + dt.timedelta(minutes=minutes), part_id, "0" * 64, 640, 480, score,
                    "anomalous" if score >= 1.0 else "good", 1.0, bank_id, 12.5)


@pytest.fixture
def log(audit_url):
    opened = AuditLog(audit_url, lock_timeout_s=1.0)
    yield opened
    opened.dispose()


def test_decisions_come_back_oldest_first_with_every_time_in_utc(log):
    local = dt.timezone(dt.timedelta(hours=2))
    r2 = Decision("r2", dt.datetime(2026, 12, 1, 10, 30, tzinfo=local), None, "f" * 64, 1, 2, 0.25, "good", 1.0,
                  "b" * 64, 0.5)
    r1 = decision("r1", 1)
    log.record_many([r2, r1])
    got = list(log.query())
    assert got == [r1, r2]  # 08:01 UTC, then 10:30+02:00 = 08:30 UTC
    assert all(d.time.tzinfo == dt.UTC for d in got)
    assert got[1].time == dt.datetime(2026, 12, 1, 8, 30, tzinfo=dt.UTC)
    assert log.count() == 2


def test_a_batch_is_stored_whole_or_not_at_all(log):
    log.record(decision("r1"))
    with pytest.raises(AuditError, match="audit database"):
        log.record_many([decision("r2", 1), decision("r1", 2)])  # r1 again: the whole batch refused
    assert [d.request_id for d in log.query()] == ["r1"]
    log.record_many([decision("r2", 1), decision("r3", 2)])
    assert log.count() == 3


def test_filters_by_part_bank_prefix_time_and_limit(log):
    log.record_many([
        decision("r1", 0, part_id="p-7", bank_id="ab_c" + "0" * 12),
        decision("r2", 1, part_id="p-8", bank_id="abxc" + "0" * 12),  # '_' must not match 'x'
        decision("r3", 2, part_id="p-7", bank_id="ab%d" + "0" * 12),
        decision("r4", 3, part_id=None, bank_id="ab_c" + "1" * 12),
    ])

    def ids(**filters):
        return [d.request_id for d in log.query(**filters)]

    assert ids(part_id="p-7") == ["r1", "r3"]
    assert ids(bank_id="ab_c") == ["r1", "r4"]
    assert ids(bank_id="ab%") == ["r3"]
    assert ids(since=T0 + dt.timedelta(minutes=1)) == ["r2", "r3", "r4"]
    assert ids(since=(T0 + dt.timedelta(minutes=2)).astimezone(dt.timezone(dt.timedelta(hours=-5)))) == ["r3", "r4"]
    assert ids(limit=2) == ["r1", "r2"]


WRITER = """
import sys, time
from pathlib import Path
from pipeline.lifecycle.audit import AuditLog
from tests.unit.test_audit import decision
url, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
log = AuditLog(url, lock_timeout_s=5.0)
print("open", flush=True)
while not go.exists():
    time.sleep(0.002)
for i in range(n):
    log.record(decision(f"{name}-{i}", i))
"""


def start_writers(url: str, count: int, rows: int, go: Path) -> list[subprocess.Popen[str]]:
    """``count`` processes, each opening the audit log, then, once the file ``go`` exists,
    recording ``rows`` decisions one transaction each; returned once every one has opened its log."""
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, f"w{k}", str(rows), str(go)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(count)]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline() == "open\n", writer.communicate()[1][-2000:]
    return writers


def finish(writers: list[subprocess.Popen[str]]) -> None:
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0] * len(writers), [e.strip().splitlines()[-1:] for e in errors]


def recorded(url: str) -> list[str]:
    log = AuditLog(url)
    try:
        return sorted(d.request_id for d in log.query())
    finally:
        log.dispose()


def test_four_processes_writing_at_once_lose_no_row(audit_url, tmp_path):
    writers = start_writers(audit_url, 4, 40, tmp_path / "go")
    (tmp_path / "go").touch()
    finish(writers)
    assert recorded(audit_url) == sorted(f"w{k}-{i}" for k in range(4) for i in range(40))


def test_four_processes_started_before_their_database_existed_all_record_once_it_does(postgres, tmp_path):
    """Four service workers started while the database was missing: all four create the table
    at their first write, at once (without the advisory lock, all but one fail)."""
    name = f"t_late_{time.time_ns()}"
    writers = start_writers(postgres.url(name), 4, 5, tmp_path / "go")
    with postgres.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER tracebank')
    try:
        (tmp_path / "go").touch()
        finish(writers)
        assert recorded(postgres.url(name)) == sorted(f"w{k}-{i}" for k in range(4) for i in range(5))
    finally:
        postgres.drop_database(name)


def test_a_locked_database_is_refused_within_the_lock_timeout_then_written(audit_url, log):
    log.record(decision("r1"))
    if log.is_sqlite:
        holder = sqlite3.connect(sa.engine.make_url(audit_url).database, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    else:
        import psycopg

        url = sa.engine.make_url(audit_url)
        holder = psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                 dbname=url.database)
        holder.execute("LOCK TABLE decisions IN ACCESS EXCLUSIVE MODE")
    timer = threading.Timer(6.0, holder.rollback)  # released in any case: a writer that waits gets through
    timer.start()
    try:
        began = time.monotonic()
        with pytest.raises(AuditError, match="lock"):
            log.record(decision("r2", 1))
        assert time.monotonic() - began < 4.0  # lock_timeout_s=1, not a wait until the lock is released
    finally:
        timer.cancel()
        holder.rollback()
        holder.close()
    log.record(decision("r3", 2))
    assert [d.request_id for d in log.query()] == ["r1", "r3"]


def test_a_missing_driver_is_an_audit_error_naming_it_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where psycopg is not installed
    for url in ("postgresql+psycopg://tracebank:s3cret@db.example:5432/audit", "postgresql://tracebank:s3cret@db.example/audit"):
        with pytest.raises(AuditError) as caught:
            AuditLog(url)
        message = str(caught.value)
        assert "'psycopg'" in message and "pip install 'tracebank[postgres]'" in message, message
        assert "db.example" in message and "s3cret" not in message


@pytest.mark.parametrize("url", ["nosuchdb://tracebank:s3cret@db.example/audit",
                                 "postgresql+psycopg://tracebank:s3cret@db.example:notaport/audit"])
def test_a_url_that_cannot_be_used_is_an_audit_error_without_its_password(url):
    with pytest.raises(AuditError, match="postgresql\\+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") as caught:
        AuditLog(url)
    assert "s3cret" not in str(caught.value)


def test_an_unreachable_server_is_an_audit_error_naming_the_host_never_the_password():
    port = free_port()  # nothing listens there
    log = AuditLog(f"postgresql+psycopg://tracebank:s3cret-pw@127.0.0.1:{port}/audit", lock_timeout_s=1.0)
    assert log.location() == f"postgresql+psycopg://tracebank:***@127.0.0.1:{port}/audit"
    for call in (log.check, lambda: log.record(decision("r1")), log.count, lambda: list(log.query())):
        with pytest.raises(AuditError) as caught:
            call()
        message = str(caught.value)
        assert f'"127.0.0.1", port {port} failed' in message and "s3cret-pw" not in message, message
    log.dispose()


def test_a_wrong_password_is_refused_without_repeating_it(postgres):
    name = postgres.create_database()
    try:
        log = AuditLog(postgres.url(name, password="wrong-pw-123"))
        with pytest.raises(AuditError, match='password authentication failed for user "tracebank"') as caught:
            log.record(decision("r1"))
        assert "wrong-pw-123" not in str(caught.value)
        log.dispose()
    finally:
        postgres.drop_database(name)


def test_a_database_that_comes_up_later_gets_its_table_then(postgres):
    """The service starts while its database is down: refused until it is there, then recorded."""
    name = f"t_late_{time.time_ns()}"
    log = AuditLog(postgres.url(name), lock_timeout_s=1.0)  # no error: the database is not needed yet
    with pytest.raises(AuditError, match=f'database "{name}" does not exist'):
        log.record(decision("r1"))
    with postgres.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER tracebank')
    try:
        log.check()
        log.record(decision("r2"))
        assert [d.request_id for d in log.query()] == ["r2"]
        log.dispose()
    finally:
        postgres.drop_database(name)


def test_a_postgresql_url_without_a_driver_uses_psycopg(postgres_url):
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    log = AuditLog(plain)
    assert log.location().startswith("postgresql+psycopg://tracebank:***@127.0.0.1:")
    log.record(decision("r1"))
    assert log.count() == 1
    log.dispose()
