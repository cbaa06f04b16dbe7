"""ASGI middleware that bounds what one request may cost before the service sees it.

Note:
    The size limit is enforced twice: on the declared ``Content-Length`` (refused without
    reading anything) and on the bytes actually received (a chunked or lying client is cut
    off at the limit), so an upload never costs more memory than the limit. The body is
    buffered (at most the limit) so a multipart form can be checked and then replayed.

    A body must also arrive within ``receive_s`` (408 otherwise, and the connection is
    closed): a client that trickles a byte every few seconds holds nothing for long. And a
    request takes one of the ``max_concurrency`` slots only once its body is complete, so
    any number of slow uploads never locks out a client that sends its image at once (the
    slots bound the work, not the connections). What the bodies being received may hold
    together is bounded by ``max_concurrency * max_bytes`` bytes (429 past it), the memory
    that the slots alone bounded before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from pathlib import Path
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

#: The form fields ``/predict`` takes, and whether each is a file or text.
FORM_FIELDS = {"image": "file", "image_b64": "text", "part_id": "text", "output": "text"}
#: Paths answered without a slot or a body deadline (probes must answer while the service is busy).
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
#: Methods whose requests carry no body to wait for.
BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The boundary of every multipart body the guard passes on (it rebuilds each one).
_BOUNDARY = b"tracebank-" + secrets.token_hex(16).encode("ascii")

#: When the request in this context arrived (``time.perf_counter()``), set by :class:`RequestGuard`:
#: the service counts its request deadline from it, on the same clock as BentoML's own timeout.
ARRIVAL: ContextVar[float] = ContextVar("tracebank_arrival")


def arrival() -> float:
    """When the current request arrived; now, outside a request the guard has seen."""
    return ARRIVAL.get(None) or time.perf_counter()


class _Refusal(Exception):
    """A request refused while its body is read: status, message, and whether the connection
    must be closed (its body was not read to the end)."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


class RequestGuard:
    """Bound every request's body (size, type, time) and the requests in progress.

    Args:
        app: the wrapped ASGI application.
        max_bytes: largest accepted request body (413 past it).
        paths: request paths whose POST bodies are checked as ``/predict`` forms (415 for
            another content type, 400 for a malformed or unexpected form).
        observe: called with the path and HTTP status of every answer to a request to
            ``paths``, refusals included (for the service's request counters).
        receive_s: longest time a body may take to arrive, from the request's start (408).
        max_concurrency: requests in progress at once, counted from a complete body (429
            past it); the paths of :data:`OPEN_PATHS` are not counted.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, paths: tuple[str, ...],
                 observe: Callable[[str, int], None] | None = None, receive_s: float = 10.0,
                 max_concurrency: int = 64) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if receive_s <= 0:
            raise ValueError(f"receive_s must be positive, got {receive_s}")
        if max_concurrency <= 0:
            raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
        self.app = app
        self.max_bytes = max_bytes
        self.paths = frozenset(paths)
        self.observe = observe
        self.receive_s = receive_s
        self.max_concurrency = max_concurrency
        self.max_buffered = max_concurrency * max_bytes
        self._busy = 0  # requests in a slot; one event loop, so plain counters are exact
        self._buffered = 0  # bytes held by bodies of requests not yet finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        ARRIVAL.set(time.perf_counter())
        form = scope.get("method") == "POST" and scope.get("path") in self.paths
        if form and self.observe is not None:
            send = _observed(send, scope["path"], self.observe)
        send = _uniform_errors(send)  # every refusal is {"error", "field"}, BentoML's own included
        if scope.get("method") in BODILESS:
            await self._in_slot(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if form and media_type not in ACCEPTED_TYPES:
            await _refuse(send, 415, f"content type {media_type or '(none)'!r} is not accepted on {scope['path']}; "
                          "send multipart/form-data (field 'image') or application/json (field 'image_b64')")
            return
        try:
            body = await self._body(receive, headers.get("content-length"))
        except _Refusal as refusal:
            await _refuse(send, refusal.status, refusal.message, close=refusal.close)
            return
        if body is None:  # the client went away
            return
        try:
            if form and media_type == "multipart/form-data":
                problem, payload, field = await _check_form(scope, body)
                if problem is not None:
                    await _refuse(send, 400, problem, field)
                    return
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope.get("headers", [])
                                    if k.lower() not in (b"content-length", b"content-type")]
                scope["headers"] += [(b"content-length", str(len(payload)).encode()),
                                     (b"content-type", b"multipart/form-data; boundary=" + _BOUNDARY)]
            else:
                payload = body
            await self._in_slot(scope, _replay(payload), send)
        finally:
            self._buffered -= len(body)

    async def _in_slot(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._busy >= self.max_concurrency:
            await _refuse(send, 429, f"too many requests in progress ({self.max_concurrency}); retry shortly")
            return
        self._busy += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._busy -= 1

    async def _body(self, receive: Receive, declared: str | None) -> bytes | None:
        """The whole body, read within the size limit, the buffer budget and ``receive_s``
        (its bytes stay counted in the budget until the caller subtracts them); None when
        the client went away.

        Raises:
            _Refusal: 400 (bad ``Content-Length``), 413 (too large), 429 (buffers full), 408 (too slow).
        """
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _Refusal(400, f"Content-Length {declared!r} is not a number") from None
            if size > self.max_bytes:
                raise _Refusal(413, self._too_large(size))
        deadline = ARRIVAL.get() + self.receive_s
        body = bytearray()
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                        message = await receive()
                except TimeoutError:
                    raise _Refusal(408, f"request body not complete after {self.receive_s:g} s ({len(body)} bytes "
                                   "received; TRACEBANK_RECEIVE_TIMEOUT_S): send the whole body at once",
                                   close=True) from None
                if message["type"] == "http.disconnect":
                    self._buffered -= len(body)
                    return None
                chunk = message.get("body", b"")
                body += chunk
                self._buffered += len(chunk)
                if len(body) > self.max_bytes:
                    raise _Refusal(413, self._too_large(len(body), at_least=True), close=True)
                if self._buffered > self.max_buffered:
                    raise _Refusal(429, "too many uploads in progress; retry shortly", close=True)
                if not message.get("more_body", False):
                    return bytes(body)
        except BaseException:  # refused or cancelled (BentoML's timeout): its bytes are let go
            self._buffered -= len(body)
            raise

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


async def _check_form(scope: Scope, body: bytes) -> tuple[str | None, bytes, str | None]:
    """Why a multipart body is unusable (or None), the body to pass on, and the field at fault.

    The form is parsed once, strictly, and rebuilt from what was parsed: only the fields of
    :data:`FORM_FIELDS`, each of its kind (any other name, however it is quoted, is refused
    naming it), so the service never sees a part it did not expect. ``image`` must be an
    uploaded file: a text value would make BentoML fetch it as a URL, which an inspection
    station must not. An upload is passed on as ``upload`` plus its extension, never under
    the client's file name (BentoML writes it to a temporary file of that name). Text fields
    are passed on JSON-quoted: BentoML reads form fields as JSON, so ``part_id=4711`` would
    arrive as a number (and be refused) and ``part_id=null`` as nothing; quoted, every text
    arrives as the text that was sent. The rebuilt body is delimited by :data:`_BOUNDARY`,
    which the caller declares in the content type it passes on: the client's header may name
    its boundary twice, quoted or not, and the service must not read another one than the
    one the body was built with (BentoML answers 500 to a form it cannot parse).
    """
    request = Request(scope, _replay(body))
    try:
        form = await request.form(max_files=4, max_fields=16)
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
        return f"malformed multipart body ({exc}); send fields 'image' (a file) and 'part_id'", body, None
    try:
        images = form.getlist("image")
        if len(images) > 1:
            return "send one file in field 'image' (use /predict_batch for several)", body, "image"
        if images and not isinstance(images[0], UploadFile):
            return "field 'image' must be a file upload, not text (URLs are not fetched)", body, "image"
        for name, value in form.multi_items():
            kind = FORM_FIELDS.get(name)
            if kind is None:
                return (f"unknown form field {name[:60]!r}; send {', '.join(repr(f) for f in FORM_FIELDS)} "
                        "(the image as a file in 'image')"), body, name[:60]
            if (kind == "file") != isinstance(value, UploadFile):
                return f"field {name!r} must be {'a file upload' if kind == 'file' else 'text, not a file'}", body, name
        parts: list[bytes] = []
        for name, value in form.multi_items():
            disposition = f'form-data; name="{name}"'
            if isinstance(value, UploadFile):
                suffix = Path(value.filename or "").suffix
                filename = "upload" + (suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else "")
                kind = (value.content_type or "").split(";")[0].strip()
                kind = kind if re.fullmatch(r"[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+", kind) else "application/octet-stream"
                head = f"Content-Disposition: {disposition}; filename=\"{filename}\"\r\nContent-Type: {kind}\r\n"
                data = await value.read()
            else:
                head = f"Content-Disposition: {disposition}\r\n"
                data = json.dumps(value).encode("utf-8")
            if _BOUNDARY in data:  # 128 random bits: never by chance, and never disclosed
                return "a form part holds the multipart boundary the service uses inside", body, name
            parts.append(b"--" + _BOUNDARY + b"\r\n" + head.encode("utf-8") + b"\r\n" + data + b"\r\n")
        return None, b"".join(parts) + b"--" + _BOUNDARY + b"--\r\n", None
    finally:
        await form.close()


def _observed(send: Send, path: str, observe: Callable[[str, int], None]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            observe(path, int(message["status"]))
        await send(message)

    return wrapped


def _uniform_errors(send: Send) -> Send:
    """Pass responses on, rewriting a 4xx body that is not ``{"error", ...}`` JSON (BentoML's
    own validation output) into ``{"error": what to fix, "field": the field}``."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _uniform_body(b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _uniform_body(raw: bytes) -> bytes:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and "detail" not in parsed:
        return raw  # already ours
    field, problem = None, raw.decode("utf-8", "replace").strip()[:300]
    if isinstance(parsed, dict):
        problem = str(parsed.get("error") or problem)
        details = parsed.get("detail")
        if isinstance(details, list) and details and isinstance(details[0], dict):
            first = details[0]
            field = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query")) or None
            problem = str(first.get("msg") or problem)
    message = f"field '{field}': {problem}" if field else problem
    logger.warning("refused request: %s", message)
    return json.dumps({"error": message, "field": field}).encode()


async def _refuse(send: Send, status: int, message: str, field: str | None = None, *, close: bool = False) -> None:
    """Answer ``{"error", "field"}`` JSON; ``close`` ends the connection after it (a body
    not read to the end would otherwise keep it open)."""
    logger.warning("refused request (%d): %s", status, message)
    body = json.dumps({"error": message} | ({"field": field} if field is not None else {})).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
