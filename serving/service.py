"""The inspection service: the production memory bank behind HTTP, every decision audited.

Run ``bentoml serve`` in the repository root (``bentofile.yaml`` names this service) and
open http://127.0.0.1:3000 for the Swagger UI. Settings come from the environment:

    TRACEBANK_REGISTRY        registry folder whose production bank is served (``banks``)
    TRACEBANK_MODEL_TAG       serve this model-store tag instead (e.g. inside a Bento)
    TRACEBANK_AUDIT_DB        SQLAlchemy URL or SQLite path (``audit/decisions.sqlite``; in a Bento,
                              relative to ``$XDG_DATA_HOME/tracebank``, never inside the Bento store)
    TRACEBANK_AUDIT_LOCK_S    longest wait for a locked audit database before 503 (5)
    TRACEBANK_AUDIT_MAX_MB    SQLite: largest size of the audit database; when full, 503 as on a full disk
    TRACEBANK_ADMIN_TOKEN     bearer token for ``/reload``; reload is refused when unset
    TRACEBANK_MAX_REQUEST_MB  largest request body, checked before it is read (20)
    TRACEBANK_MAX_PIXELS      largest image in pixels, checked before decoding (40,000,000)
    TRACEBANK_DEVICE          ``cpu`` or ``cuda`` (``cpu``)

Endpoints: ``POST /predict`` (multipart ``image`` + ``part_id``, or JSON with
``image_b64``), ``POST /predict_batch`` (adaptive batching across clients),
``POST /metadata``, ``POST /reload``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageError
from pipeline.lifecycle.audit import AuditError, AuditLog
from pipeline.lifecycle.inspection import InputError, LoadedBank, Result, Upload, check_upload, decide
from pipeline.lifecycle.registry import Registry, RegistryError
from pipeline.patchcore.bank import BankError
from serving.guard import RequestGuard
from serving.redact import authorized, public, scrub
from serving.store import bento_file, data_home, declared_bank_tag, production_bank_dir

logger = logging.getLogger("bentoml.tracebank")

Output = Literal["none", "heatmap", "mask"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Service settings, read once from the environment at start."""

    registry: str = "banks"
    model_tag: str | None = None
    audit_db: str = "audit/decisions.sqlite"
    audit_lock_s: float = 5.0
    audit_max_mb: float | None = None
    admin_token: str | None = None
    max_request_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "cpu"

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        try:
            max_mb = float(env.get("TRACEBANK_MAX_REQUEST_MB", "20"))
            max_pixels = int(env.get("TRACEBANK_MAX_PIXELS", str(DEFAULT_MAX_PIXELS)))
            lock_s = float(env.get("TRACEBANK_AUDIT_LOCK_S", "5"))
            audit_max_mb = float(env["TRACEBANK_AUDIT_MAX_MB"]) if env.get("TRACEBANK_AUDIT_MAX_MB") else None
        except ValueError as exc:
            raise ValueError(
                "TRACEBANK_MAX_REQUEST_MB, TRACEBANK_MAX_PIXELS, TRACEBANK_AUDIT_LOCK_S and TRACEBANK_AUDIT_MAX_MB "
                f"must be numbers: {exc}"
            ) from exc
        return cls(
            registry=env.get("TRACEBANK_REGISTRY", "banks"),
            model_tag=env.get("TRACEBANK_MODEL_TAG") or None,
            audit_db=audit_location(env.get("TRACEBANK_AUDIT_DB") or "audit/decisions.sqlite"),
            audit_lock_s=lock_s,
            audit_max_mb=audit_max_mb,
            admin_token=env.get("TRACEBANK_ADMIN_TOKEN") or None,
            max_request_bytes=int(max_mb * 1024 * 1024),
            max_pixels=max_pixels,
            device=env.get("TRACEBANK_DEVICE", "cpu"),
        )


def audit_location(setting: str) -> str:
    """The audit database: as given, except that inside a Bento (whose ``src`` folder is the
    working directory) a relative path is taken under :func:`serving.store.data_home`."""
    if "://" in setting or Path(setting).is_absolute() or bento_file() is None:
        return setting
    return str(data_home() / setting)


class BatchItem(BaseModel):
    """One image of a batch request."""

    image_b64: str = Field(description="the image file, base64-encoded")
    part_id: str | None = None
    output: Output = "none"


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


@bentoml.service(
    name="tracebank",
    traffic={"timeout": 60, "max_concurrency": 64},
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
        self._predict_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.bank: LoadedBank | None = None
        self.load_error: str | None = None
        try:
            self.bank = self._load()
            logger.info("serving bank %s (threshold %.4f)", self.bank.bank_id, self.bank.threshold)
        except (BankError, RegistryError, OSError) as exc:
            self.load_error = str(exc)
            logger.error("no bank loaded: %s", exc)
        logger.info("audit database: %s", self.audit.location())

    def _load(self) -> LoadedBank:
        directory = production_bank_dir(self.settings.registry, self.settings.model_tag)
        return LoadedBank(directory, device=self.settings.device)

    def __is_ready__(self) -> bool:
        if self.bank is None:
            return False
        try:
            self.audit.check()
        except AuditError as exc:
            logger.warning("not ready: %s", exc)
            return False
        return True

    def _score(self, uploads: list[Upload]) -> list[Result]:
        bank = self.bank  # one reference for the whole request: a reload never mixes banks
        if bank is None:
            raise RegistryError(f"no bank loaded: {self.load_error}")
        with self._predict_lock:
            try:
                results = decide(bank, uploads, self.audit)
            except AuditError:
                AUDIT_FAILURES.inc()
                raise
        for result in results:
            made = result.decision
            DECISIONS.labels(decision=made.decision, bank_id=made.bank_id).inc()
            SCORE_RATIO.labels(bank_id=made.bank_id).observe(made.score / made.threshold)
        return results

    @bentoml.api(route="/predict")
    def predict(
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
        try:
            if (image is None) == (image_b64 is None):
                raise InputError("send exactly one of 'image' (multipart file) or 'image_b64' (JSON)")
            if image is not None:
                data, name, field = image.read_bytes(), "image", "image"
            else:
                data, name, field = _b64(image_b64 or "", "image_b64"), "image_b64", "image_b64"
            upload = check_upload(data, part_id=part_id, output=output, filename=name,
                                  max_pixels=self.settings.max_pixels, received=received)
        except InputError as exc:
            return _error(400, str(exc))
        except ImageError as exc:
            return _error(400, str(exc), field)
        try:
            return _payload(self._score([upload])[0])
        except AuditError as exc:
            return _error(503, f"decision not recorded, so not answered: {exc}; retry later")
        except RegistryError as exc:
            return _error(503, str(exc))

    # max_latency_ms is when BentoML gives up on a queued item (503), not a target: a line
    # would rather wait a few seconds under a burst than lose the decision.
    @bentoml.api(route="/predict_batch", batchable=True, max_batch_size=16, max_latency_ms=30_000)
    def predict_batch(self, items: list[BatchItem]) -> list[dict[str, Any]]:
        """Inspect several parts; concurrent callers share backbone passes (adaptive
        batching). A bad item gets an ``error`` entry of its own, the rest are scored."""
        received = time.perf_counter()
        answers: list[dict[str, Any] | None] = [None] * len(items)
        uploads: list[Upload] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            try:
                data = _b64(item.image_b64, "image_b64")
                uploads.append(check_upload(data, part_id=item.part_id, output=item.output,
                                            filename=f"items[{i}].image_b64", max_pixels=self.settings.max_pixels,
                                            received=received))
                positions.append(i)
            except (InputError, ImageError) as exc:
                logger.warning("refused batch item: %s", exc)
                answers[i] = {"error": str(exc), "part_id": item.part_id}
        try:
            results = self._score(uploads)
        except (AuditError, RegistryError) as exc:
            message = f"decision not recorded, so not answered: {exc}; retry later"
            raise bentoml.exceptions.ServiceUnavailable(message) from exc
        for i, result in zip(positions, results, strict=True):
            answers[i] = _payload(result)
        return [a or {"error": "internal: no answer"} for a in answers]

    @bentoml.api(route="/metadata")
    def metadata(self, ctx: bentoml.Context) -> dict[str, Any]:
        """The served bank: id, threshold, backbone, metrics and lineage; without the admin
        token, no paths, file lists or user names (:func:`serving.redact.public`)."""
        bank = self.bank
        if bank is None:
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
                return refuse(409, f"reload refused, still serving {previous}: {exc}", bank_id=previous)
            self.bank = fresh
            self.load_error = None
        logger.info("reloaded: %s -> %s", previous, fresh.bank_id)
        return {"bank_id": fresh.bank_id, "previous": previous, "threshold": fresh.threshold}


def _count_request(path: str, status: int) -> None:
    REQUESTS.labels(endpoint=path, status=str(status)).inc()


Inspection.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_request_bytes,
                               paths=("/predict", "/predict_batch"), observe=_count_request)
