"""A registry of banks on disk whose records never change after the fact.

Layout of a registry root (``banks/`` by default)::

    banks/<bank_id>/              a bank directory (see :mod:`pipeline.patchcore.bank`) and
    banks/<bank_id>/lineage.json  its record at registration: data, code, params, metrics, gates
    banks/events/<bank_id>.jsonl  what happened to the bank later: evaluations, packaging
    banks/promotions.jsonl        the promotion log: time, user, from, to, reason
    banks/PRODUCTION.json         the production pointer, replayed from the promotion log
    banks/.lock                   held (``flock``) by every writer

A bank directory is complete before it appears: the files and the record are written into
a staging folder that one ``os.replace`` renames into place, and nothing writes into it
afterwards. A rerun that produces a bank already registered appends an evaluation to its
event file instead. The two logs are append-only: a record is added by writing the whole
file anew beside the old one and renaming it over it, so a killed writer leaves the old or
the new log, never a torn line. Writers hold an exclusive ``flock`` on ``.lock`` (released
by the kernel when a writer dies), so two promotions at the same moment are serialised and
both reach the log.

The promotion log is the source of truth; ``PRODUCTION.json`` is rewritten from it after
each promotion for readers that want one small file, and a registry that only has the
pointer (written before the log existed) is read from the pointer. Beside a log, a pointer
that is not the log's replay is refused (:mod:`pipeline.lifecycle.integrity`) until
``promote --force`` rewrites it, a ``repair`` entry of the log that moves no bank.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.patchcore.bank import read_manifest, write_json_atomic

from . import ledger
from .integrity import REPAIR, bank_problem, pointer_problem, read_promotions, replay_moves
from .ledger import Busy, FileLock, LedgerError, append_jsonl, now, read_jsonl, to_time, user_name
from .lineage import lineage_of, status_of

POINTER = "PRODUCTION.json"
LINEAGE = "lineage.json"
LOG = "promotions.jsonl"
EVENTS = "events"
LOCK = ".lock"
RUN_LOCK = ".run.lock"
#: Why a bank became production: its gates passed in a pipeline run, a user promoted it, a
#: rollback returned to it, or a user forced it past its gates.
REASONS = ("gates", "manual", "rollback", "forced")
#: How long a writer waits for another one before it gives up.
LOCK_TIMEOUT_S = 60.0


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why and what to do."""


class NoEarlierBank(RegistryError):
    """A rollback found no earlier production bank that differs from the current one."""


class RegistryBusy(RegistryError):
    """Another process holds the registry (or a training run) and did not let go in time."""


def _read_log(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except LedgerError as exc:
        raise RegistryError(str(exc)) from exc


def _read_promotions(path: Path) -> list[dict[str, Any]]:
    try:
        return read_promotions(path)
    except LedgerError as exc:
        raise RegistryError(str(exc)) from exc


@contextlib.contextmanager
def _hold(path: Path, wait_s: float, what: str, threads_share: bool = False) -> Iterator[None]:
    try:
        with FileLock.of(path).hold(wait_s=wait_s, what=what, threads_share=threads_share):
            yield
    except Busy as exc:
        raise RegistryBusy(str(exc)) from exc


class Registry:
    """Banks under ``root`` with their records, events and the promotion log."""

    def __init__(self, root: str | Path = "banks") -> None:
        self.root = Path(root)

    # -- locks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the registry's writer lock (waits up to ``wait_s`` for another writer)."""
        with _hold(self.root / LOCK, wait_s, f"registry {self.root}"):
            yield

    @contextlib.contextmanager
    def exclusive_run(self, what: str, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the training-run lock for ``what``: a second run that finds one active waits
        ``wait_s`` seconds, then raises :class:`RegistryBusy` saying so. Every thread of this
        process shares the hold (a flow's tasks run on worker threads); nested holds are free."""
        with _hold(self.root / RUN_LOCK, wait_s, f"a training run on {self.root} ({what})", threads_share=True):
            yield

    # -- reading -----------------------------------------------------------------------
    def bank_dir(self, bank: str) -> Path:
        """Directory of ``bank`` (an id, a unique id prefix, or ``"production"``)."""
        return self.root / self.resolve(bank)

    def exists(self, bank_id: str) -> bool:
        return (self.root / bank_id / LINEAGE).is_file()

    def resolve(self, bank: str) -> str:
        if bank == "production":
            pointer = self.production()
            if pointer is None:
                raise RegistryError(f"{self.root}: no bank has been promoted to production yet")
            return str(pointer["bank_id"])
        if bank and "/" not in bank and bank not in (".", "..") and self.exists(bank):
            return bank
        matches = [p.name for p in self._bank_dirs() if p.name.startswith(bank)] if bank else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RegistryError(f"no bank {bank!r} in {self.root}; `tracebank banks` lists them")
        raise RegistryError(f"bank prefix {bank!r} is ambiguous: {', '.join(sorted(matches))}")

    def _bank_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and (p / LINEAGE).is_file())

    def promotions(self) -> list[dict[str, Any]]:
        """The promotion log, oldest first (from ``PRODUCTION.json`` for an older registry)."""
        log = _read_promotions(self.root / LOG)
        return log if log else self._log_from_pointer()

    def _log_from_pointer(self) -> list[dict[str, Any]]:
        """A registry written before the log: its pointer's history as log entries."""
        try:
            return ledger.log_from_pointer(self.root / POINTER, LOG)
        except LedgerError as exc:
            raise RegistryError(str(exc)) from exc

    def production(self, at: str | dt.datetime | None = None) -> dict[str, Any] | None:
        """The production pointer (now, or as it was at time ``at``), or None.

        Raises:
            RegistryError: the log is damaged, or (now) ``PRODUCTION.json`` is damaged or
                disagrees with the log; the message names the file and says what to do.
        """
        if at is None and (problem := self.pointer_problem()) is not None:
            raise RegistryError(problem)
        return self.from_log(at)

    def from_log(self, at: str | dt.datetime | None = None) -> dict[str, Any] | None:
        """The production pointer replayed from the log, whatever ``PRODUCTION.json`` says
        (what a record's status is read from; :meth:`production` checks the pointer too)."""
        log = self.promotions()
        if at is not None:
            when = to_time(at)
            log = [e for e in log if to_time(e["time"]) <= when]
        return replay_moves(log)

    def pointer_problem(self) -> str | None:
        """Why ``PRODUCTION.json`` cannot be trusted beside the promotion log, with what to do,
        or None (see :func:`~pipeline.lifecycle.integrity.pointer_problem`).

        Raises:
            RegistryError: the log itself is damaged (or, without a log, the pointer is).
        """
        log = _read_promotions(self.root / LOG)
        if not log:
            self._log_from_pointer()  # an older registry: the pointer is the record; raises if damaged
            return None
        return pointer_problem(self.root / POINTER, log)

    def record(self, bank: str) -> dict[str, Any]:
        """The bank's record exactly as it was written at registration."""
        bank_id = self.resolve(bank)
        path = self.root / bank_id / LINEAGE
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{path} is not JSON ({exc}): the bank's record is damaged") from exc
        if not isinstance(record, dict):
            raise RegistryError(f"{path} is not a JSON object: the bank's record is damaged")
        return dict(record)

    def events(self, bank: str) -> list[dict[str, Any]]:
        """What happened to the bank after registration (evaluations, packaging), oldest first."""
        return _read_log(self.root / EVENTS / f"{self.resolve(bank)}.jsonl")

    def history(self, bank: str | None = None) -> list[dict[str, Any]]:
        """Promotion-log entries (of ``bank`` only, when given: to or from it), oldest first."""
        log = self.promotions()
        if bank is None:
            return log
        bank_id = self.resolve(bank)
        return [e for e in log if bank_id in (e.get("to"), e.get("from"))]

    def verdict(self, bank: str) -> dict[str, Any]:
        """The latest gate results of ``bank``: from its last evaluation, else its registration."""
        gates = self.record(bank).get("gates") or {}
        for event in self.events(bank):
            if event.get("event") == "evaluated" and event.get("gates") is not None:
                gates = event["gates"]
        return dict(gates)

    def status(self, bank: str, at: str | dt.datetime | None = None) -> str:
        """The bank's status now or at time ``at`` (:func:`~pipeline.lifecycle.lineage.status_of`)."""
        return status_of(self, bank, at)

    def lineage(self, bank: str, at: str | dt.datetime | None = None) -> dict[str, Any]:
        """The bank's record with what followed (:func:`~pipeline.lifecycle.lineage.lineage_of`)."""
        return lineage_of(self, bank, at)

    def list(self, *, verify: bool = False) -> list[dict[str, Any]]:
        """Summary of every bank, newest first; ``verify``: each row's ``problem`` says what is
        wrong with the bank's files (:func:`bank_problem`), None when every sha256 matches."""
        rows = []
        for path in self._bank_dirs():
            rec = self.lineage(path.name)
            rows.append({
                "bank_id": rec["bank_id"],
                "status": rec["status"],
                **({"problem": bank_problem(path)} if verify else {}),
                "created_at": rec.get("created_at"),
                "data_hash": rec.get("data_hash"),
                "image_auroc": (rec.get("metrics") or {}).get("image_auroc"),
                "pro": (rec.get("metrics") or {}).get("pro"),
                "promoted_at": rec.get("promoted_at"),
                "evaluations": len(rec["evaluations"]),
            })
        return sorted(rows, key=lambda r: r["created_at"] or "", reverse=True)

    def find(self, data_hash: str | None, params: Mapping[str, Any]) -> str | None:
        """A registered bank made from data ``data_hash`` with exactly ``params`` (at its
        registration or a later evaluation), or None. The newest such bank wins."""
        if data_hash is None:
            return None
        wanted = json.loads(json.dumps(params))
        found = []
        for path in self._bank_dirs():
            record = self.record(path.name)
            runs = [record, *(e for e in self.events(path.name) if e.get("event") == "evaluated")]
            for run in runs:
                if run.get("data_hash") == data_hash and run.get("params") == wanted:
                    found.append((run.get("time") or record.get("created_at") or "", path.name))
        return max(found)[1] if found else None

    # -- writing -----------------------------------------------------------------------
    def register(self, bank_dir: str | Path, lineage: Mapping[str, Any], *, move: bool = True) -> str:
        """Add a verified bank with its record; returns its id.

        The bank directory and its record are assembled in a staging folder and renamed to
        ``root/<bank_id>`` in one step. A bank already registered is left exactly as it is:
        the run is appended to its events as an evaluation (see :meth:`record_evaluation`).
        """
        manifest = read_manifest(bank_dir)
        bank_id = manifest["bank_id"]
        record = dict(lineage)
        status = record.pop("status", None) or ("candidate" if (record.get("gates") or {}).get("passed") else
                                                "rejected")
        if status not in ("candidate", "rejected"):
            raise RegistryError(f"a new bank is registered as candidate or rejected, not {status!r}")
        with self.locked():
            if self.exists(bank_id):
                self.record_evaluation(bank_id, record)
                if move:
                    shutil.rmtree(bank_dir, ignore_errors=True)
                return bank_id
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{bank_id}.incoming-", dir=self.root))
            try:
                copy = staging / "bank"
                if move:
                    shutil.move(str(bank_dir), copy)
                else:
                    shutil.copytree(bank_dir, copy, symlinks=True)
                record.update({"bank_id": bank_id, "created_at": record.get("created_at") or manifest["created_at"],
                               "status_at_registration": status})
                record.pop("promoted_at", None)
                write_json_atomic(copy / LINEAGE, record)
                os.replace(copy, self.root / bank_id)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return bank_id

    def record_evaluation(self, bank: str, run: Mapping[str, Any]) -> dict[str, Any]:
        """Append a later evaluation of a registered bank (a rerun that produced it again):
        its time, user, data hash, params, metrics and gate results. The bank's own record
        is not touched."""
        keep = ("data_hash", "data_hash_kind", "data_spec", "git_commit", "git_dirty", "params", "metrics",
                "threshold", "operating_point", "gates", "timings", "evaluation_set", "report", "eval_files", "fit",
                "added_files")
        event = {"event": "evaluated", **{k: run[k] for k in keep if k in run},
                 "gates_passed": bool((run.get("gates") or {}).get("passed"))}
        return self._add_event(bank, event)

    def record_packaged(self, bank: str, model_tag: str) -> dict[str, Any]:
        """Record that the bank was stored in a model store under ``model_tag``."""
        return self._add_event(bank, {"event": "packaged", "model_tag": model_tag})

    def _add_event(self, bank: str, event: Mapping[str, Any]) -> dict[str, Any]:
        with self.locked():
            bank_id = self.resolve(bank)
            row = {"time": now(), "user": user_name(None), "bank_id": bank_id, **event}
            append_jsonl(self.root / EVENTS / f"{bank_id}.jsonl", row)
        return row

    def _log(self, entry: Mapping[str, Any], *, keep_pointer: bool = True) -> dict[str, Any]:
        """Append a promotion-log entry and rewrite the pointer from the log (lock held)."""
        log = _read_promotions(self.root / LOG)
        if not log and keep_pointer:  # a registry from before the log: its history first
            for old in self._log_from_pointer():
                append_jsonl(self.root / LOG, old)
                log.append(old)
        row = {"seq": (log[-1]["seq"] + 1) if log else 1, "time": now(), **entry}
        append_jsonl(self.root / LOG, row)
        pointer = replay_moves([*log, row])
        assert pointer is not None
        write_json_atomic(self.root / POINTER, pointer)
        return pointer

    def promote(self, bank: str, *, by: str | None = None, force: bool = False,
                reason: str = "manual") -> dict[str, Any]:
        """Make ``bank`` the production bank, after verifying every file of it.

        Promoting the production bank changes nothing: the pointer is returned with
        ``"unchanged": True``. With ``force`` over a damaged ``PRODUCTION.json`` the pointer is
        written anew: from the log when the log is whole (promoting its production bank
        again is a ``repair`` entry, which moves no bank), else as a new log.

        Raises:
            RegistryError: the bank's latest gate results failed (unless ``force``), it is
                corrupt, or the pointer is damaged (unless ``force``).
        """
        if reason not in REASONS:
            raise ValueError(f"promotion reason must be one of {', '.join(REASONS)}, got {reason!r}")
        with self.locked():
            damaged = None
            try:
                current = self.production()
            except RegistryError as exc:
                if not force:
                    raise
                damaged = str(exc)
                log = _read_promotions(self.root / LOG)  # a damaged log is not repaired: restore it
                current = replay_moves(log)  # the whole log still says; without one --force starts a new log
            bank_id = self.resolve(bank)
            if current is not None and current["bank_id"] == bank_id and damaged is None:
                return current | {"unchanged": True}
            repair = current is not None and current["bank_id"] == bank_id  # only over a damaged pointer
            gates = self.verdict(bank_id)
            if not repair and not force and not gates.get("passed", False):
                reasons = "; ".join(gates.get("failures", [])) or "it has no passing gate results"
                raise RegistryError(f"bank {bank_id} cannot be promoted: {reasons}")
            problem = bank_problem(self.root / bank_id)
            if problem is not None:
                raise RegistryError(f"bank {bank_id} is corrupt and cannot be promoted: {problem}; restore "
                                    f"{self.root / bank_id} from a backup or promote another bank")
            note = {"note": f"over a damaged {POINTER}: {damaged}"} if damaged else {}
            if repair:
                rewrite = {"user": user_name(by), "from": bank_id, "to": bank_id, "reason": REPAIR, **note}
                return self._log(rewrite) | {"repaired": True}
            entry = {"user": user_name(by), "from": current["bank_id"] if current else None, "to": bank_id,
                     "reason": "forced" if force and not gates.get("passed") else reason, **note}
            return self._log(entry, keep_pointer=current is not None or not (self.root / POINTER).is_file())

    def rollback(self, *, by: str | None = None) -> dict[str, Any]:
        """Return to the previous production bank that differs from the current one.

        Raises:
            RegistryError: there is no production bank, or none before it.
        """
        with self.locked():
            current = self.production()
            if current is None:
                raise NoEarlierBank("there is no production bank to roll back from")
            previous = next((b for b in current["history"] if b != current["bank_id"]), None)
            if previous is None:
                raise NoEarlierBank(f"there is no previous production bank to roll back to: "
                                    f"{current['bank_id']} is the only bank that has been production")
            problem = bank_problem(self.root / previous)
            if problem is not None:
                raise RegistryError(f"previous production bank {previous} is corrupt, not rolled back: {problem}; "
                                    f"restore {self.root / previous} from a backup")
            return self._log({"user": user_name(by), "from": current["bank_id"], "to": previous, "reason": "rollback"})
