"""Append-only logs and the writer lock behind the registry.

A log is a JSON-lines file to which a record is added by writing the whole file anew beside
it and renaming it into place, so a killed writer leaves the old or the new file, never a
torn line. The lock is an exclusive ``flock``, released by the kernel when its holder dies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class LedgerError(RuntimeError):
    """A log could not be read; the message names the file and line."""


class Busy(RuntimeError):
    """Another process holds the lock and did not let go in time."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def to_time(value: str | dt.datetime) -> dt.datetime:
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def user_name(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


class FileLock:
    """An exclusive ``flock`` on one file, re-entrant within a process.

    ``flock`` belongs to an open file, so a second ``open`` + ``flock`` by the same process
    would wait for itself; nested uses share the first one instead. Threads of one process
    are serialised by a lock of their own before they reach the file.
    """

    _held: dict[str, FileLock] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.thread_lock = threading.RLock()
        self.count_guard = threading.Lock()
        self.fd: int | None = None
        self.depth = 0

    @classmethod
    def of(cls, path: Path) -> FileLock:
        key = str(path.resolve())
        with cls._guard:
            return cls._held.setdefault(key, cls(path))

    @contextlib.contextmanager
    def hold(self, *, wait_s: float, what: str, threads_share: bool = False) -> Iterator[None]:
        """Hold the lock, waiting up to ``wait_s`` seconds; ``threads_share``: every thread of
        this process shares one hold (a training run whose tasks run on worker threads)."""
        if threads_share:
            with self._shared(wait_s, what):
                yield
            return
        got = self.thread_lock.acquire(timeout=wait_s) if wait_s > 0 else self.thread_lock.acquire(blocking=False)
        if not got:
            raise Busy(f"{what} is in use by another thread of this process")
        try:
            if self.depth == 0:
                self._acquire(wait_s, what)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.fd is not None:
                    os.close(self.fd)  # closing the file releases the flock
                    self.fd = None
        finally:
            self.thread_lock.release()

    @contextlib.contextmanager
    def _shared(self, wait_s: float, what: str) -> Iterator[None]:
        with self.count_guard:
            if self.depth == 0:
                self._acquire(wait_s, what)
            self.depth += 1
        try:
            yield
        finally:
            with self.count_guard:
                self.depth -= 1
                if self.depth == 0 and self.fd is not None:
                    os.close(self.fd)
                    self.fd = None

    def _acquire(self, wait_s: float, what: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise Busy(f"{what} is held by {holder}; try again when it has finished") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {now()}\n".encode(), 0)
        self.fd = fd


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{path}: line {number} is not JSON ({exc.msg}); the log was edited by hand or the "
                                "disk is damaged: restore it from a backup") from exc
        if not isinstance(row, dict):
            raise LedgerError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append ``row`` by writing the whole file anew beside it and renaming it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(old + json.dumps(row, sort_keys=True).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replay(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The production pointer after the promotion log's entries, in order.

    A promotion pushes its bank on the stack of production banks, a rollback pops the top
    one: the pointer names the top, ``previous`` the one under it, ``history`` every bank
    under it (newest first) and ``rolled_back`` the banks rolled back from and not promoted
    again since.
    """
    stack: list[str] = []
    rolled_back: list[str] = []
    last: dict[str, Any] | None = None
    for entry in log:
        target = entry["to"]
        if entry.get("reason") == "rollback":
            if stack and stack[-1] == entry.get("from"):
                stack.pop()
            if entry.get("from"):
                rolled_back = [entry["from"]] + [b for b in rolled_back if b != entry["from"]]
            if not stack or stack[-1] != target:
                stack.append(target)
        else:
            stack.append(target)
        rolled_back = [b for b in rolled_back if b != target]
        last = entry
    if last is None:
        return None
    history = stack[:-1][::-1]
    return {"bank_id": stack[-1], "promoted_at": last["time"], "promoted_by": last.get("user"),
            "reason": last.get("reason"), "previous": history[0] if history else None, "history": history,
            "rolled_back": rolled_back, "seq": last.get("seq")}




def log_from_pointer(path: Path, log_name: str) -> list[dict[str, Any]]:
    """A production pointer written before the promotion log, as log entries: its history,
    oldest first, then the bank it names."""
    if not path.is_file():
        return []
    try:
        pointer = json.loads(path.read_text())
        chain = [str(b) for b in reversed(pointer.get("history") or [])] + [str(pointer["bank_id"])]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{path} is not a production pointer ({exc}); `tracebank promote --force BANK` "
                          "writes a new one") from exc
    entries, previous = [], None
    for seq, bank_id in enumerate(chain, 1):
        last = seq == len(chain)
        when = (pointer.get("promoted_at") if last else None) or "1970-01-01T00:00:00+00:00"
        entries.append({"seq": seq, "time": when,
                        "user": pointer.get("promoted_by") if last else None, "from": previous, "to": bank_id,
                        "reason": "manual", "note": f"from {path.name} (written before {log_name})"})
        previous = bank_id
    return entries
