"""The inspection service: the production memory bank behind HTTP, every decision audited.

Run ``bentoml serve`` in the repository root (``bentofile.yaml`` names this service) and
open http://127.0.0.1:3000 for the Swagger UI. Settings come from the environment
(:mod:`serving.settings` lists them).

Endpoints: ``POST /predict`` (multipart ``image`` + ``part_id``, or JSON with
``image_b64``), ``POST /predict_batch`` (adaptive batching across clients),
``POST /metadata``, ``POST /reload``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import bentoml
from PIL import Image
from pydantic import BaseModel, Field, PrivateAttr
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from pipeline.data.images import ImageError
from pipeline.lifecycle.audit import AuditError, AuditLog
from pipeline.lifecycle.inspection import InputError, LoadedBank, Result, Upload, check_upload, decide
from pipeline.lifecycle.registry import Registry, RegistryError
from pipeline.patchcore.bank import BankError
from serving.guard import RequestGuard, arrival
from serving.recording import Held, Late, Ticket, probe_write
from serving.redact import authorized, public, scrub
from serving.settings import Settings
from serving.store import declared_bank_tag, production_bank_dir

logger = logging.getLogger("bentoml.tracebank")

Output = Literal["none", "heatmap", "mask"]
T = TypeVar("T")


class BatchItem(BaseModel):
    """One image of a batch request."""

    image_b64: str = Field(description="the image file, base64-encoded")
    part_id: str | None = None
    output: Output = "none"
    # when its request arrived: set as the item is parsed, in its request's context (a batch
    # mixes requests, and runs outside all of them); private, so no client can set it
    _arrived: float = PrivateAttr(default_factory=arrival)

    def arrived(self) -> float:
        return self._arrived


def _error(status: int, message: str, field: str | None = None, **extra: Any) -> JSONResponse:
    logger.warning("refused request (%d): %s", status, message)
    body: dict[str, Any] = {"error": scrub(message)}  # the log keeps the paths, the client never sees them
    if field is not None:
        body["field"] = field
    body.update(extra)
    return JSONResponse(body, status_code=status)


def _payload(result: Result) -> dict[str, Any]:
    body = result.as_json()
    if result.picture is not None:
        body["png_b64"] = base64.b64encode(result.picture).decode("ascii")
    return body


class _MapTooLarge(ValueError):
    """A heatmap or mask asked for an image over the map pixel budget (the message says what to do)."""


def _discard(future: asyncio.Future[Any]) -> None:
    """Collect the outcome of work whose request was already refused (nobody awaits it)."""
    error = None if future.cancelled() else future.exception()
    if error is not None and not isinstance(error, Late):
        logger.warning("work for a request refused at its deadline failed: %r", error)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image's header, without decoding it; None when the header
    cannot be read (decoding then reports why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb and damaged-tag warnings: decoding reports them
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - any unreadable header is check_upload's to report
        return None


def _late(settings: Settings) -> str:
    return (f"not answered within the request timeout of {settings.request_timeout_s:g} s "
            "(TRACEBANK_REQUEST_TIMEOUT_S), so not recorded; retry later")


def exit_with_parent(every_s: float = 1.0, grace_s: float = 10.0) -> threading.Thread | None:
    """Stop this worker when the server process that started it dies.

    BentoML starts each worker in a session of its own, holding the listening socket, so a
    ``kill -9`` of ``bentoml serve`` (or of its process group) would leave the worker
    answering with nobody to supervise, restart or stop it. A daemon thread polls the
    parent's pid; once it changes the worker stops as on SIGTERM (requests in flight finish),
    and for good after ``grace_s`` seconds. None when there is no parent to watch (pid 1).
    """
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        logger.error("the server process %d is gone: this worker stops", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="tracebank-parent-watch", daemon=True)
    thread.start()
    return thread


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"field '{field}' is not valid base64 ({exc}); send the image file base64-encoded") from exc


SETTINGS = Settings.from_env()

# Prometheus series on /metrics beside BentoML's own (bentoml.metrics is prometheus_client,
# set up for BentoML's worker processes). Counters get the client's "_total" suffix.
DECISIONS = bentoml.metrics.Counter(
    name="tracebank_decisions", documentation="Recorded inspection decisions, by decision and bank",
    labelnames=["decision", "bank_id"])
SCORE_RATIO = bentoml.metrics.Histogram(
    name="tracebank_score_threshold_ratio",
    documentation="Anomaly score divided by the bank's threshold (1 is the decision boundary), by bank",
    labelnames=["bank_id"], buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0))
REQUESTS = bentoml.metrics.Counter(
    name="tracebank_requests", documentation="Inspection requests by endpoint and HTTP status",
    labelnames=["endpoint", "status"])
AUDIT_FAILURES = bentoml.metrics.Counter(
    name="tracebank_audit_write_failures",
    documentation="Requests refused (503) because their decisions could not be written to the audit database")
# The bank `bentoml build` packs into the Bento (and BentoML resolves before serving).
BANK_TAG = declared_bank_tag(SETTINGS.registry, SETTINGS.model_tag)


# No BentoML max_concurrency: it counts a request from its first byte, so slow uploads would
# hold every slot; RequestGuard counts from a complete body instead (TRACEBANK_MAX_CONCURRENCY).
@bentoml.service(
    name="tracebank",
    traffic={"timeout": SETTINGS.server_timeout_s},
    threads=4,
    endpoints={"livez": "/healthz", "readyz": "/readyz"},
)
class Inspection:
    """Serves the production bank; loads it once, verifies its hashes, audits every decision."""

    if BANK_TAG is not None:
        bank_model = bentoml.models.BentoModel(BANK_TAG)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.audit = AuditLog(self.settings.audit_db, lock_timeout_s=self.settings.audit_lock_s,
                              max_mb=self.settings.audit_max_mb)
        self.audit_problem: str | None = None  # why the last audit write failed; None once one succeeds
        self._predict_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        # the handlers are async (they answer at the deadline); decoding and scoring run here
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tracebank-inspect")
        self.bank: LoadedBank | None = None
        self.load_error: str | None = None
        exit_with_parent()
        try:
            self.bank = self._load()
            logger.info("serving bank %s (threshold %.4f)", self.bank.bank_id, self.bank.threshold)
        except (BankError, RegistryError, OSError) as exc:  # started, not ready: /readyz and /predict say why
            self.load_error = str(exc)
            logger.error("no bank loaded: %s", exc)
        logger.info("audit database: %s", self.audit.location())

    def _load(self) -> LoadedBank:
        """The production bank, every copy of it verified (see :func:`serving.store.production_bank_dir`).

        Raises:
            RegistryError, BankError, OSError: the message says which record or file and what to do.
        """
        directory = production_bank_dir(self.settings.registry, self.settings.model_tag)
        try:
            return LoadedBank(directory, device=self.settings.device)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a whole manifest with odd contents
            raise BankError(f"the bank in {directory} cannot be loaded ({type(exc).__name__}: {exc}): its "
                            "manifest is malformed; promote another bank") from exc

    def __is_ready__(self) -> bool:
        """A bank is loaded and a decision can be recorded: after a failed audit write, only
        once a probe write succeeds again (a full disk still answers reads). Not ready is a
        503 whose text says why (``not ready: ...``, paths cut)."""
        if self.bank is None:
            raise HTTPException(503, scrub(f"not ready: no bank loaded: {self.load_error}"))
        try:
            if self.audit_problem is None:
                self.audit.check()
            else:
                probe_write(self.audit)
                logger.info("audit database writable again (last failure: %s)", self.audit_problem)
                self.audit_problem = None
        except AuditError as exc:
            logger.warning("not ready: %s", exc)
            raise HTTPException(503, scrub(f"not ready: decisions cannot be recorded: {exc}")) from exc
        return True

    async def _within(self, ticket: Ticket, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in a worker thread, its result if it comes before ``ticket``'s
        deadline; :class:`Late` at the deadline unless the worker is already recording (its
        answer then follows within the audit lock timeout). A worker given up on carries on
        to its next check of the ticket and records nothing."""
        future = asyncio.get_running_loop().run_in_executor(self._workers, work, *args)
        try:
            done, _ = await asyncio.wait({future}, timeout=ticket.remaining())
        except asyncio.CancelledError:  # BentoML's own timeout, which the deadline keeps below
            ticket.expire()
            future.add_done_callback(_discard)
            raise
        if not done and ticket.expire():
            future.add_done_callback(_discard)
            raise Late
        return await future

    def _checked(self, data: bytes, *, part_id: str | None, output: str, filename: str, received: float) -> Upload:
        """:func:`~pipeline.lifecycle.inspection.check_upload` under the map pixel budget as
        well, checked from the header before decoding (a refusal costs no decode) and again
        on the decoded image.

        Raises:
            ImageError, InputError: as ``check_upload``.
            _MapTooLarge: ``output`` asks for a map of an image over the budget.
        """
        if output != "none":
            size = _header_size(data)
            if size is not None and size[0] * size[1] <= self.settings.max_pixels:  # else check_upload's 400
                self._map_budget(output, *size)
        upload = check_upload(data, part_id=part_id, output=output, filename=filename,
                              max_pixels=self.settings.max_pixels, received=received)
        if output != "none":
            self._map_budget(output, upload.image.shape[1], upload.image.shape[0])
        return upload

    def _map_budget(self, output: str, width: int, height: int) -> None:
        budget = self.settings.max_map_pixels
        if width * height > budget:
            raise _MapTooLarge(
                f"field 'output': a {output} is drawn at the image's size, at most {budget:,} pixels "
                f"(TRACEBANK_MAX_MAP_PIXELS); this image is {width} x {height} = {width * height:,}: send it with "
                f"output=none for its score and decision, or scaled down for its {output}"
            )

    def _score(self, uploads: list[Upload], ticket: Ticket) -> list[Result]:
        bank = self.bank  # one reference for the whole request: a reload never mixes banks
        if bank is None:
            raise RegistryError(f"no bank loaded: {self.load_error}")
        if not self._predict_lock.acquire(timeout=ticket.remaining()):
            raise Late
        try:
            ticket.check()
            held = Held()
            results: dict[int, Result] = {}
            # maps only for the uploads that asked: decide draws them for all of a batch if one asks
            for drawn in (False, True):
                group = [i for i, u in enumerate(uploads) if (u.output != "none") == drawn]
                if group:
                    made = decide(bank, [uploads[i] for i in group], cast(AuditLog, held))
                    results.update(zip(group, made, strict=True))
            ticket.claim()
            try:
                self.audit.record_many(held.decisions)
            except AuditError as exc:
                AUDIT_FAILURES.inc()
                self.audit_problem = str(exc)
                raise
            self.audit_problem = None
        finally:
            self._predict_lock.release()
        for result in results.values():
            decision = result.decision
            DECISIONS.labels(decision=decision.decision, bank_id=decision.bank_id).inc()
            SCORE_RATIO.labels(bank_id=decision.bank_id).observe(decision.score / decision.threshold)
        return [results[i] for i in range(len(uploads))]

    @bentoml.api(route="/predict")
    async def predict(
        self,
        # Path, not Path | None: BentoML 1.4 cannot build an optional file field; absent means None.
        image: Path = None,  # type: ignore[assignment]
        image_b64: str | None = None,
        part_id: str | None = None,
        output: Output = "none",
    ) -> dict[str, Any]:
        """Inspect one part: anomaly score, decision against the bank's threshold, and on
        request (``output``) the heatmap overlay or binary mask as base64 PNG."""
        received = time.perf_counter()
        ticket = Ticket(arrival() + self.settings.request_timeout_s)
        try:
            return await self._within(ticket, self._inspect, image, image_b64, part_id, output, ticket, received)
        except Late:
            return _error(503, _late(self.settings))

    def _inspect(self, image: Path | None, image_b64: str | None, part_id: str | None, output: str,
                 ticket: Ticket, received: float) -> dict[str, Any] | JSONResponse:
        ticket.check()
        field = "image" if image is not None else "image_b64"
        try:
            if (image is None) == (image_b64 is None):
                raise InputError("send exactly one of 'image' (multipart file) or 'image_b64' (JSON)")
            data = image.read_bytes() if image is not None else _b64(image_b64 or "", "image_b64")
            upload = self._checked(data, part_id=part_id, output=output, filename=field, received=received)
        except InputError as exc:
            return _error(400, str(exc))
        except ImageError as exc:
            return _error(400, str(exc), field)
        except _MapTooLarge as exc:
            return _error(422, str(exc), "output")
        try:
            return _payload(self._score([upload], ticket)[0])
        except AuditError as exc:
            return _error(503, f"decision not recorded, so not answered: {exc}; retry later")
        except RegistryError as exc:
            return _error(503, str(exc))

    # max_latency_ms is when BentoML gives up on a queued item (503), not a target: a line
    # would rather wait a few seconds under a burst than lose the decision.
    @bentoml.api(route="/predict_batch", batchable=True, max_batch_size=16, max_latency_ms=30_000)
    async def predict_batch(self, items: list[BatchItem]) -> list[dict[str, Any]]:
        """Inspect several parts; concurrent callers share backbone passes (adaptive
        batching). A bad item gets an ``error`` entry of its own, the rest are scored."""
        received = time.perf_counter()
        # one deadline for the batch, its oldest request's: every request in it is answered or none
        ticket = Ticket(min((item.arrived() for item in items), default=received) + self.settings.request_timeout_s)
        try:
            return await self._within(ticket, self._inspect_batch, items, ticket, received)
        except Late as exc:
            raise bentoml.exceptions.ServiceUnavailable(_late(self.settings)) from exc
        except (AuditError, RegistryError) as exc:
            message = scrub(f"decision not recorded, so not answered: {exc}; retry later")
            raise bentoml.exceptions.ServiceUnavailable(message) from exc

    def _inspect_batch(self, items: list[BatchItem], ticket: Ticket, received: float) -> list[dict[str, Any]]:
        ticket.check()
        answers: list[dict[str, Any] | None] = [None] * len(items)
        uploads: list[Upload] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            try:
                data = _b64(item.image_b64, "image_b64")
                upload = self._checked(data, part_id=item.part_id, output=item.output,
                                       filename=f"items[{i}].image_b64", received=received)
                uploads.append(upload)
                positions.append(i)
            except (InputError, ImageError, _MapTooLarge) as exc:
                logger.warning("refused batch item: %s", exc)
                answers[i] = {"error": str(exc), "part_id": item.part_id}
        results = self._score(uploads, ticket)
        for i, result in zip(positions, results, strict=True):
            answers[i] = _payload(result)
        return [a or {"error": "internal: no answer"} for a in answers]

    @bentoml.api(route="/metadata")
    def metadata(self, ctx: bentoml.Context) -> dict[str, Any]:
        """The served bank: id, threshold, backbone, metrics and lineage; without the admin
        token, no paths, file lists or user names (:func:`serving.redact.public`)."""
        bank = self.bank
        if bank is None:
            ctx.response.status_code = 503  # BentoML takes the status from ctx when one is declared
            return _error(503, f"no bank loaded: {self.load_error}")
        info: dict[str, Any] = {
            "bank_id": bank.bank_id,
            "threshold": bank.manifest.get("threshold"),
            "backbone": bank.manifest.get("backbone"),
            "params": bank.manifest.get("params"),
            "metrics": bank.manifest.get("metrics"),
            "source": str(bank.directory),
        }
        try:
            info["lineage"] = Registry(self.settings.registry).lineage(bank.bank_id)
        except RegistryError as exc:
            packaged = bank.directory / "lineage.json"  # a Bento carries the lineage it was packaged with
            if packaged.is_file():
                info["lineage"] = json.loads(packaged.read_text())
            else:
                info["lineage"] = None
                info["lineage_error"] = str(exc)
        if authorized(ctx.request.headers.get("authorization", ""), self.settings.admin_token):
            return info
        return dict(public(info))

    @bentoml.api(route="/reload")
    def reload(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Switch to the bank the registry now marks as production (admin token required).

        The new bank is loaded and verified before the switch; requests in flight finish
        on the bank they started with, and a bank that fails verification is not served.
        """
        def refuse(status: int, message: str, **extra: Any) -> JSONResponse:
            ctx.response.status_code = status  # BentoML takes the status from ctx when one is declared
            return _error(status, message, **extra)

        expected = self.settings.admin_token
        if expected is None:
            return refuse(403, "reload is disabled: start the service with TRACEBANK_ADMIN_TOKEN set")
        if not authorized(ctx.request.headers.get("authorization", ""), expected):
            return refuse(401, "reload needs the admin token: send 'Authorization: Bearer <token>'")
        with self._reload_lock:
            previous = self.bank.bank_id if self.bank is not None else None
            try:
                fresh = self._load()
            except (BankError, RegistryError, OSError) as exc:
                return refuse(409, f"reload refused, still serving {previous or 'nothing'}: {exc}", bank_id=previous)
            self.bank = fresh
            self.load_error = None
        logger.info("reloaded: %s -> %s", previous, fresh.bank_id)
        return {"bank_id": fresh.bank_id, "previous": previous, "threshold": fresh.threshold}


def _count_request(path: str, status: int) -> None:
    REQUESTS.labels(endpoint=path, status=str(status)).inc()


Inspection.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_request_bytes,
                               paths=("/predict", "/predict_batch"), observe=_count_request,
                               receive_s=SETTINGS.receive_timeout_s, max_concurrency=SETTINGS.max_concurrency)
