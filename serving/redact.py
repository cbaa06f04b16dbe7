"""What an anonymous client may read: answers without filesystem paths or user names.

The service's answers are read by whoever can reach its port. Paths (of the bank, the data,
the audit database) and user names (who promoted a bank) tell an attacker where to look and
whom to target, and a client never needs them: :func:`public` takes them out of a record,
:func:`scrub` out of a message. The admin token (``Authorization: Bearer <token>``) shows
everything, for an operator who needs the paths.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

#: Keys whose values are paths, file lists or people: left out of a public record.
PRIVATE_KEYS = frozenset({
    "source", "files", "added_files", "eval_files", "skipped", "report", "bank_dir", "registered_from",
    "promoted_by", "user", "by", "weights_source", "git_dirty",
})

# a URL such as sqlite:////srv/audit.sqlite, or an absolute path not inside a word (image/png stays)
_PATH = re.compile(r"(?:\b[a-zA-Z][\w+.-]*:/+|(?<![\w.~-])/)[^\s'\"(),;]*")


def scrub(text: str) -> str:
    """``text`` with every absolute path and URL replaced by its last component (the file's
    name tells what is wrong; the folders above it, a user's home among them, are not told)."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "<path>", text)


def public(value: Any) -> Any:
    """``value`` (JSON-like) without :data:`PRIVATE_KEYS` and with its strings scrubbed."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


def authorized(header: str, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer credential (the scheme
    is case-insensitive, RFC 7235); constant-time in the token."""
    scheme, _, given = header.strip().partition(" ")
    if token is None or scheme.lower() != "bearer" or not given.strip():
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
