"""What a user deploys: the Bento exported, and on "another machine" a new virtual environment
built from only the Bento's own requirements, an empty BentoML home, an empty working folder
(no repository, no registry, no Python path), `bentoml serve` of that environment."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipeline.lifecycle.audit import AuditLog
from pipeline.lifecycle.inspection import LoadedBank, check_upload, decide
from pipeline.lifecycle.registry import Registry
from tests.integration.service_support import (
    BIN,
    Server,
    bento_venv,
    bentoml_import,
    build_and_export,
    clean_and_painted,
    fit_and_register,
    machine_environ,
    run,
)

#: What an answer says about a decision, and how an audit row is compared with it.
FIELDS = ("request_id", "part_id", "score", "decision", "threshold", "bank_id")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, mtd_dataset):
    """A production bank built into a Bento, exported, and imported on the other machine
    with the bentoml of a venv holding only the Bento's requirements."""
    root = tmp_path_factory.mktemp("deployment")
    bank_id = fit_and_register(root, "a", limit=40, seed=0)
    run(root, str(BIN / "tracebank"), "promote", bank_id, "--registry", str(root / "banks"))
    archive = root / "tracebank.bento"
    tag = build_and_export(root, archive)
    machine = root / "machine"
    elsewhere = machine / "elsewhere"
    elsewhere.mkdir(parents=True)
    venv = bento_venv(archive, machine / "venv")
    environ = machine_environ(machine / "home", venv)
    bentoml_import(archive, venv, environ, elsewhere)
    good = [Path(s.path) for s in mtd_dataset.test if s.label == 0][:2]
    bad = [Path(s.path) for s in mtd_dataset.test if s.label == 1][:2]
    painted = clean_and_painted(Registry(root / "banks").bank_dir(bank_id), root)
    return {"root": root, "bank_id": bank_id, "tag": tag, "machine": machine, "elsewhere": elsewhere,
            "venv": venv, "environ": environ, "images": [*good, *bad, *painted]}


def serve(deployment: dict, **env: str) -> Server:
    return Server(deployment["machine"], target=deployment["tag"], cwd=deployment["elsewhere"],
                  environ={**deployment["environ"], **env}, bentoml=deployment["venv"] / "bin" / "bentoml")


def library_decisions(deployment: dict, audit: Path) -> list[dict]:
    """The library's decisions on the images, one at a time, with the registry's bank: MTD's
    good and defective test tiles (which this small bank may pass), a clean training tile and
    the same tile painted (anomalous)."""
    bank = LoadedBank(Registry(deployment["root"] / "banks").bank_dir(deployment["bank_id"]))
    log = AuditLog(audit)
    try:
        return [decide(bank, [check_upload(path.read_bytes(), part_id=f"ref-{i}")], log)[0].as_json()
                for i, path in enumerate(deployment["images"])]
    finally:
        log.dispose()


def assert_same_decisions(answers: list[dict], reference: list[dict]) -> None:
    assert [a["decision"] for a in answers] == [r["decision"] for r in reference]
    assert [a["score"] for a in answers] == pytest.approx([r["score"] for r in reference], rel=1e-4)
    assert {(a["threshold"], a["bank_id"]) for a in answers} == {(r["threshold"], r["bank_id"]) for r in reference}


def test_the_bento_serves_from_its_own_requirements_with_the_librarys_decisions(deployment, tmp_path):
    """Served from an environment built only from the Bento's requirements (no torch), the
    answers to good and defective tiles, one by one and concurrent, are the library's, and
    every answer is the audit row the service wrote outside the Bento store."""
    venv = deployment["venv"]
    for module in ("torch", "timm"):
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and f"No module named '{module}'" in proc.stderr, proc.stderr
    reference = library_decisions(deployment, tmp_path / "reference.sqlite")
    assert [r["decision"] for r in reference[-2:]] == ["good", "anomalous"]
    assert {r["bank_id"] for r in reference} == {deployment["bank_id"]}
    images = deployment["images"]
    with contextlib.closing(serve(deployment).start()) as server:
        # the arbiter and its workers run the new environment's Python
        assert all(p.cmdline()[0].startswith(str(venv)) for p in server.processes())
        with httpx.Client() as client:
            one_by_one = [server.predict(client, path, f"seq-{i}") for i, path in enumerate(images)]
            with ThreadPoolExecutor(len(images)) as pool:
                concurrent = list(pool.map(lambda k: server.predict(client, images[k], f"par-{k}"),
                                           range(len(images))))
    answers = [r.json() for r in one_by_one + concurrent]
    assert [r.status_code for r in one_by_one + concurrent] == [200] * len(answers), [r.text for r in one_by_one]
    assert_same_decisions(answers[: len(images)], reference)
    assert_same_decisions(answers[len(images) :], reference)
    audit = deployment["machine"] / "home" / ".local" / "share" / "tracebank" / "audit" / "decisions.sqlite"
    with sqlite3.connect(audit) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(f"SELECT {', '.join(FIELDS)} FROM decisions")]
    assert sorted(rows, key=lambda r: r["part_id"]) == sorted(
        ({f: a[f] for f in FIELDS} for a in answers), key=lambda r: r["part_id"])


def test_the_deployed_bento_writes_its_audit_trail_to_postgresql(deployment, postgres_url):
    """The Bento's requirements carry the PostgreSQL driver: given a database URL, the
    deployed service records each answer there."""
    with contextlib.closing(serve(deployment, TRACEBANK_AUDIT_DB=postgres_url).start()) as server:
        with httpx.Client() as client:
            answers = [server.predict(client, path, f"pg-{i}").json()
                       for i, path in enumerate(deployment["images"][-2:])]
    assert {a["bank_id"] for a in answers} == {deployment["bank_id"]}
    log = AuditLog(postgres_url)
    try:
        rows = [{f: getattr(d, f) for f in FIELDS} for d in log.query()]
    finally:
        log.dispose()
    assert sorted(rows, key=lambda r: r["part_id"]) == [{f: a[f] for f in FIELDS} for a in answers]
