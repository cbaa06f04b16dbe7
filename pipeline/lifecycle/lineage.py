"""A bank's record joined to what followed it: its status and its timeline, now or as they
were at a time (how ``tracebank audit`` shows a decision with its bank as it was then).

:class:`~pipeline.lifecycle.registry.Registry` answers ``status`` and ``lineage`` with these;
they read the registry and never write it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from .integrity import REPAIR
from .ledger import to_time

if TYPE_CHECKING:
    from .registry import Registry


def status_of(registry: Registry, bank: str, at: str | dt.datetime | None = None) -> str:
    """``production``, ``rolled back``, ``retired`` (was production), ``candidate`` or
    ``rejected`` (its latest gate results), now or as it was at time ``at``."""
    bank_id = registry.resolve(bank)
    pointer = registry.from_log(at)
    if pointer is not None:
        if pointer["bank_id"] == bank_id:
            return "production"
        if bank_id in pointer["rolled_back"]:
            return "rolled back"
        moves = [e for e in registry.history(bank_id) if at is None or to_time(e["time"]) <= to_time(at)]
        if any(e["to"] == bank_id for e in moves):
            return "retired"  # was production, replaced by a later promotion
    record = registry.record(bank_id)
    gates = record.get("gates") or {}
    for event in registry.events(bank_id):
        if event.get("event") == "evaluated" and (at is None or to_time(event["time"]) <= to_time(at)):
            gates = event.get("gates") or gates
    if not gates:
        return str(record.get("status", "candidate"))
    return "candidate" if gates.get("passed") else "rejected"

def lineage_of(registry: Registry, bank: str, at: str | dt.datetime | None = None) -> dict[str, Any]:
    """The bank's record as registered, with what followed: its ``status`` (now, or at
    time ``at``), ``model_tag``, promotion time and user while it is production,
    ``evaluations`` (later evaluations of the same bank) and ``history`` (every event
    and promotion-log entry of the bank, oldest first)."""
    bank_id = registry.resolve(bank)
    record = registry.record(bank_id)
    events = registry.events(bank_id)
    if at is not None:
        events = [e for e in events if to_time(e["time"]) <= to_time(at)]
    record.setdefault("status_at_registration", record.get("status"))
    record["status"] = status_of(registry, bank_id, at)
    pointer = registry.from_log(at)
    if pointer is not None and pointer["bank_id"] == bank_id:
        record["promoted_at"], record["promoted_by"] = pointer["promoted_at"], pointer["promoted_by"]
    for event in events:
        if event.get("event") == "packaged":
            record["model_tag"] = event["model_tag"]  # the latest packaging wins
    record["evaluations"] = [e for e in events if e.get("event") == "evaluated"]
    moves = [e for e in registry.history(bank_id) if at is None or to_time(e["time"]) <= to_time(at)]
    registered = record.get("status_at_registration") or record.get("status")
    timeline = [{"time": record.get("created_at"), "event": "registered", "status": registered}]
    timeline += [{"time": e["time"], "event": e["event"]} | {k: e[k] for k in ("gates_passed", "data_hash",
                 "model_tag") if k in e} for e in events]
    for entry in moves:
        if entry.get("reason") == REPAIR:
            kind = "pointer repaired"
        elif entry["to"] == bank_id:
            kind = "returned by rollback" if entry.get("reason") == "rollback" else "promoted"
        else:
            kind = "rolled back" if entry.get("reason") == "rollback" else "retired"
        timeline.append({"time": entry["time"], "event": kind, "by": entry.get("user"),
                         "reason": entry.get("reason"), "from": entry.get("from"), "to": entry.get("to")})
    record["history"] = sorted(timeline, key=lambda e: to_time(e["time"] or "1970-01-01T00:00:00+00:00"))
    return record
