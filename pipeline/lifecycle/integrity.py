"""What the registry's records must be before anything acts on them.

The production pointer, the promotion log and a bank's files can each be damaged on disk
(a write cut off, a changed byte, an edit by hand). The checks here say so in a few words
naming the file, instead of a ``KeyError`` or a ``JSONDecodeError`` three calls later:
:func:`read_promotions` (every log entry names a bank and a time), :func:`pointer_problem`
(``PRODUCTION.json`` is the log's replay), :func:`bank_problem` (a manifest that is whole
and files that match their sha256) and :func:`verified_manifest`, which refuses a bank that
fails it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.hashing import sha256_file
from pipeline.patchcore.bank import MANIFEST, READABLE_FORMATS, BankError, bank_id_of, read_manifest

from .ledger import LedgerError, read_jsonl, replay, to_time

#: The reason of a log entry that rewrote a damaged pointer; it moves no bank.
REPAIR = "repair"
#: What the user runs to rewrite a damaged pointer from the log.
REPAIR_COMMAND = "tracebank promote --force"


def read_promotions(path: Path) -> list[dict[str, Any]]:
    """The promotion log, every entry checked to name the bank it made production and when.

    Raises:
        LedgerError: a line is not JSON, or an entry is not a promotion; naming the file.
    """
    log = read_jsonl(path)
    for number, entry in enumerate(log, 1):
        try:
            if not isinstance(entry.get("to"), str) or not entry["to"]:
                raise ValueError("no bank it promoted ('to')")
            to_time(entry["time"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{path}: entry {number} is not a promotion ({exc}); the log was edited by hand "
                              "or the disk is damaged: restore it from a backup") from exc
    return log


def replay_moves(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """:func:`~pipeline.lifecycle.ledger.replay` of the entries that moved a bank (a repair
    of the pointer moved none)."""
    return replay([e for e in log if e.get("reason") != REPAIR])


def pointer_problem(path: Path, log: list[dict[str, Any]]) -> str | None:
    """Why the pointer at ``path`` cannot be trusted beside ``log`` (a non-empty promotion
    log), with what to do; None when it is absent (a first promotion killed before it wrote
    the pointer) or is the log's replay now or at an earlier entry (a promotion killed
    between its two writes leaves the pointer one behind)."""
    if not path.is_file():
        return None
    expected = replay_moves(log)
    assert expected is not None, "a promotion log has a promotion in it"
    fix = (f"the promotion log makes {expected['bank_id']} production: `{REPAIR_COMMAND} {expected['bank_id']}` "
           "rewrites the pointer from it (a repair entry in the log)")
    try:
        pointer = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{path} is damaged: not JSON ({exc}); {fix}"
    if not isinstance(pointer, dict) or not isinstance(pointer.get("bank_id"), str):
        return f"{path} is damaged: not a production pointer (no bank id); {fix}"
    seq = pointer.get("seq")
    for end in range(len(log), 0, -1):
        if seq in (None, log[end - 1].get("seq")):
            then = replay_moves(log[:end])
            if then is not None and then["bank_id"] == pointer["bank_id"]:
                return None
        if seq is None:
            break  # a pointer without a sequence number can only be the latest
    return (f"{path} is damaged: it names bank {pointer['bank_id']} (entry {seq}), which the promotion log did not "
            f"make production there, so it was edited by hand; {fix}")


def bank_problem(directory: str | Path) -> str | None:
    """What is wrong with a bank directory, in a few words (``memory_bank.npy sha256
    mismatch``), or None when its manifest is whole and every file matches its sha256."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return f"{MANIFEST} missing"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is not JSON"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is not a JSON object"
    if manifest.get("format") not in READABLE_FORMATS:
        return f"{MANIFEST} has format {manifest.get('format')!r}, not one this version reads"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return f"{MANIFEST} lists no files with their sha256"
    for name, expected in files.items():
        if Path(name).name != name or name in (".", ".."):
            return f"{MANIFEST} names {name!r}, not a file of the bank"
        if not (directory / name).is_file():
            return f"{name} missing"
        if sha256_file(directory / name) != expected:
            return f"{name} sha256 mismatch"
    try:
        bank_id = bank_id_of(manifest)
    except (KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is incomplete (no {exc})"
    if bank_id != manifest.get("bank_id"):
        return f"{MANIFEST} was edited: its contents do not match bank id {manifest.get('bank_id')}"
    return None


def verified_manifest(directory: str | Path, what: str) -> dict[str, Any]:
    """The manifest of a bank whose files all match their sha256 (see :func:`bank_problem`).

    Raises:
        BankError: naming ``what`` (``production bank 6db0...'s registry copy``), the problem and what to do.
    """
    problem = bank_problem(directory)
    if problem is not None:
        raise BankError(f"{what} in {directory} is corrupt: {problem}; do not use it: restore the folder from a "
                        "backup, or promote another bank")
    return read_manifest(directory, verify=False)
