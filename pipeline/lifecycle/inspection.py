"""Inspecting one part: bytes in, a recorded decision out.

This is what the service does per request, kept free of any web framework so the CLI,
tests and benchmarks run exactly the same steps: decode and check the upload, score it
with the bank, compare with the bank's threshold, record the decision, answer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from pipeline.evaluation.overlay import binary_mask, heatmap_overlay, png_bytes
from pipeline.patchcore.bank import BankError, load_bank

from .audit import AuditLog, Decision

#: What a caller may ask for besides the score.
OUTPUTS = ("none", "heatmap", "mask")
#: Longest accepted part id (characters).
MAX_PART_ID = 256


class InputError(ValueError):
    """A request field other than the image is unusable; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Upload:
    """A decoded, checked upload waiting to be scored.

    Attributes:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8.
        sha256: hash of the bytes as received.
        part_id: the client's identifier, or None.
        output: one of :data:`OUTPUTS`.
        received: ``time.perf_counter()`` when the bytes arrived, for the latency figure.
    """

    image: np.ndarray
    sha256: str
    part_id: str | None
    output: str
    received: float


@dataclasses.dataclass(frozen=True)
class Result:
    """A recorded decision and, when asked for, its picture (PNG bytes)."""

    decision: Decision
    picture: bytes | None

    def as_json(self) -> dict[str, Any]:
        row = self.decision.as_json()
        return {
            "request_id": row["request_id"],
            "part_id": row["part_id"],
            "score": row["score"],
            "decision": row["decision"],
            "threshold": row["threshold"],
            "bank_id": row["bank_id"],
            "time": row["time"],
            "latency_ms": row["latency_ms"],
        }


class LoadedBank:
    """A verified bank ready to decide: model, manifest and threshold.

    Raises:
        BankError: when a hash does not match or the bank has no decision threshold.
    """

    def __init__(self, directory: str | Path, *, device: str | None = None) -> None:
        self.model, self.manifest = load_bank(directory, device=device)
        threshold = (self.manifest.get("threshold") or {}).get("value")
        if threshold is None:
            raise BankError(
                f"bank {self.manifest['bank_id']} in {directory} has no decision threshold; register it with "
                "`tracebank register BANK_DIR --data SPEC`, which evaluates it and sets one"
            )
        self.threshold = float(threshold)
        self.bank_id: str = self.manifest["bank_id"]
        self.directory = Path(directory)


def check_upload(
    data: bytes,
    *,
    part_id: str | None = None,
    output: str = "none",
    filename: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    received: float | None = None,
) -> Upload:
    """Validate every field of a request before any scoring.

    Raises:
        ImageError: the bytes are not a usable image (the message says why).
        InputError: ``part_id`` or ``output`` is malformed.
    """
    if output not in OUTPUTS:
        raise InputError(f"field 'output' must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if part_id is not None:
        part_id = part_id.strip() or None
    if part_id is not None and (len(part_id) > MAX_PART_ID or not part_id.isprintable()):
        raise InputError(f"field 'part_id' must be printable text of at most {MAX_PART_ID} characters")
    image = decode_image(data, source=filename, max_pixels=max_pixels)
    return Upload(image, hashlib.sha256(data).hexdigest(), part_id, output,
                  time.perf_counter() if received is None else received)


def decide(bank: LoadedBank, uploads: Sequence[Upload], audit: AuditLog) -> list[Result]:
    """Score checked uploads in one batch, record each decision, and return them.

    The decisions are committed to ``audit`` in one transaction before they are returned;
    an :class:`~pipeline.lifecycle.audit.AuditError` propagates (and nothing of the batch is
    recorded) so the caller refuses the requests.
    """
    if not uploads:
        return []
    want_maps = any(u.output != "none" for u in uploads)
    prediction = bank.model.predict([u.image for u in uploads], maps=want_maps)
    results: list[Result] = []
    for i, upload in enumerate(uploads):
        score = float(prediction.scores[i])
        picture = None
        if upload.output == "heatmap":
            picture = png_bytes(heatmap_overlay(upload.image, prediction.maps[i], bank.threshold))
        elif upload.output == "mask":
            picture = png_bytes(binary_mask(prediction.maps[i], bank.threshold))
        decision = Decision(
            request_id=uuid.uuid4().hex,
            time=dt.datetime.now(dt.UTC),
            part_id=upload.part_id,
            input_sha256=upload.sha256,
            width=int(upload.image.shape[1]),
            height=int(upload.image.shape[0]),
            score=score,
            decision="anomalous" if score >= bank.threshold else "good",
            threshold=bank.threshold,
            bank_id=bank.bank_id,
            latency_ms=round((time.perf_counter() - upload.received) * 1000.0, 3),
        )
        results.append(Result(decision, picture))
    audit.record_many([r.decision for r in results])
    return results


__all__ = ["OUTPUTS", "InputError", "ImageError", "LoadedBank", "Result", "Upload", "check_upload", "decide"]
