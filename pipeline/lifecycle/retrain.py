"""Retraining when new good images arrive: extend the production bank, or refit it.

Extending (:func:`pipeline.lifecycle.fitting.extend_bank`) extracts only the new images and
continues the greedy k-center from the production bank's centres. It gives the bank a full
refit would give only while nothing else changed, so :func:`choose_fit` refits whenever the
feature, coreset or scoring settings or the data spec differ from production's, when an
image the production bank was fitted on is gone, on request, and after
``retrain.max_increments`` extensions in a row.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError
from pipeline.data.datasets import Dataset
from pipeline.hashing import sha256_file

from .registry import Registry

if TYPE_CHECKING:
    from .steps import Params


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """When a retraining run may extend the production bank instead of refitting.

    Attributes:
        incremental: extend when nothing but the good images changed.
        max_increments: refit after this many extensions in a row (each one is exact for
            the greedy k-center from its start, but the start drifts from a full fit's).
        git_commit: after ``dvc add``, commit ``data.dvc`` and ``dvc.lock`` (only those), so
            the commit a bank records holds the pointer to its exact training data.
    """

    incremental: bool = True
    max_increments: int = 5
    git_commit: bool = False

    def __post_init__(self) -> None:
        if self.max_increments < 0:
            raise ConfigError(f"retrain.max_increments must be >= 0, got {self.max_increments}")


#: The params sections whose change makes an extension differ from a refit.
FIT_SECTIONS = ("features", "coreset", "scoring")


def choose_fit(params: Params, registry: Registry, dataset: Dataset, *, full: bool = False) -> dict[str, Any]:
    """Decide how to fit the next candidate.

    Returns:
        ``{"fit": "full" | "incremental", "reason": str}``, with ``"parent"`` (the production
        bank id) and ``"new_images"`` for an extension.
    """
    def refit(reason: str) -> dict[str, Any]:
        return {"fit": "full", "reason": reason}

    if full:
        return refit("a full refit was requested")
    if not params.retrain.incremental:
        return refit("retrain.incremental is false")
    pointer = registry.production()
    if pointer is None:
        return refit("there is no production bank to extend")
    lineage = registry.lineage("production")
    current = params.as_dict()
    changed = [name for name in FIT_SECTIONS if (lineage.get("params") or {}).get(name) != current[name]]
    if changed:
        return refit(f"params changed since production: {', '.join(changed)}")
    if lineage.get("data_spec") != params.data:
        return refit(f"the data spec changed from {lineage.get('data_spec')} to {params.data}")
    training = (lineage.get("fit") or {})
    if int(training.get("increments") or 0) >= params.retrain.max_increments:
        return refit(f"production is already {training.get('increments')} extension(s) from a full fit "
                     f"(retrain.max_increments {params.retrain.max_increments})")
    known = {f["sha256"] for f in lineage.get("files") or []}
    present = {sha256_file(s.path) for s in dataset.train}
    if not known <= present:
        return refit(f"{len(known - present)} image(s) the production bank was fitted on are gone")
    new = len(present - known)
    if new == 0:
        return refit("no new training image")
    return {"fit": "incremental", "reason": f"{new} new good image(s), settings unchanged",
            "parent": pointer["bank_id"], "new_images": new}


def extend_step(params: Params, work: Path, registry: Registry, dataset: Dataset, parent: str) -> dict[str, Any]:
    """Extend bank ``parent`` with ``dataset``'s new training images into ``work/candidate``."""
    from .fitting import extend_bank

    start = time.perf_counter()
    target = work / "candidate"
    shutil.rmtree(target, ignore_errors=True)
    result = extend_bank(registry.bank_dir(parent), params.data, target, batch_size=params.batch_size,
                         evaluate_after=False, dataset=dataset)
    return {key: result[key] for key in ("bank_id", "bank_size", "parent_bank", "n_added", "n_extracted",
                                         "increments", "timings")} | {"seconds": time.perf_counter() - start}


def already_made(registry: Registry, data_hash: str | None, params: Params) -> dict[str, Any] | None:
    """The registered bank this run would make again, or None.

    A run whose data hash and params equal those of a registered bank (production, candidate
    or rejected, at registration or at a later evaluation) would extract the same features and
    reach the same verdict, so a scheduled run skips it. Returns ``{"bank_id", "status",
    "decision"}`` with the decision in words: which bank it is and why it is not production.
    """
    bank_id = registry.find(data_hash, params.as_dict())
    if bank_id is None:
        return None
    status = registry.status(bank_id)
    why = {
        "production": "it is the production bank",
        "candidate": "its gates passed but it was not promoted (promote it with `tracebank promote`)",
        "rolled back": "it was rolled back from production",
        "retired": "it was production before and was replaced",
    }.get(status)
    if why is None:
        failures = registry.verdict(bank_id).get("failures") or ["its gates failed"]
        why = "its gates failed: " + "; ".join(failures)
    decision = (f"data (hash {data_hash}) and params unchanged since bank {bank_id} ({status}): nothing "
                f"extracted, not retrained; {why}. Add images or change params.yaml to train again, "
                "or pass --full to refit anyway")
    return {"bank_id": bank_id, "status": status, "decision": decision}
