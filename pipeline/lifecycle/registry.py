"""A registry of banks on disk: candidates, rejected banks, the production bank, history.

Layout of a registry root (``banks/`` by default)::

    banks/<bank_id>/            a bank directory (see :mod:`pipeline.patchcore.bank`)
    banks/<bank_id>/lineage.json  data hash, files, git commit, params, metrics, gates, status
    banks/PRODUCTION.json       {"bank_id", "promoted_at", "promoted_by", "previous"}

Promotion writes ``PRODUCTION.json`` through a temporary file and ``os.replace``, which is
atomic on POSIX: a promotion interrupted at any point leaves either the old or the new
production bank, never a half-written pointer. A bank whose gates failed cannot be promoted.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.patchcore.bank import BankError, read_manifest, write_json_atomic

POINTER = "PRODUCTION.json"
LINEAGE = "lineage.json"
STATUSES = ("candidate", "rejected", "production", "retired")


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why and what to do."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Registry:
    """Banks under ``root`` with their lineage and the production pointer."""

    def __init__(self, root: str | Path = "banks") -> None:
        self.root = Path(root)

    # -- reading -----------------------------------------------------------------------
    def bank_dir(self, bank: str) -> Path:
        """Directory of ``bank`` (an id, a unique id prefix, or ``"production"``)."""
        bank_id = self.resolve(bank)
        return self.root / bank_id

    def resolve(self, bank: str) -> str:
        if bank == "production":
            pointer = self.production()
            if pointer is None:
                raise RegistryError(f"{self.root}: no bank has been promoted to production yet")
            return str(pointer["bank_id"])
        if (self.root / bank / LINEAGE).is_file():
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
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / LINEAGE).is_file())

    def production(self) -> dict[str, Any] | None:
        path = self.root / POINTER
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def lineage(self, bank: str) -> dict[str, Any]:
        """The lineage record of ``bank``, with its current ``status`` and promotion time."""
        bank_id = self.resolve(bank)
        record = json.loads((self.root / bank_id / LINEAGE).read_text())
        pointer = self.production() or {}
        if pointer.get("bank_id") == bank_id:
            record["status"] = "production"
            record["promoted_at"] = pointer["promoted_at"]
            record["promoted_by"] = pointer.get("promoted_by")
        elif bank_id in pointer.get("rolled_back", []):
            record["status"] = "rolled back"
        elif bank_id in pointer.get("history", []) or record.get("status") == "production":
            record["status"] = "retired"  # was production, replaced by a later promotion
        return record

    def list(self) -> list[dict[str, Any]]:
        """Summary of every bank, newest first."""
        rows = []
        for path in self._bank_dirs():
            rec = self.lineage(path.name)
            rows.append({
                "bank_id": rec["bank_id"],
                "status": rec["status"],
                "created_at": rec.get("created_at"),
                "data_hash": rec.get("data_hash"),
                "image_auroc": (rec.get("metrics") or {}).get("image_auroc"),
                "pro": (rec.get("metrics") or {}).get("pro"),
                "promoted_at": rec.get("promoted_at"),
            })
        return sorted(rows, key=lambda r: r["created_at"] or "", reverse=True)

    # -- writing -----------------------------------------------------------------------
    def register(self, bank_dir: str | Path, lineage: Mapping[str, Any], *, move: bool = True) -> str:
        """Add a verified bank with its lineage; returns its id.

        The bank directory is moved (or copied) to ``root/<bank_id>``; registering the same
        bank twice keeps the first copy and refreshes its lineage.
        """
        manifest = read_manifest(bank_dir)
        bank_id = manifest["bank_id"]
        target = self.root / bank_id
        self.root.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            staging = self.root / f".{bank_id}.incoming"
            shutil.rmtree(staging, ignore_errors=True)
            if move:
                shutil.move(str(bank_dir), staging)
            else:
                shutil.copytree(bank_dir, staging)
            os.replace(staging, target)
        record = dict(lineage)
        record.update({"bank_id": bank_id, "created_at": record.get("created_at") or manifest["created_at"]})
        status = record.get("status", "candidate")
        if status not in ("candidate", "rejected"):
            raise RegistryError(f"a new bank is registered as candidate or rejected, not {status!r}")
        record["status"] = status
        write_json_atomic(target / LINEAGE, record)
        return bank_id

    def set_fields(self, bank: str, **fields: Any) -> dict[str, Any]:
        bank_id = self.resolve(bank)
        path = self.root / bank_id / LINEAGE
        record = json.loads(path.read_text())
        record.update(fields)
        write_json_atomic(path, record)
        return record

    def promote(self, bank: str, *, by: str | None = None, force: bool = False) -> dict[str, Any]:
        """Make ``bank`` the production bank, after verifying every file of it.

        Raises:
            RegistryError: the bank failed its gates (unless ``force``), or is corrupt.
        """
        bank_id = self.resolve(bank)
        record = json.loads((self.root / bank_id / LINEAGE).read_text())
        gates = record.get("gates") or {}
        if not force and not gates.get("passed", False):
            reasons = "; ".join(gates.get("failures", [])) or "it has no passing gate results"
            raise RegistryError(f"bank {bank_id} cannot be promoted: {reasons}")
        try:
            read_manifest(self.root / bank_id)
        except BankError as exc:
            raise RegistryError(f"bank {bank_id} is corrupt and cannot be promoted: {exc}") from exc
        current = self.production()
        pointer = {
            "bank_id": bank_id,
            "promoted_at": _now(),
            "promoted_by": by or getpass.getuser(),
            "previous": current["bank_id"] if current else None,
            "history": ([current["bank_id"]] + current.get("history", []))[:50] if current else [],
            "rolled_back": [b for b in (current or {}).get("rolled_back", []) if b != bank_id],
        }
        write_json_atomic(self.root / POINTER, pointer)
        return pointer

    def rollback(self, *, by: str | None = None) -> dict[str, Any]:
        """Promote the previous production bank again."""
        current = self.production()
        if current is None or not current.get("previous"):
            raise RegistryError("there is no previous production bank to roll back to")
        history = current.get("history", [])
        previous = current["previous"]
        pointer = {
            "bank_id": previous,
            "promoted_at": _now(),
            "promoted_by": by or getpass.getuser(),
            "previous": history[1] if len(history) > 1 else None,
            "history": history[1:],
            "rolled_back_from": current["bank_id"],
            "rolled_back": [current["bank_id"]] + [b for b in current.get("rolled_back", []) if b != previous],
        }
        read_manifest(self.root / previous)
        write_json_atomic(self.root / POINTER, pointer)
        return pointer
