"""The inspection service, started with `bentoml serve` on 127.0.0.1 and used over HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.lifecycle.registry import Registry
from tests.integration.service_support import (
    BIN,
    TOKEN,
    Server,
    clean_and_painted,
    env_for,
    fit_and_register,
    png,
    run,
    running,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory, mtd_dataset):
    """A registry with two real MTD banks (A in production, B a candidate), packaged."""
    root = tmp_path_factory.mktemp("service")
    bank_a = fit_and_register(root, "a", limit=40, seed=0)
    bank_b = fit_and_register(root, "b", limit=30, seed=1)
    assert bank_a != bank_b
    run(root, str(BIN / "tracebank"), "promote", bank_a, "--registry", str(root / "banks"))
    good = [s.path for s in mtd_dataset.test if s.label == 0][:4]
    bad = [s.path for s in mtd_dataset.test if s.label == 1][:4]
    return {"root": root, "a": bank_a, "b": bank_b, "good": good, "bad": bad}


@pytest.fixture(scope="module")
def server(project):
    with running(project["root"], TRACEBANK_MAX_REQUEST_MB="2") as srv:
        yield srv


def audit_rows(project: Path) -> list[dict]:
    with sqlite3.connect(project / "audit" / "decisions.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM decisions")]


def test_defective_tiles_score_higher_and_answers_are_complete(server, project):
    with httpx.Client() as client:
        good = [server.predict(client, p, f"good-{i}").json() for i, p in enumerate(project["good"])]
        bad = [server.predict(client, p, f"bad-{i}").json() for i, p in enumerate(project["bad"])]
    for answer in good + bad:
        assert set(answer) >= {"score", "decision", "threshold", "bank_id", "request_id", "part_id", "time"}
        assert answer["bank_id"] == project["a"]
        assert answer["decision"] == ("anomalous" if answer["score"] >= answer["threshold"] else "good")
    assert np.mean([a["score"] for a in bad]) > np.mean([a["score"] for a in good])
    assert max(a["score"] for a in bad) > max(a["score"] for a in good)


def test_heatmap_mask_and_base64_json(server, project):
    path = project["bad"][0]
    width, height = Image.open(path).size
    with httpx.Client() as client:
        heat = server.predict(client, path, "p-heat", output="heatmap").json()
        mask = server.predict(client, path, "p-mask", output="mask").json()
        as_json = client.post(f"{server.url}/predict", timeout=60, json={
            "image_b64": base64.b64encode(Path(path).read_bytes()).decode(), "part_id": "p-json"}).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(heat["png_b64"])))
    binary = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png_b64"]))))
    assert overlay.size == (width, height) and overlay.mode == "RGB"
    assert binary.shape == (height, width) and set(np.unique(binary)) <= {0, 255}
    assert as_json["score"] == pytest.approx(heat["score"], rel=1e-5)


def _bad_inputs(good: Path) -> dict[str, dict]:
    """Request keyword arguments for each bad input, with the status it must get."""
    raw = good.read_bytes()
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)) for _ in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")  # 900 Mpx of zeros, a few kB on disk

    def upload(data: bytes, name: str = "x.png", **extra: object) -> dict:
        return {"files": {"image": (name, data, "image/png")}, "data": {"part_id": "bad"}, **extra}

    return {
        "not an image": {**upload(b"this is a text file, not a picture\n" * 4), "status": 400},
        "truncated": {**upload(raw[: len(raw) // 3]), "status": 400},
        "zero bytes": {**upload(b""), "status": 400},
        "animated": {**upload(gif.getvalue(), "a.gif"), "status": 400},
        "1x1": {**upload(png(np.zeros((1, 1), np.uint8))), "status": 400},
        "decompression bomb": {**upload(bomb.getvalue()), "status": 400},
        "over the size limit": {**upload(b"\x89PNG" + bytes(3 * 1024 * 1024)), "status": 413},
        "wrong content type": {"content": raw, "headers": {"content-type": "image/png"}, "status": 415},
        "form without multipart": {"data": {"part_id": "x"}, "status": 415},
        "text instead of a file": {"files": {"image": (None, "http://127.0.0.1:9/x.png")}, "status": 400},
        "no image": {"files": {"part_id": (None, "x")}, "status": 400},
        "bad base64": {"json": {"image_b64": "not base64!"}, "status": 400},
        "bad output": {**upload(raw, output="nope"), "status": 400},
    }


def series(url: str) -> Counter:
    """Every sample of the service's /metrics as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return Counter({(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                    for family in text_string_to_metric_families(text) for sample in family.samples})


def test_bad_inputs_get_4xx_json_and_server_keeps_serving(server, project):
    good = Path(project["good"][0])
    before = len(audit_rows(project["root"]))
    metrics_before = series(server.url)
    statuses = Counter()
    with httpx.Client() as client:
        for case, spec in _bad_inputs(good).items():
            status = spec.pop("status")
            statuses[str(status)] += 1
            if "output" in spec:
                spec["data"]["output"] = spec.pop("output")
            response = client.post(f"{server.url}/predict", timeout=60, **spec)
            assert response.status_code == status, (case, response.status_code, response.text)
            body = response.json()
            assert isinstance(body, dict) and set(body) <= {"error", "field"} and isinstance(body["error"], str), case
            assert "validation error" not in body["error"] and "[type=" not in body["error"], (case, body)
            if case == "bad output":
                assert body["field"] == "output", body
        assert client.get(f"{server.url}/readyz").status_code == 200
        answer = server.predict(client, good, "after-bad")
        assert answer.status_code == 200
    assert len(audit_rows(project["root"])) == before + 1  # refused requests are not decisions
    assert "refused request (415)" in server.log() and "refused request (413)" in server.log()
    # /metrics: every answer counted by status, the one decision by outcome and bank, its score
    grown = series(server.url)
    grown.subtract(metrics_before)
    statuses["200"] += 1
    requests = {dict(k[1])["status"]: v for k, v in grown.items() if k[0] == "tracebank_requests_total" and v}
    assert requests == statuses
    bank, decision = answer.json()["bank_id"], answer.json()["decision"]
    decisions = {k[1]: v for k, v in grown.items() if k[0] == "tracebank_decisions_total" and v}
    assert decisions == {(("bank_id", bank), ("decision", decision)): 1}
    ratio = answer.json()["score"] / answer.json()["threshold"]
    buckets = {float(dict(k[1])["le"]): v for k, v in grown.items() if k[0] == "tracebank_score_threshold_ratio_bucket"}
    assert buckets and all(v == (1 if ratio <= le else 0) for le, v in buckets.items()), (ratio, buckets)


def test_any_text_is_a_part_id_as_the_readme_curl_sends_it(server, project):
    """Form fields are text: `curl -F part_id=4711` must not be refused as "not a string"."""
    good = project["good"][0]
    for text in ("4711", "true", "null", "1e3", "Teil 4711 / Los 7", "[1, 2]"):
        proc = subprocess.run(["curl", "-s", "-F", f"image=@{good}", "-F", f"part_id={text}",
                               f"{server.url}/predict"], capture_output=True, text=True, timeout=120)
        answer = json.loads(proc.stdout)
        assert answer.get("part_id") == text, (text, answer)
    recorded = [r["part_id"] for r in audit_rows(project["root"])[-6:]]
    assert recorded == ["4711", "true", "null", "1e3", "Teil 4711 / Los 7", "[1, 2]"]


def test_other_image_kinds_are_decoded_not_refused(server, project):
    """16-bit, CMYK and palette files are real camera/export formats: converted, then scored."""
    tile = np.asarray(Image.open(project["good"][0]).convert("L"))
    sixteen = png(tile.astype(np.uint16) * 257)
    cmyk = io.BytesIO()
    Image.fromarray(tile).convert("CMYK").save(cmyk, format="JPEG")
    palette = png(np.asarray(Image.fromarray(tile).convert("P")))
    with httpx.Client() as client:
        base = server.predict(client, project["good"][0], "kind-base").json()["score"]
        for name, data in (("16bit.png", sixteen), ("cmyk.jpg", cmyk.getvalue()), ("palette.png", palette)):
            response = client.post(f"{server.url}/predict", timeout=60, data={"part_id": name},
                                   files={"image": (name, data, "application/octet-stream")})
            assert response.status_code == 200, (name, response.text)
            assert response.json()["score"] == pytest.approx(base, rel=0.15), name


def test_batch_endpoint_scores_items_and_isolates_bad_ones(server, project):
    items = [{"image_b64": base64.b64encode(Path(p).read_bytes()).decode(), "part_id": f"batch-{i}"}
             for i, p in enumerate(project["good"][:2] + project["bad"][:1])]
    items.insert(1, {"image_b64": base64.b64encode(b"garbage").decode(), "part_id": "batch-bad"})
    with httpx.Client() as client:
        answers = client.post(f"{server.url}/predict_batch", json={"items": items}, timeout=120).json()
    assert [a.get("part_id") for a in answers] == ["batch-0", "batch-bad", "batch-1", "batch-2"]
    assert "error" in answers[1] and all("score" in a for i, a in enumerate(answers) if i != 1)


def test_eight_clients_for_15s_every_accepted_request_recorded_once(server, project):
    before = {r["request_id"] for r in audit_rows(project["root"])}
    paths = project["good"] + project["bad"]
    stop = time.monotonic() + 15
    outcomes: Counter[str] = Counter()
    ids: list[str] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with httpx.Client() as client:
            i = 0
            while time.monotonic() < stop:
                path = paths[(k + i) % len(paths)]
                if k % 2:
                    response = server.predict(client, path, f"load-{k}-{i}")
                    got = [response.json()] if response.status_code == 200 else []
                else:
                    item = {"image_b64": base64.b64encode(Path(path).read_bytes()).decode(), "part_id": f"load-{k}-{i}"}
                    response = client.post(f"{server.url}/predict_batch", json={"items": [item]}, timeout=120)
                    got = response.json() if response.status_code == 200 else []
                with lock:
                    outcomes[str(response.status_code)] += 1
                    ids.extend(a["request_id"] for a in got)
                i += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client_loop, range(8)))
    assert set(outcomes) == {"200"}, outcomes
    rows = [r for r in audit_rows(project["root"]) if r["request_id"] not in before]
    assert len(ids) == len(set(ids)) and len(ids) > 8
    assert sorted(r["request_id"] for r in rows) == sorted(ids)


def test_reload_switches_bank_without_failed_requests_and_needs_token(server, project):
    root = project["root"]
    answers: list[tuple[int, str | None]] = []
    done = threading.Event()

    def keep_asking() -> None:
        with httpx.Client() as client:
            while not done.is_set():
                response = server.predict(client, project["good"][1], "during-reload")
                answers.append((response.status_code, response.json().get("bank_id")))

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        with httpx.Client() as client:
            assert client.post(f"{server.url}/reload", json={}).status_code == 401
            wrong = client.post(f"{server.url}/reload", json={}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            run(root, str(BIN / "tracebank"), "promote", project["b"], "--registry", str(root / "banks"))
            time.sleep(1.0)
            assert server.predict(client, project["good"][0], "before-reload").json()["bank_id"] == project["a"]
            reloaded = client.post(f"{server.url}/reload", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json() == {"bank_id": project["b"], "previous": project["a"],
                                       "threshold": reloaded.json()["threshold"]}
            time.sleep(1.5)
            after = server.predict(client, project["good"][0], "after-reload").json()
            meta = client.post(f"{server.url}/metadata", json={}).json()
    finally:
        done.set()
        worker.join()
    assert after["bank_id"] == project["b"] and meta["bank_id"] == project["b"]
    assert meta["lineage"]["bank_id"] == project["b"] and meta["lineage"]["data_spec"]
    assert {status for status, _ in answers} == {200}
    assert {bank for _, bank in answers} <= {project["a"], project["b"]} and answers[-1][1] == project["b"]
    assert "reload needs the admin token" in server.log()


def test_audit_cli_answers_which_bank_flagged_a_part(server, project):
    root = project["root"]
    with httpx.Client() as client:
        answer = server.predict(client, project["bad"][2], "part-4711").json()
    common = ["--db", str(root / "audit" / "decisions.sqlite"), "--registry", str(root / "banks")]
    lines = run(root, str(BIN / "tracebank"), "audit", "--part", "part-4711", "--json", *common).splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 1
    row = rows[0]
    assert {k: row[k] for k in ("part_id", "bank_id", "request_id", "decision")} == {
        "part_id": "part-4711", "bank_id": answer["bank_id"], "request_id": answer["request_id"],
        "decision": answer["decision"]}
    assert row["score"] == pytest.approx(answer["score"])
    assert row["lineage"]["model_tag"].startswith("tracebank-bank:") and row["lineage"]["data_spec"]
    by_bank = run(root, str(BIN / "tracebank"), "audit", "--bank", project["a"], *common).splitlines()
    assert by_bank[0].startswith("time,request_id,part_id,bank_id") and len(by_bank) > 10
    assert all(project["a"] in line for line in by_bank[1:])


def test_a_bento_carries_its_bank_to_an_empty_machine(server, project, tmp_path):
    """`bentoml build` packs the production bank; exported, imported into an empty store and
    served from an empty folder, the Bento answers with that bank and keeps its audit
    database outside the Bento store."""
    root = project["root"]
    production = Registry(root / "banks").production()["bank_id"]
    with httpx.Client() as client:
        reference = server.predict(client, project["bad"][0], "reference").json()  # the repository's service
    assert reference["bank_id"] == production
    bentoml = str(BIN / "bentoml")
    tag = run(root, bentoml, "build", "--output", "tag").strip().splitlines()[-1].removeprefix("__tag__:")
    info = json.loads(run(root, bentoml, "get", tag, "-o", "json"))
    assert [m["tag"] for svc in info["services"] for m in svc["models"]] == [f"tracebank-bank:{production}"]
    model = json.loads(run(root, bentoml, "models", "get", f"tracebank-bank:{production}", "-o", "json"))
    assert model["labels"]["bank_id"] == production and {"data_hash", "git_commit"} <= set(model["labels"])
    # packaging a stored bank again changes nothing: one model-store entry per bank id
    stored = json.loads(run(root, bentoml, "models", "list", "-o", "json"))
    again = run(root, sys.executable, "-c", "import sys; from pipeline.lifecycle.registry import Registry; "
                "from serving.store import package; print(package(Registry(sys.argv[1]), 'production'))",
                str(root / "banks")).strip()
    assert again == f"tracebank-bank:{production}" == Registry(root / "banks").lineage(production)["model_tag"]
    assert json.loads(run(root, bentoml, "models", "list", "-o", "json")) == stored
    assert sorted(m["tag"] for m in stored) == sorted(f"tracebank-bank:{b}" for b in (project["a"], project["b"]))
    archive = tmp_path / "tracebank.bento"
    run(root, bentoml, "export", tag, str(archive))

    # another machine: an empty BentoML home, an empty folder, no registry, no repository
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(("TRACEBANK_", "BENTOML_", "PYTHONPATH", "XDG_"))}
    environ.update({"HOME": str(home), "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                    "PATH": f"{BIN}{os.pathsep}{environ['PATH']}"})
    imported = subprocess.run([bentoml, "import", str(archive)], cwd=elsewhere, env=environ, capture_output=True,
                              text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-2000:]
    with contextlib.closing(Server(tmp_path, target=tag, cwd=elsewhere, environ=environ).start()) as srv:
        with httpx.Client() as client:
            answer = srv.predict(client, project["bad"][0], "4711")
            metadata = client.post(f"{srv.url}/metadata", json={}, timeout=60).json()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["bank_id"] == production and body["score"] == pytest.approx(reference["score"], rel=1e-4)
    assert body["decision"] == reference["decision"] and body["threshold"] == reference["threshold"]
    assert metadata["lineage"]["bank_id"] == production and metadata["lineage"]["metrics"]
    audit = home / ".local" / "share" / "tracebank" / "audit" / "decisions.sqlite"
    with sqlite3.connect(audit) as conn:
        assert conn.execute("SELECT bank_id, part_id FROM decisions").fetchall() == [(production, "4711")]
    assert not list((home / "bentoml").rglob("*.sqlite")), "the audit database landed in the Bento store"


def test_a_painted_defect_is_rejected_and_its_clean_tile_passed_by_the_service_and_the_cli(server, project,
                                                                                           tmp_path):
    """The decision's direction, against a case a person can judge: a tile the bank was fitted on
    is good, the same tile with a dark and a bright square painted on it is anomalous, through
    `/predict` and `tracebank predict` alike, at the bank's own threshold."""
    root = project["root"]
    with httpx.Client() as client:  # the bank the service serves now (earlier tests may have promoted another)
        bank = client.post(f"{server.url}/metadata", json={}).json()["bank_id"]
    clean, painted = clean_and_painted(root / "banks" / bank, tmp_path)
    with httpx.Client() as client:
        answers = [server.predict(client, p, f"paint-{i}").json() for i, p in enumerate((clean, painted))]
    assert [a["decision"] for a in answers] == ["good", "anomalous"] and {a["bank_id"] for a in answers} == {bank}
    assert answers[0]["score"] < answers[0]["threshold"] <= answers[1]["score"]
    cli = json.loads(run(root, str(BIN / "tracebank"), "predict", bank, str(clean), str(painted),
                         "--registry", str(root / "banks"), "--json", "--quiet"))
    assert [r["decision"] for r in cli["results"]] == ["good", "anomalous"]
    assert [r["score"] for r in cli["results"]] == pytest.approx([a["score"] for a in answers], rel=1e-4)


def test_promote_and_rollback_with_reload_url_switch_the_running_service(server, project):
    root, registry = project["root"], Registry(project["root"] / "banks")
    cli = [str(BIN / "tracebank")]
    where = ["--registry", str(root / "banks"), "--reload-url", server.url]
    run(root, *cli, "promote", project["b"], "--registry", str(root / "banks"))  # production B, maybe already

    with httpx.Client() as client:
        back = run(root, *cli, "rollback", *where)
        now = registry.production()["bank_id"]
        assert now != project["b"] and f"the service switched: it now serves {now}" in back
        assert server.predict(client, project["good"][0], "after-rollback").json()["bank_id"] == now

        # a service that refuses the reload: the registry moved, the command says the service did not
        refused = subprocess.run([*cli, "promote", project["b"], *where], capture_output=True, text=True,
                                 env=env_for(root, TRACEBANK_ADMIN_TOKEN="wrong"), cwd=root, timeout=300)
        assert refused.returncode == 2
        assert f"production is {project['b']} in the registry, but the service" in refused.stderr
        assert "401" in refused.stderr and registry.production()["bank_id"] == project["b"]
        assert server.predict(client, project["good"][0], "refused").json()["bank_id"] == now

        again = json.loads(run(root, *cli, "rollback", *where, "--json"))
        assert again["bank_id"] == now and again["reload"]["bank_id"] == now
        assert server.predict(client, project["good"][0], "rolled-back").json()["bank_id"] == now


def test_an_anonymous_client_reads_no_path_or_user_name(server, project):
    import getpass

    root = str(project["root"])
    with httpx.Client() as client:
        anonymous = client.post(f"{server.url}/metadata", json={})
        admin = client.post(f"{server.url}/metadata", json={}, headers={"Authorization": f"bearer {TOKEN}"})
        refused = client.post(f"{server.url}/predict", files={"image": ("x.png", b"not an image")},
                              data={"part_id": "p"})
        reloaded = client.post(f"{server.url}/reload", json={}, headers={"Authorization": f"bearer {TOKEN}"})
    assert anonymous.status_code == 200 and anonymous.json()["bank_id"] == admin.json()["bank_id"]
    assert anonymous.json()["metrics"] and anonymous.json()["lineage"]["bank_id"] == admin.json()["bank_id"]
    assert root not in anonymous.text and "/tmp" not in anonymous.text and "/work" not in anonymous.text
    assert '"promoted_by"' not in anonymous.text and f'"{getpass.getuser()}"' not in anonymous.text
    assert admin.json()["source"].startswith(root)  # the operator with the token sees where it lives
    assert refused.status_code == 400 and root not in refused.text
    assert reloaded.status_code == 200  # the scheme is case-insensitive (RFC 7235)


def test_a_form_is_taken_only_as_the_fields_it_declares(server, project):
    """Issue 29, findings 1, 8 and 12: a field name that smuggles in a second ``name=``, a
    300-character file name and an upload under another field name."""
    import socket

    image = Path(project["good"][0]).read_bytes()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(3)
    bait = f"http://127.0.0.1:{listener.getsockname()[1]}/bait.png"
    boundary = "tracebankboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="x\\"; name=\\"image"\r\n\r\n{bait}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="part_id"\r\n\r\nsmuggled\r\n'
            f"--{boundary}--\r\n").encode()
    with httpx.Client(timeout=60) as client:
        smuggled = client.post(f"{server.url}/predict", content=body,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing came to fetch the bait
        listener.close()
        long_name = client.post(f"{server.url}/predict", files={"image": ("a" * 300 + ".png", image, "image/png")},
                                data={"part_id": "long-name"})
        other_field = client.post(f"{server.url}/predict", files={"file": ("tile.png", image, "image/png")},
                                  data={"part_id": "other-field"})
    assert smuggled.status_code == 400 and "unknown form field" in smuggled.json()["error"]
    assert long_name.status_code == 200 and long_name.json()["bank_id"]
    assert other_field.status_code == 400 and other_field.json()["field"] == "file"
