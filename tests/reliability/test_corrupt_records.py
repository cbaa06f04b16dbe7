"""Damaged records under a real `bentoml serve` on 127.0.0.1 (issue 29, findings 5, 7 and
part of 12): a production pointer that is not JSON, not a pointer or names another bank, a
model-store manifest without its file list, one changed byte in the registry's copy of the
production bank, and a `kill -9` of the serve process group. The registry is a copy of the
reliability project's (its bank is fitted once for the package), so nothing here damages
what the other tests read; the `tracebank` commands run as a user runs them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.service_support import BIN, TOKEN, Server, env_for
from tests.reliability.test_service_faults import rows_of

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TRUNCATED = '{\n  "bank_id": "6db0116a'  # a pointer cut off mid-write


class Started(Server):
    """A server that is up (``/healthz``) but may not be ready: :meth:`Server.start` waits for
    ``/readyz``, which a service over a damaged registry must not give."""

    def start(self, timeout: float = 240.0, *, interval: float = 1.0, probe: str = "/healthz") -> Started:
        super().start(timeout, interval=interval, probe=probe)
        return self


@pytest.fixture(scope="module")
def damaged(project, tmp_path_factory):
    """A copy of the reliability project (registry and model store) whose PRODUCTION.json is
    cut off mid-write before the service starts; one server for the module."""
    root = tmp_path_factory.mktemp("corrupt")
    for part in ("banks", ".bentoml"):
        shutil.copytree(project["root"] / part, root / part, symlinks=True)
    pointer = root / "banks" / "PRODUCTION.json"
    good = pointer.read_text()
    pointer.write_text(TRUNCATED)
    server = Started(root, TRACEBANK_AUDIT_DB=str(root / "audit.sqlite")).start()
    try:
        yield {"root": root, "server": server, "pointer": pointer, "good_pointer": good, "bank": project["bank"],
               "image": project["good"][0], "db": root / "audit.sqlite"}
    finally:
        server.stop()


@pytest.fixture
def serving(damaged):
    """The module's server serving its bank from a whole registry (whatever an earlier test left)."""
    if damaged["pointer"].read_text() == TRUNCATED:
        damaged["pointer"].write_text(damaged["good_pointer"])
    assert reload(damaged["server"]).status_code == 200
    return damaged


def tracebank(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tracebank"), *args, "--registry", str(root / "banks")], env=env_for(root),
                          capture_output=True, text=True, timeout=300)


def private(text: str, root: Path) -> list[str]:
    """What an anonymous answer must not carry: the project's folders, the test user's home."""
    return [leak for leak in (str(root), "pytest-of", str(Path.home())) if leak in text]


def reload(server: Server) -> httpx.Response:
    return httpx.post(f"{server.url}/reload", json={}, headers=ADMIN, timeout=120)


@contextlib.contextmanager
def changed(path: Path, content: bytes):
    """``path`` holds ``content`` inside the block, its own bytes again after it."""
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        yield
    finally:
        path.write_bytes(original)


def test_a_service_started_over_a_damaged_pointer_says_why_and_serves_once_promote_force_repairs_it(damaged):
    """Finding 5: a pointer cut off mid-write. Before: the service served whatever the log
    said and nobody was told (or, without a log, would not start); now it starts, is not
    ready and says why, and `tracebank promote --force` rewrites the pointer."""
    root, server, bank = damaged["root"], damaged["server"], damaged["bank"]
    ready = httpx.get(f"{server.url}/readyz", timeout=10)
    with httpx.Client() as client:
        refused = server.predict(client, damaged["image"], "over-damaged-pointer")
    assert ready.status_code == 503 and ready.text.startswith("not ready: "), ready.text
    assert "PRODUCTION.json is damaged: not JSON" in ready.text and f"promote --force {bank}" in ready.text
    assert refused.status_code == 503 and "PRODUCTION.json is damaged" in refused.json()["error"]
    assert private(ready.text, root) == [] and private(refused.text, root) == []
    assert not damaged["db"].exists() or rows_of(damaged["db"]) == []

    listed = tracebank(root, "banks")
    assert listed.returncode == 1 and "WARNING: " in listed.stderr and "PRODUCTION.json is damaged" in listed.stderr
    assert f"{bank}  production" in listed.stdout  # the log still says which bank, and the list shows it
    as_json = json.loads(tracebank(root, "banks", "--json").stdout)
    assert as_json["production"] == bank and "PRODUCTION.json is damaged" in as_json["problems"][0]
    lineage = tracebank(root, "lineage", bank)
    assert lineage.returncode == 1 and "WARNING    " in lineage.stdout and "PRODUCTION.json" in lineage.stdout
    unforced = tracebank(root, "promote", bank)
    assert unforced.returncode == 2 and "PRODUCTION.json is damaged" in unforced.stderr

    forced = tracebank(root, "promote", "--force", bank)
    assert forced.returncode == 0, forced.stderr
    assert "production pointer rewritten from the promotion log" in forced.stdout
    log = [json.loads(line) for line in (root / "banks" / "promotions.jsonl").read_text().splitlines()]
    assert (log[-1]["from"], log[-1]["to"], log[-1]["reason"]) == (bank, bank, "repair")
    assert "PRODUCTION.json" in log[-1]["note"] and len(log) == 2
    pointer = json.loads(damaged["pointer"].read_text())
    assert (pointer["bank_id"], pointer["history"], pointer["seq"]) == (bank, [], 1)  # the repair moved no bank
    assert tracebank(root, "banks").returncode == 0
    assert "pointer repaired" in tracebank(root, "lineage", bank).stdout

    reloaded = reload(server)
    assert reloaded.status_code == 200 and reloaded.json()["bank_id"] == bank
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    with httpx.Client() as client:
        assert server.predict(client, damaged["image"], "after-repair").status_code == 200


@pytest.mark.parametrize("text", [TRUNCATED, "[]", '{"history": []}', '{"bank_id": "0123456789abcdef", "seq": 1}'],
                         ids=["truncated", "list", "no bank id", "another bank"])
def test_reload_over_a_damaged_pointer_is_refused_with_the_reason_and_the_loaded_bank_keeps_serving(serving, text):
    """Finding 5: before, `/reload` answered 200 over any of these (the log was read and the
    pointer never checked), 500 where the registry had no log."""
    server, bank = serving["server"], serving["bank"]
    with changed(serving["pointer"], text.encode()), httpx.Client() as client:
        refused = reload(server)
        still = server.predict(client, serving["image"], "beside-damaged-pointer")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"].startswith(f"reload refused, still serving {bank}: PRODUCTION.json ")
    assert f"promote --force {bank}" in refused.json()["error"] and refused.json()["bank_id"] == bank
    assert private(refused.text, serving["root"]) == []
    assert still.status_code == 200 and still.json()["bank_id"] == bank
    assert reload(server).status_code == 200  # the pointer whole again


@pytest.mark.parametrize("edit", ["no files", "list", "not JSON"])
def test_a_malformed_model_store_manifest_is_refused_409_not_500(serving, edit):
    """Finding 5: a store manifest without its `files` gave 500 (KeyError)."""
    server, bank = serving["server"], serving["bank"]
    manifest = serving["root"] / ".bentoml" / "models" / "tracebank-bank" / bank / "manifest.json"
    data = json.loads(manifest.read_text())
    data.pop("files")
    content = {"no files": json.dumps(data), "list": "[]", "not JSON": '{"format": '}[edit]
    with changed(manifest, content.encode()), httpx.Client() as client:
        refused = reload(server)
        still = server.predict(client, serving["image"], "beside-bad-manifest")
    assert refused.status_code == 409, refused.text
    assert "model-store copy tracebank-bank:" in refused.json()["error"] and "manifest.json" in refused.json()["error"]
    assert private(refused.text, serving["root"]) == []
    assert still.status_code == 200 and still.json()["bank_id"] == bank
    assert reload(server).status_code == 200


def test_one_changed_byte_in_the_registry_copy_is_refused_and_shown_corrupt(serving):
    """Finding 7: the service loads the model store's copy, so a changed byte in
    banks/<id>/memory_bank.npy went unnoticed: `/reload` 200, `tracebank banks` and `lineage`
    showed the bank as production without a word."""
    root, server, bank = serving["root"], serving["server"], serving["bank"]
    target = root / "banks" / bank / "memory_bank.npy"
    flipped = bytearray(target.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    with changed(target, bytes(flipped)), httpx.Client() as client:
        refused = reload(server)
        still = server.predict(client, serving["image"], "beside-corrupt-registry-copy")
        listed = tracebank(root, "banks")
        as_json = json.loads(tracebank(root, "banks", "--json").stdout)
        lineage = tracebank(root, "lineage", bank)
    assert refused.status_code == 409, refused.text
    assert f"production bank {bank}'s registry copy" in refused.json()["error"]
    assert "memory_bank.npy sha256 mismatch" in refused.json()["error"]
    assert private(refused.text, root) == []
    assert still.status_code == 200 and still.json()["bank_id"] == bank  # the loaded bank keeps serving
    assert listed.returncode == 1
    assert f"{bank}  CORRUPT: memory_bank.npy sha256 mismatch (production)" in listed.stdout
    assert f"bank {bank} (production) is corrupt: memory_bank.npy sha256 mismatch" in listed.stderr
    assert [row["problem"] for row in as_json["banks"]] == ["memory_bank.npy sha256 mismatch"]
    assert lineage.returncode == 1 and f"bank {bank}  production  CORRUPT" in lineage.stdout
    assert f"WARNING    bank {bank} is corrupt: memory_bank.npy sha256 mismatch" in lineage.stdout
    assert reload(server).status_code == 200  # the byte put back
    assert tracebank(root, "banks").returncode == 0


@pytest.fixture(scope="module")
def malformed(project, tmp_path_factory):
    """Another copy whose model-store manifest has lost its file list, served from a fresh start."""
    root = tmp_path_factory.mktemp("malformed")
    for part in ("banks", ".bentoml"):
        shutil.copytree(project["root"] / part, root / part, symlinks=True)
    manifest = root / ".bentoml" / "models" / "tracebank-bank" / project["bank"] / "manifest.json"
    data = json.loads(manifest.read_text())
    data.pop("files")
    manifest.write_text(json.dumps(data))
    server = Started(root, TRACEBANK_AUDIT_DB=str(root / "audit.sqlite")).start()
    try:
        yield {"root": root, "server": server, "bank": project["bank"], "image": project["good"][0]}
    finally:
        server.stop()


def test_a_fresh_start_over_a_malformed_store_manifest_is_up_and_says_why_it_is_not_ready(malformed):
    """Finding 5: `bentoml serve` exited with "Application startup failed" (a KeyError in the
    worker) and nothing said why."""
    server, bank = malformed["server"], malformed["bank"]
    ready = httpx.get(f"{server.url}/readyz", timeout=10)
    with httpx.Client() as client:
        refused = server.predict(client, malformed["image"], "over-malformed-manifest")
        metadata = client.post(f"{server.url}/metadata", json={}, timeout=30)
    why = (f"model-store copy tracebank-bank:{bank} of production bank {bank} in {bank} is corrupt: "
           "manifest.json lists no files")
    assert ready.status_code == 503 and ready.text.startswith(f"not ready: no bank loaded: {why}"), ready.text
    assert refused.status_code == 503 and why in refused.json()["error"]
    assert metadata.status_code == 503 and why in metadata.json()["error"]
    assert all(private(r.text, malformed["root"]) == [] for r in (ready, refused, metadata))


def test_kill_9_of_the_serve_process_group_leaves_no_worker_answering(malformed):
    """Finding 12 (part): BentoML starts its worker in a session of its own, so a `kill -9`
    of `bentoml serve`'s process group left the worker answering on the port. (Runs last:
    it ends the fixture's server.)"""
    server = malformed["server"]
    assert server.proc is not None
    workers = server.processes()[1:]
    assert workers and all(os.getpgid(w.pid) != server.proc.pid for w in workers)  # the case: another group
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    started = time.monotonic()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    stopped_s = time.monotonic() - started
    for worker in alive:  # leave nothing behind whatever the outcome
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    assert alive == [], f"worker(s) {[w.pid for w in alive]} outlived the server by 30 s"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=5)
    print(f"worker stopped {stopped_s:.1f} s after the kill")
