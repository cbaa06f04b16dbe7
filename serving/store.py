"""Packaging banks into the BentoML model store, with lineage as labels and metadata."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import bentoml

from pipeline.lifecycle.registry import Registry, RegistryError
from pipeline.patchcore.bank import read_manifest

MODEL_NAME = "tracebank-bank"


def _label(value: Any) -> str:
    text = str(value)
    return text[:60] if text else "none"


def save_to_store(bank_dir: str | Path, lineage: dict[str, Any]) -> str:
    """Copy a verified bank into the BentoML model store; returns the model tag.

    Labels carry what one filters on (bank id, status, data hash, git commit); metadata
    carries the metrics and gate results.
    """
    manifest = read_manifest(bank_dir)
    labels = {
        "bank_id": manifest["bank_id"],
        "status": _label(lineage.get("status")),
        "data_hash": _label(lineage.get("data_hash")),
        "git_commit": _label(lineage.get("git_commit")),
    }
    metadata = {
        "bank_id": manifest["bank_id"],
        "metrics": {k: v for k, v in (lineage.get("metrics") or {}).items() if v is not None},
        "gates_passed": bool((lineage.get("gates") or {}).get("passed")),
        "threshold": (manifest.get("threshold") or {}).get("value"),
    }
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as model:
        for item in Path(bank_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, Path(model.path) / item.name)
    return str(model.tag)


def bank_path_in_store(tag: str) -> Path:
    """Directory of a stored bank (``tracebank-bank:TAG`` or ``:latest``)."""
    return Path(bentoml.models.get(tag).path)


def production_bank_dir(registry_root: str | Path, model_tag: str | None = None) -> Path:
    """Where the bank to serve lives: an explicit model-store tag, else the registry's
    production bank as packaged in the model store.

    Raises:
        RegistryError: no production bank, or its packaged copy is not in this model store.
    """
    if model_tag:
        try:
            return bank_path_in_store(model_tag)
        except bentoml.exceptions.NotFound as exc:
            raise RegistryError(f"model {model_tag} is not in the BentoML model store ({exc})") from exc
    registry = Registry(registry_root)
    production = registry.production()
    if production is None:
        raise RegistryError(
            f"no production bank in registry {registry_root}; run the training flow or `tracebank promote BANK`"
        )
    record = registry.lineage(production["bank_id"])
    tag = record.get("model_tag")
    if not tag:
        raise RegistryError(
            f"production bank {production['bank_id']} was never packaged into the BentoML model store; "
            "rerun the pipeline's package step for it"
        )
    try:
        return bank_path_in_store(tag)
    except bentoml.exceptions.NotFound as exc:
        raise RegistryError(
            f"production bank {production['bank_id']} names model {tag}, which is not in the BentoML model store "
            f"at {bentoml_home()}; set BENTOML_HOME to the store the pipeline packaged into"
        ) from exc


def bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())
