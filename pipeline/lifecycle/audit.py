"""The audit trail: one row per inspection decision, in a SQL database.

SQLite (one file, WAL mode) by default; PostgreSQL by URL (``postgresql+psycopg://user:
password@host:5432/database``, with the ``postgres`` extra: ``pip install
'tracebank[postgres]'``), or any other SQLAlchemy URL. A row is committed before the service
answers, so an answered request is a recorded request; when the row cannot be written the
caller gets :class:`AuditError` and must refuse the request (the service answers 503) rather
than answer unrecorded.

Note:
    SQLite runs with ``journal_mode=WAL`` and ``synchronous=NORMAL``: a committed row
    survives a killed process (the WAL is replayed on next open), readers never block the
    writer, and a commit costs one ``write`` rather than an ``fsync`` per row. The busy
    timeout bounds how long a writer waits for a lock, well under the request timeout; on
    PostgreSQL the same bound is the session's ``lock_timeout`` and the connection timeout.

    The table is created on first use, not when the log is opened: a service started while
    its database is down starts, is not ready and answers 503, and records again once the
    database is back. Every error message names the database with its password masked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

#: How long a write waits for a database lock before the request is refused (seconds).
DEFAULT_LOCK_TIMEOUT_S = 5.0

#: The Python driver each database needs, and the extra of tracebank's that installs it.
DRIVER_EXTRAS = {"psycopg": "postgres"}
#: PostgreSQL URLs without a driver (SQLAlchemy's default for them is psycopg2, which
#: tracebank does not install) are taken as psycopg 3's.
_POSTGRES_NAMES = ("postgres", "postgresql")
#: The advisory lock under which PostgreSQL clients create the table one at a time.
_SCHEMA_LOCK = zlib.crc32(b"tracebank.audit.decisions")

metadata = sa.MetaData()
decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("part_id", sa.String(256), nullable=True, index=True),
    sa.Column("input_sha256", sa.String(64), nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("bank_id", sa.String(64), nullable=False, index=True),
    sa.Column("latency_ms", sa.Float, nullable=False),
)


class AuditError(RuntimeError):
    """The decision could not be recorded (database locked, disk full, unreachable)."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """One inspection decision as stored.

    Attributes:
        request_id: unique id the service returned to the client.
        time: UTC time the decision was made.
        part_id: the client's part identifier, if given.
        input_sha256: hash of the uploaded bytes, to match an image to its decision.
        width, height: decoded image size in pixels.
        score: image anomaly score.
        decision: ``"anomalous"`` or ``"good"``.
        threshold: the bank's threshold the score was compared with.
        bank_id: the bank that decided.
        latency_ms: server-side time from receipt to decision.
    """

    request_id: str
    time: dt.datetime
    part_id: str | None
    input_sha256: str
    width: int
    height: int
    score: float
    decision: str
    threshold: float
    bank_id: str
    latency_ms: float

    def as_json(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["time"] = self.time.astimezone(dt.UTC).isoformat()
        return row


def database_url(value: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a plain file path (taken as SQLite)."""
    text = str(value)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


class AuditLog:
    """Records and queries decisions.

    Args:
        url: SQLAlchemy URL or a path to a SQLite file (created with its folder). A
            ``postgresql://`` URL without a driver is taken as ``postgresql+psycopg://``.
        lock_timeout_s: longest wait for a lock before :class:`AuditError` (on PostgreSQL
            also the longest wait for a connection).
        max_mb: SQLite only: the largest the database file may grow (``PRAGMA
            max_page_count``); past it a write fails as on a full disk ("database or disk
            is full") and the caller answers 503. None: limited by the disk alone.

    Raises:
        AuditError: the URL cannot be parsed, names an unknown database, or its driver is
            not installed (naming the driver and the extra that installs it). A database
            that does not answer is no error here: every later call raises until it does.
    """

    def __init__(self, url: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
                 max_mb: float | None = None) -> None:
        parsed = _parse(database_url(url))
        if parsed.drivername in _POSTGRES_NAMES:
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.url = parsed.render_as_string(hide_password=False)
        backend, _, driver = parsed.drivername.partition("+")
        self.is_sqlite = backend == "sqlite"
        self._location = parsed.render_as_string(hide_password=True)
        self._password = parsed.password
        connect_args: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            connect_args = {"timeout": lock_timeout_s, "check_same_thread": False}
        elif parsed.drivername == "postgresql+psycopg":
            # libpq counts whole seconds and takes 1 as 2; lock_timeout is in milliseconds
            connect_args = {"connect_timeout": max(2, round(lock_timeout_s)),
                            "options": f"-c lock_timeout={max(1, round(lock_timeout_s * 1000))}"}
        try:
            self._engine = sa.create_engine(self.url, connect_args=connect_args, pool_pre_ping=not self.is_sqlite)
        except ImportError as exc:  # the dialect imports its driver here
            raise AuditError(_missing_driver(self._location, driver, exc)) from exc
        except ArgumentError as exc:  # NoSuchModuleError: no such dialect
            raise AuditError(f"audit database {self._location}: {exc}; the forms are a SQLite path, "
                             "sqlite:///PATH and postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") from exc
        if self.is_sqlite:
            sa.event.listen(self._engine, "connect", _sqlite_pragmas)
            if max_mb is not None:
                max_pages = max(2, int(max_mb * 1024 * 1024 // SQLITE_PAGE_SIZE))

                def _limit(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
                    dbapi_conn.execute(f"PRAGMA max_page_count={max_pages}")

                sa.event.listen(self._engine, "connect", _limit)
        self._schema_lock = threading.Lock()
        self._has_schema = False
        try:
            self._create_schema()
        except AuditError:
            pass  # not reachable now: the first call that needs it tries again, and says why

    def location(self) -> str:
        """The database's URL with its password masked, as every message names it."""
        return self._location

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine, its ``decisions`` table created if it was not yet.

        Raises:
            AuditError: the table could not be created (the database does not answer).
        """
        self._create_schema()
        return self._engine

    def error(self, exc: Exception) -> AuditError:
        """The :class:`AuditError` for ``exc``: the database's masked URL and the first line
        of the driver's reason, any password in it masked too."""
        original = getattr(exc, "orig", None)
        reason = str(original or exc).splitlines()[0] if str(original or exc) else type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        return AuditError(f"audit database {self._location}: {reason}")

    def _create_schema(self) -> None:
        if self._has_schema:
            return
        with self._schema_lock:
            if self._has_schema:
                return
            try:
                with self._engine.begin() as conn:
                    if self._engine.dialect.name == "postgresql":
                        # two workers starting together would both see no table and both create it
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
                    metadata.create_all(conn)
            except SQLAlchemyError as exc:
                raise self.error(exc) from exc
            self._has_schema = True

    def record(self, decision: Decision) -> None:
        """Commit one row; raises :class:`AuditError` if it is not stored."""
        self.record_many([decision])

    def record_many(self, batch: Sequence[Decision]) -> None:
        """Commit rows in one transaction: all are stored, or none and :class:`AuditError`."""
        if not batch:
            return
        rows = []
        for decision in batch:
            values = dataclasses.asdict(decision)
            values["time"] = self._db_time(decision.time)
            rows.append(values)
        try:
            with self.engine.begin() as conn:
                conn.execute(decisions.insert(), rows)
        except SQLAlchemyError as exc:
            raise self.error(exc) from exc

    def check(self) -> None:
        """Raise :class:`AuditError` unless the database answers (for readiness probes)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.select(sa.func.count()).select_from(decisions).limit(1))
        except SQLAlchemyError as exc:
            raise self.error(exc) from exc

    def query(
        self,
        *,
        part_id: str | None = None,
        bank_id: str | None = None,
        since: dt.datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[Decision]:
        """Decisions matching every filter given, oldest first.

        Raises:
            AuditError: the database does not answer.
        """
        stmt = sa.select(decisions).order_by(decisions.c.time, decisions.c.request_id)
        if part_id is not None:
            stmt = stmt.where(decisions.c.part_id == part_id)
        if bank_id is not None:
            stmt = stmt.where(decisions.c.bank_id.startswith(bank_id, autoescape=True))
        if since is not None:
            stmt = stmt.where(decisions.c.time >= self._db_time(since))
        if limit is not None:
            stmt = stmt.limit(limit)
        try:
            with self.engine.connect() as conn:
                for row in conn.execute(stmt).mappings():
                    values = dict(row)
                    values["time"] = _utc(values["time"])
                    yield Decision(**values)
        except SQLAlchemyError as exc:
            raise self.error(exc) from exc

    def _db_time(self, value: dt.datetime) -> dt.datetime:
        """SQLite stores datetimes as text without an offset: store naive UTC there."""
        value = _utc(value)
        return value.replace(tzinfo=None) if self.is_sqlite else value

    def count(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one())
        except SQLAlchemyError as exc:
            raise self.error(exc) from exc

    def dispose(self) -> None:
        self._engine.dispose()


def _parse(url: str) -> sa.URL:
    try:
        return sa.engine.make_url(url)
    except (ArgumentError, ValueError) as exc:  # the text may hold a password: never repeat it
        raise AuditError("the audit database URL cannot be parsed; the forms are a SQLite path, sqlite:///PATH "
                         "and postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") from exc


def _missing_driver(location: str, driver: str, exc: ImportError) -> str:
    """What to install for a URL whose driver does not import (``exc.name`` is the module
    missing; psycopg without its binary part and without a system libpq raises with none)."""
    module = (exc.name or driver).split(".")[0]
    extra = DRIVER_EXTRAS.get(module) or DRIVER_EXTRAS.get(driver)
    install = f"pip install 'tracebank[{extra}]' (the '{extra}' extra)" if extra else f"pip install {module}"
    return (f"audit database {location} needs the Python driver '{module}', which cannot be imported "
            f"({str(exc).splitlines()[0] if str(exc) else 'not installed'}): {install}")


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


#: SQLite's default page size, which the audit database keeps.
SQLITE_PAGE_SIZE = 4096


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


#: Columns of a decision in ``tracebank audit`` output, then ``bank_`` + each lineage field.
AUDIT_FIELDS = ("time", "request_id", "part_id", "bank_id", "score", "decision", "threshold",
                "input_sha256", "width", "height", "latency_ms")
#: ``status`` is the bank's status when the decision was made, ``status_now`` its status today.
LINEAGE_FIELDS = ("status", "status_now", "data_hash", "data_spec", "git_commit", "created_at", "promoted_at",
                  "model_tag")


def decisions_with_lineage(
    db: str, registry_root: str | Path, *, part_id: str | None = None, bank_id: str | None = None,
    since: dt.datetime | None = None, limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Decisions matching the filters, oldest first, each with its bank's lineage.

    Args:
        db: SQLite path or SQLAlchemy URL of the audit database.
        registry_root: the bank registry whose lineage records are joined.

    Yields:
        :meth:`Decision.as_json` plus ``"lineage"``: :data:`LINEAGE_FIELDS` and the metrics
        of the bank that decided (``{"status": "not in registry ..."}`` for an unknown bank).

    Raises:
        FileNotFoundError: if ``db`` is a path that does not exist.
    """
    from .registry import Registry, RegistryError

    local = db if "://" not in db else (sa.engine.make_url(db).database if db.startswith("sqlite") else None)
    if local is not None and (local in ("", ":memory:") or not Path(local).is_file()):  # reading creates none
        raise FileNotFoundError(f"audit database {db} does not exist; pass --db (the service's TRACEBANK_AUDIT_DB)")
    import bisect

    from .ledger import to_time

    registry = Registry(registry_root)
    # the record as it was when the decision was made: the bank's own record never changes,
    # its status and promotion come from the promotion log up to the decision's time
    moves = [to_time(e["time"]) for e in registry.promotions()]
    lineages: dict[tuple[str, int], dict[str, Any]] = {}
    log = AuditLog(db)
    try:
        for decision in log.query(part_id=part_id, bank_id=bank_id, since=since, limit=limit):
            key = (decision.bank_id, bisect.bisect_right(moves, to_time(decision.time)))
            if key not in lineages:
                try:
                    record = registry.lineage(decision.bank_id, at=decision.time)
                    record["status_now"] = registry.status(decision.bank_id)
                    lineages[key] = {k: record.get(k) for k in LINEAGE_FIELDS} | {"metrics": record.get("metrics")}
                except RegistryError:
                    lineages[key] = {"status": f"not in registry {Path(registry_root).name}"}
            yield decision.as_json() | {"lineage": lineages[key]}
    finally:
        log.dispose()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``--since`` as a UTC time: an ISO date or time (UTC unless it has an offset), or an
    age such as ``30m``, ``2h``, ``7d`` (``s``, ``m``, ``h``, ``d``, ``w``) before ``now``.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    value = text.strip()
    if value[:-1].isdigit() and value[-1:].lower() in _UNITS:
        now = now or dt.datetime.now(dt.UTC)
        try:
            return now - dt.timedelta(seconds=int(value[:-1]) * _UNITS[value[-1].lower()])
        except (OverflowError, ValueError):  # before year 1: every decision is younger than that
            return dt.datetime.min.replace(tzinfo=dt.UTC)
    try:
        since = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(
            f"--since {text!r} is neither an ISO date or time (2026-11-25T08:00) nor an age (30m, 2h, 7d)"
        ) from exc
    since = since if since.tzinfo is not None else since.replace(tzinfo=dt.UTC)
    try:
        return since.astimezone(dt.UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first representable UTC time
        return dt.datetime.min.replace(tzinfo=dt.UTC)
