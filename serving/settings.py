"""The inspection service's settings, read once from the environment at start:

    TRACEBANK_REGISTRY        registry folder whose production bank is served (``banks``)
    TRACEBANK_MODEL_TAG       serve this model-store tag instead (e.g. inside a Bento)
    TRACEBANK_AUDIT_DB        SQLAlchemy URL or SQLite path (``audit/decisions.sqlite``; in a Bento,
                              relative to ``$XDG_DATA_HOME/tracebank``, never inside the Bento store)
    TRACEBANK_AUDIT_LOCK_S    longest wait for a locked audit database before 503 (5)
    TRACEBANK_AUDIT_MAX_MB    SQLite: largest size of the audit database; when full, 503 as on a full disk
    TRACEBANK_ADMIN_TOKEN     bearer token for ``/reload``; reload is refused when unset
    TRACEBANK_MAX_REQUEST_MB  largest request body, checked before it is read (20)
    TRACEBANK_MAX_PIXELS      largest image in pixels, checked before decoding (40,000,000)
    TRACEBANK_MAX_MAP_PIXELS  largest image for ``output=heatmap`` or ``mask``; larger gets 422 (4,194,304)
    TRACEBANK_REQUEST_TIMEOUT_S  longest time from a request's arrival to its answer; past it 503,
                              and nothing recorded (30)
    TRACEBANK_RECEIVE_TIMEOUT_S  longest time a request body may take to arrive; past it 408 (10)
    TRACEBANK_MAX_CONCURRENCY requests in progress at once, counted once their body is complete (64)
    TRACEBANK_DEVICE          ``cpu`` or ``cuda`` (``cpu``)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipeline.data.images import DEFAULT_MAX_PIXELS
from serving.store import bento_file, data_home

#: Default pixel budget of a heatmap or mask: a 2048 x 2048 image (measured on a shared 2-core
#: machine: 2.2 s, 0.3 GB and a 16 MB PNG for a noisy one, against 0.1 s for its score alone;
#: the map's cost grows with the image's pixels, the score's hardly does).
DEFAULT_MAX_MAP_PIXELS = 2048 * 2048


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
    max_map_pixels: int = DEFAULT_MAX_MAP_PIXELS
    request_timeout_s: float = 30.0
    receive_timeout_s: float = 10.0
    max_concurrency: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        limits = {"TRACEBANK_MAX_MAP_PIXELS": self.max_map_pixels,
                  "TRACEBANK_REQUEST_TIMEOUT_S": self.request_timeout_s,
                  "TRACEBANK_RECEIVE_TIMEOUT_S": self.receive_timeout_s,
                  "TRACEBANK_MAX_CONCURRENCY": self.max_concurrency}
        wrong = [f"{name}={value:g}" for name, value in limits.items() if not value > 0]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: must be positive")

    @property
    def server_timeout_s(self) -> float:
        """BentoML's own limit on a request (504 past it), kept above the request timeout plus
        the longest audit write, so it never cuts off an answer whose decision was recorded."""
        return max(60.0, self.request_timeout_s + self.audit_lock_s + 10.0)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        try:
            max_mb = float(env.get("TRACEBANK_MAX_REQUEST_MB", "20"))
            max_pixels = int(env.get("TRACEBANK_MAX_PIXELS", str(DEFAULT_MAX_PIXELS)))
            max_map_pixels = int(env.get("TRACEBANK_MAX_MAP_PIXELS", str(DEFAULT_MAX_MAP_PIXELS)))
            lock_s = float(env.get("TRACEBANK_AUDIT_LOCK_S", "5"))
            audit_max_mb = float(env["TRACEBANK_AUDIT_MAX_MB"]) if env.get("TRACEBANK_AUDIT_MAX_MB") else None
            request_s = float(env.get("TRACEBANK_REQUEST_TIMEOUT_S", "30"))
            receive_s = float(env.get("TRACEBANK_RECEIVE_TIMEOUT_S", "10"))
            concurrency = int(env.get("TRACEBANK_MAX_CONCURRENCY", "64"))
        except ValueError as exc:
            raise ValueError(
                "TRACEBANK_MAX_REQUEST_MB, TRACEBANK_MAX_PIXELS, TRACEBANK_MAX_MAP_PIXELS, TRACEBANK_AUDIT_LOCK_S, "
                "TRACEBANK_AUDIT_MAX_MB, TRACEBANK_REQUEST_TIMEOUT_S, TRACEBANK_RECEIVE_TIMEOUT_S and "
                f"TRACEBANK_MAX_CONCURRENCY must be numbers: {exc}"
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
            max_map_pixels=max_map_pixels,
            request_timeout_s=request_s,
            receive_timeout_s=receive_s,
            max_concurrency=concurrency,
            device=env.get("TRACEBANK_DEVICE", "cpu"),
        )


def audit_location(setting: str) -> str:
    """The audit database: as given, except that inside a Bento (whose ``src`` folder is the
    working directory) a relative path is taken under :func:`serving.store.data_home`."""
    if "://" in setting or Path(setting).is_absolute() or bento_file() is None:
        return setting
    return str(data_home() / setting)
