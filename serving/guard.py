"""ASGI middleware that refuses oversized or mistyped requests before their body is read.

Note:
    The size limit is enforced twice: on the declared ``Content-Length`` (refused without
    reading anything) and on the bytes actually received (a chunked or lying client is cut
    off at the limit), so an upload never costs more memory than the limit. The body is
    buffered (at most the limit) so a multipart form can be checked and then replayed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("bentoml.tracebank")

ACCEPTED_TYPES = ("multipart/form-data", "application/json")


class RequestGuard:
    """Refuse requests to ``paths`` that are too large (413) or of the wrong type (415).

    Args:
        app: the wrapped ASGI application.
        max_bytes: largest accepted request body.
        paths: request paths to guard (POST only).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, paths: tuple[str, ...]) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ACCEPTED_TYPES:
            await _refuse(send, 415, f"content type {media_type or '(none)'!r} is not accepted on {scope['path']}; "
                          "send multipart/form-data (field 'image') or application/json (field 'image_b64')")
            return
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _refuse(send, 400, f"Content-Length {declared!r} is not a number")
                return
            if size > self.max_bytes:
                await _refuse(send, 413, self._too_large(size))
                return

        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _refuse(send, 413, self._too_large(len(body), at_least=True))
                return
            if not message.get("more_body", False):
                break
        if media_type == "multipart/form-data":
            problem = await _check_form(scope, bytes(body))
            if problem is not None:
                await _refuse(send, 400, problem)
                return

        await self.app(scope, _replay(bytes(body)), send)

    def _too_large(self, size: int, *, at_least: bool = False) -> str:
        amount = f"over {size}" if at_least else f"{size}"
        return (f"request body is {amount} bytes, over the limit of {self.max_bytes}; send a smaller image "
                "or raise TRACEBANK_MAX_REQUEST_MB")


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the buffered body to the application once."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _check_form(scope: Scope, body: bytes) -> str | None:
    """Why a multipart body is unusable, or None. ``image`` must be an uploaded file: a
    text value would make BentoML fetch it as a URL, which an inspection station must not."""
    request = Request(scope, _replay(body))
    try:
        form = await request.form(max_files=4, max_fields=16)
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
        return f"malformed multipart body ({exc}); send fields 'image' (a file) and 'part_id'"
    try:
        images = form.getlist("image")
        if len(images) > 1:
            return "send one file in field 'image' (use /predict_batch for several)"
        if images and not isinstance(images[0], UploadFile):
            return "field 'image' must be a file upload, not text (URLs are not fetched)"
        return None
    finally:
        await form.close()


async def _refuse(send: Send, status: int, message: str) -> None:
    logger.warning("refused request (%d): %s", status, message)
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
