"""A bank's record never changes after the fact, and a bank can be rebuilt from it.

One project, trained by the Prefect flow on 24 + 24 ELPV cells, then used as a line would use
it: the flow run again on the same data, then with a stricter gate, then a retrain that its
gates reject followed by a scheduled run, then two inbox runs; the first bank's data restored
from the DVC cache and fitted again in another project.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_pipeline import BIN, make_project, production, run


def _tree_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _flow(project: Path, params_file: str = "params.yaml", work_dir: str = "runs/flow",
          name: str = "train") -> dict:
    code = (f"import asyncio, inspect, json; from flows.train import {name}; "
            f"out = {name}(params_file={params_file!r}, work_dir={work_dir!r}); "
            "out = asyncio.run(out) if inspect.iscoroutine(out) else out; "  # retrain_if_changed is async
            "print(json.dumps(out, default=str))")
    return json.loads(run(project, sys.executable, "-c", code).stdout.strip().splitlines()[-1])


def _params_with(project: Path, name: str, **sections: dict) -> str:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, values in sections.items():
        params[key] = dict(params[key], **values)
    (project / name).write_text(yaml.safe_dump(params))
    return name


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    project = make_project(root / "line")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["retrain"]["git_commit"] = True  # the flow commits data.dvc after `dvc add`
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    first = _flow(project)
    assert first["status"] == "production"
    return root, project, first["bank_id"]


def test_reruns_and_a_stricter_gate_leave_every_file_of_the_production_bank_as_it_was(line):
    _, project, first = line
    folder = project / "banks" / first
    before = _tree_sha256(folder)
    assert "lineage.json" in before and "manifest.json" in before

    again = _flow(project)  # the same data and params: the same bank, evaluated once more
    assert again["bank_id"] == first and production(project) == first
    strict = _params_with(project, "params-strict.yaml", gates={"image_auroc_min": 0.999})
    rejected = _flow(project, strict)
    assert rejected["bank_id"] == first and rejected["gates"]["failures"]  # this very bank failed it
    assert production(project) == first

    assert _tree_sha256(folder) == before  # every file, byte for byte
    # its report was kept with it, as its record hashed it, though each rerun wrote a new one in runs/
    kept = json.loads((folder / "lineage.json").read_text())["report"]
    assert kept["path"] == "report/report.html" and kept["sha256"]
    assert kept["sha256"] == {name: sha for name, sha in before.items() if name.startswith("report/")}
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", "production", "--json").stdout)
    assert lineage["bank_id"] == first and lineage["status"] == "production"
    assert lineage["gates"]["passed"]  # the record as registered
    later = lineage["evaluations"]
    assert [e["gates_passed"] for e in later] == [True, False]
    assert all(e["data_hash"] == lineage["data_hash"] for e in later)
    assert any("image_auroc" in f for f in later[1]["gates"]["failures"])
    # the bank's commit holds the data pointer it was trained from
    pointer = yaml.safe_load(run(project, "git", "show", f"{lineage['git_commit']}:data.dvc").stdout)
    assert pointer["outs"][0]["md5"] == lineage["data_hash"] and lineage["data_hash_kind"] == "dvc-md5"
    text = run(project, str(BIN / "tracebank"), "lineage", "production").stdout
    assert text.count("evaluated") >= 2
    promote = run(project, str(BIN / "tracebank"), "promote", first)
    assert "nothing changed" in promote.stdout and production(project) == first


def test_a_scheduled_run_after_a_rejected_retrain_extracts_nothing_and_says_why(line):
    _, project, first = line
    # another coreset makes a bank of its own; the stricter gate rejects it
    strict = _params_with(project, "params-rejected.yaml", gates={"image_auroc_min": 0.999},
                          coreset={"ratio": 0.04})
    start = time.perf_counter()
    rejected = _flow(project, strict, work_dir="runs/rejected")
    fit_s = time.perf_counter() - start
    assert rejected["status"] == "rejected" and rejected["bank_id"] != first
    assert production(project) == first

    start = time.perf_counter()
    skipped = _flow(project, strict, work_dir="runs/skipped", name="retrain_if_changed")
    skip_s = time.perf_counter() - start
    assert skipped["retrained"] is False and skipped["bank_id"] == rejected["bank_id"]
    assert f"bank {rejected['bank_id']} (rejected)" in skipped["decision"]
    assert "nothing extracted" in skipped["decision"] and "image_auroc" in skipped["decision"]
    assert not (project / "runs" / "skipped").exists()  # no features, no evaluation
    assert production(project) == first
    print(f"rejected retrain {fit_s:.1f} s, the scheduled run after it {skip_s:.1f} s "
          f"(both including interpreter and Prefect start)")


def test_the_first_bank_rebuilt_from_its_restored_data_after_two_inbox_runs(line, elpv_mono):
    root, project, first = line
    assert production(project) == first
    imported = {p.name.split("_", 1)[1] for p in (project / "data" / "train" / "good").iterdir()}
    fresh = [Path(s.path) for s in elpv_mono.train if Path(s.path).name not in imported][:6]
    banks = [first]
    for batch in (fresh[:3], fresh[3:]):
        inbox = root / f"inbox-{len(banks)}"
        inbox.mkdir()
        for path in batch:
            shutil.copy(path, inbox / path.name)
        run(project, sys.executable, "-m", "flows.train", "--inbox", str(inbox))
        banks.append(production(project))
    assert len(set(banks)) == 3  # each inbox run made and promoted a bank of its own

    record = json.loads(run(project, str(BIN / "tracebank"), "lineage", first, "--json").stdout)
    refit = root / "refit"
    refit.mkdir()
    run(refit, "git", "init", "-q")
    run(refit, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    run(refit, str(BIN / "dvc"), "init", "-q")
    restored = json.loads(run(project, str(BIN / "tracebank"), "data", "restore", first, "--to",
                              str(refit / "data"), "--json").stdout)
    assert restored["data_hash"] == record["data_hash"]
    contents = _tree_sha256(refit / "data")
    assert restored["files"] == len(contents) and len(contents) >= 48  # 24 + 24 cells, and the rest of data/
    assert {f["sha256"] for f in record["files"]} <= set(contents.values())  # every image the bank holds
    assert not {f["sha256"] for f in json.loads(run(project, str(BIN / "tracebank"), "lineage", banks[2],
                                                    "--json").stdout)["added_files"]} & set(contents.values())
    (refit / "params.yaml").write_text(yaml.safe_dump(record["params"]))
    out = run(refit, sys.executable, "-m", "flows.train")
    assert production(refit) == first, out.stdout  # the same data and params: the same bank
    again = json.loads(run(refit, str(BIN / "tracebank"), "lineage", first, "--json").stdout)
    assert again["data_hash"] == record["data_hash"]  # DVC hashes the restored folder alike

    # a bank whose data hash is not in the cache says which hash is missing
    shutil.rmtree(project / ".dvc" / "cache")
    missing = run(project, str(BIN / "tracebank"), "data", "restore", first, "--to", str(root / "gone"),
                  check=False)
    assert missing.returncode != 0 and record["data_hash"].removesuffix(".dir") in missing.stderr
    assert not (root / "gone").exists()
