"""Packaging banks into the BentoML model store, with lineage as labels and metadata.

One model-store entry per bank: its tag is ``tracebank-bank:<bank id>``, so packaging a bank
that is already stored changes nothing, and a registered bank's ``model_tag`` never moves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import bentoml
import yaml

from pipeline.lifecycle.integrity import verified_manifest
from pipeline.lifecycle.registry import Registry, RegistryError
from pipeline.patchcore.bank import BankError, read_manifest

MODEL_NAME = "tracebank-bank"


def _label(value: Any) -> str:
    text = str(value)
    return text[:60] if text else "none"


def model_tag_of(bank_id: str) -> str:
    return f"{MODEL_NAME}:{bank_id}"


def stored(tag: str) -> bool:
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True


def save_to_store(bank_dir: str | Path, lineage: dict[str, Any]) -> str:
    """Copy a verified bank (its lineage included) into the BentoML model store; returns
    the model tag. A bank already stored is left as it is.

    Labels carry what one filters on (bank id, data hash, git commit), which never change
    for a bank; its status lives in the registry. Metadata carries the metrics and gates.
    """
    manifest = read_manifest(bank_dir)
    tag = model_tag_of(manifest["bank_id"])
    if stored(tag):
        return tag
    labels = {
        "bank_id": manifest["bank_id"],
        "data_hash": _label(lineage.get("data_hash")),
        "git_commit": _label(lineage.get("git_commit")),
    }
    metadata = {
        "bank_id": manifest["bank_id"],
        "metrics": {k: v for k, v in (lineage.get("metrics") or {}).items() if v is not None},
        "gates_passed": bool((lineage.get("gates") or {}).get("passed")),
        "threshold": (manifest.get("threshold") or {}).get("value"),
    }
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for item in Path(bank_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, Path(model.path) / item.name)
    return str(model.tag)


def package(registry: Registry, bank_id: str) -> str:
    """Store a registered bank in the model store (once) and append a ``packaged`` event with
    its tag to the bank's events (the bank's record itself is never rewritten)."""
    record = registry.lineage(bank_id)
    if record.get("model_tag") and stored(record["model_tag"]):
        return str(record["model_tag"])
    tag = save_to_store(registry.bank_dir(bank_id), record)
    registry.record_packaged(bank_id, tag)
    return tag


def bank_path_in_store(tag: str) -> Path:
    """Directory of a stored bank (``tracebank-bank:TAG`` or ``:latest``)."""
    return Path(bentoml.models.get(tag).path)


def _store_copy(tag: str, what: str, bank_id: str | None = None) -> Path:
    """The directory of model ``tag``, after checking that its manifest is whole, every file
    matches its sha256 and (when given) that it is bank ``bank_id``.

    Raises:
        RegistryError: the model is not in this store (or its record there is unreadable).
        BankError: the stored copy is corrupt or is another bank.
    """
    try:
        path = bank_path_in_store(tag)
    except bentoml.exceptions.NotFound as exc:
        raise RegistryError(f"{what} names model {tag}, which is not in the BentoML model store at "
                            f"{bentoml_home()}; set BENTOML_HOME to the store the pipeline packaged into") from exc
    except bentoml.exceptions.BentoMLException as exc:
        raise RegistryError(f"model {tag} cannot be read from the BentoML model store ({exc}); delete it "
                            f"(`bentoml models delete {tag}`) and package the bank again") from exc
    manifest = verified_manifest(path, f"model-store copy {tag} of {what}")
    if bank_id is not None and manifest.get("bank_id") != bank_id:
        raise BankError(f"model-store copy {tag} of {what} is bank {manifest.get('bank_id')}, not {bank_id}; "
                        f"delete it (`bentoml models delete {tag}`) and package the bank again")
    return path


def bento_file() -> Path | None:
    """``bento.yaml`` of the Bento being served, or None outside a Bento (BentoML imports a
    Bento's service with its ``src`` folder as the working directory)."""
    here = Path.cwd()
    candidate = here.parent / "bento.yaml"
    return candidate if here.name == "src" and candidate.is_file() else None


def bundled_bank_tag() -> str | None:
    """Inside a Bento: the tag of the bank it was built with."""
    path = bento_file()
    if path is None:
        return None
    info = yaml.safe_load(path.read_text()) or {}
    models = [*(info.get("models") or []), *(m for svc in info.get("services") or [] for m in svc.get("models") or [])]
    tags = [str(m["tag"]) for m in models if str(m.get("tag", "")).startswith(f"{MODEL_NAME}:")]
    return tags[0] if tags else None


def declared_bank_tag(registry_root: str | Path, model_tag: str | None = None) -> str | None:
    """The bank the service declares as its BentoML model, so that ``bentoml build`` packs it.

    ``TRACEBANK_MODEL_TAG`` when set, inside a Bento the bank it carries, else the registry's
    production bank; None when that is not in this model store (the service then answers
    503 with the reason instead of failing to start).
    """
    if model_tag:
        tag: str | None = model_tag
    elif (tag := bundled_bank_tag()) is None:
        try:
            registry = Registry(registry_root)
            tag = registry.lineage("production").get("model_tag") if registry.production() else None
        except (RegistryError, OSError, ValueError):
            tag = None
    return tag if tag and stored(tag) else None


def production_bank_dir(registry_root: str | Path, model_tag: str | None = None) -> Path:
    """Where the bank to serve lives: an explicit model-store tag, else the registry's
    production bank as packaged in the model store, else (inside a Bento without a
    registry) the bank the Bento carries.

    Every copy is checked before it is named: the model-store copy to be loaded, and for
    the registry's production bank its registry copy too (the record of what production
    is: a corrupt one means the registry is damaged, even while the store's copy is whole).

    Raises:
        RegistryError: no production bank, the production pointer or the promotion log is
            damaged, or the packaged copy is not in this model store.
        BankError: a copy is corrupt (its manifest is not whole or a file's sha256 differs).
    """
    if model_tag:
        return _store_copy(model_tag, f"TRACEBANK_MODEL_TAG {model_tag}")
    registry = Registry(registry_root)
    production = registry.production()
    if production is None:
        bundled = bundled_bank_tag()
        if bundled is not None:
            return _store_copy(bundled, "the bank this Bento carries")
        raise RegistryError(
            f"no production bank in registry {registry_root}; run the training flow or `tracebank promote BANK`"
        )
    bank_id = production["bank_id"]
    verified_manifest(registry.bank_dir(bank_id), f"production bank {bank_id}'s registry copy")
    tag = registry.lineage(bank_id).get("model_tag")
    if not tag:
        raise RegistryError(
            f"production bank {bank_id} was never packaged into the BentoML model store; "
            "rerun the pipeline's package step for it"
        )
    return _store_copy(str(tag), f"production bank {bank_id}", bank_id)


def data_home() -> Path:
    """Where a service run from a Bento keeps its state (the audit database): never inside
    the Bento store. ``$XDG_DATA_HOME/tracebank``, by default ``~/.local/share/tracebank``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tracebank"


def bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())
