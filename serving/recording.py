"""When a decision is recorded: only for a request answered in time, and only while it can be.

An answered request is a recorded request, and the converse must hold too: a client that
was refused (503) or given up on must leave no row. A request carries a :class:`Ticket`
to its deadline; the worker that scores it :meth:`~Ticket.claim` s the ticket just before
writing the decisions, the handler that waits for the worker :meth:`~Ticket.expire` s it at
the deadline, and whichever comes first wins. Until the claim the decisions are only
:class:`Held`. :func:`probe_write` tells readiness whether a decision could be written now.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from pipeline.lifecycle.audit import AuditError, AuditLog, Decision, decisions
from pipeline.lifecycle.inspection import MAX_PART_ID


class Late(Exception):
    """The request's deadline passed before its decisions were recorded; none was."""


class Ticket:
    """One request's right to be answered, until ``deadline`` (``time.perf_counter()``)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._state = "pending"  # -> "claimed" (recording) or "expired" (refused), once

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())

    def check(self) -> None:
        """Raise :class:`Late` when the request has expired: its work is not worth starting."""
        with self._lock:
            if self._state == "pending" and time.perf_counter() >= self.deadline:
                self._state = "expired"
            if self._state == "expired":
                raise Late

    def claim(self) -> None:
        """Take the right to record, before the deadline only; raise :class:`Late` otherwise."""
        with self._lock:
            if self._state == "pending" and time.perf_counter() < self.deadline:
                self._state = "claimed"
                return
            self._state = "expired"
        raise Late

    def expire(self) -> bool:
        """Refuse the request, unless its decisions are being recorded; whether it was refused."""
        with self._lock:
            if self._state == "pending":
                self._state = "expired"
            return self._state == "expired"


class Held:
    """Stands in for the audit log in :func:`pipeline.lifecycle.inspection.decide`: it keeps
    the decisions, to be written in one transaction once the ticket is claimed."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def record_many(self, batch: Sequence[Decision]) -> None:
        self.decisions.extend(batch)


def probe_write(audit: AuditLog) -> None:
    """Write a decision as large as any real one and delete it, in one committed transaction.

    Raises:
        AuditError: the write failed (disk or database full, locked past the lock timeout).

    Note:
        A read (:meth:`AuditLog.check`) succeeds on a full disk, and a rolled-back insert
        never reaches the disk; this commit needs the pages and the write-ahead log space a
        real decision needs. Inserted and deleted in the same transaction, the probe row is
        never seen by a reader, nor left behind by a killed process.
    """
    request_id = f"readiness-probe-{uuid.uuid4().hex}"
    now = dt.datetime.now(dt.UTC)
    row = {"request_id": request_id, "time": now.replace(tzinfo=None) if audit.is_sqlite else now,
           "part_id": "p" * MAX_PART_ID, "input_sha256": "0" * 64, "width": 0, "height": 0, "score": 0.0,
           "decision": "anomalous", "threshold": 0.0, "bank_id": "0" * 64, "latency_ms": 0.0}
    try:
        with audit.engine.begin() as conn:
            conn.execute(decisions.insert(), [row])
            conn.execute(decisions.delete().where(decisions.c.request_id == request_id))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise AuditError(f"audit database {audit.location()}: {reason}") from exc
