"""Telling a running inspection service that production changed.

The service reads the registry's production bank when it starts and on ``POST /reload`` (with
the admin token); a promotion or rollback that the service is not told about keeps the old
bank deciding. :func:`reload_service` sends that request and checks that the service now
serves the bank the registry names.
"""

from __future__ import annotations

import os
from typing import Any


class ReloadFailed(RuntimeError):
    """The registry changed but the service did not switch; the message says what to do."""


def reload_service(url: str, bank_id: str, *, token: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """``POST {url}/reload`` and check that the service now serves ``bank_id``.

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:3000``.
        bank_id: the bank the registry now names as production.
        token: the service's admin token (default: ``TRACEBANK_ADMIN_TOKEN``).

    Returns:
        The service's answer: ``{"bank_id", "previous", "threshold"}``.

    Raises:
        ReloadFailed: the service could not be reached, refused (wrong token, a bank that
            fails verification) or serves another bank; the registry is left as it is.
    """
    import httpx  # an optional dependency (the mlops extra): loaded only when a reload is asked for

    token = token if token is not None else os.environ.get("TRACEBANK_ADMIN_TOKEN", "")
    advice = (f"production is {bank_id} in the registry, but the service at {url} still serves the bank it had: "
              "{why}. Fix that and POST /reload (see README), or roll the registry back")
    try:
        response = httpx.post(f"{url.rstrip('/')}/reload", json={}, timeout=timeout,
                              headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise ReloadFailed(advice.format(why=f"{type(exc).__name__}: {exc}")) from exc
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 200 or not isinstance(answer, dict):
        said = answer.get("error") if isinstance(answer, dict) else None
        raise ReloadFailed(advice.format(why=f"it answered {response.status_code} ({said or response.text[:200]})"))
    if answer.get("bank_id") != bank_id:
        raise ReloadFailed(advice.format(why=f"after the reload it serves {answer.get('bank_id')}"))
    return answer
