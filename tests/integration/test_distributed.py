"""A fit on a real Dask cluster (`dask scheduler` + 2 `dask worker` processes) through
prefect-dask ends as a local fit does: evaluated, calibrated, registered with its lineage,
promotable and served; and its bank is the one a single machine would fit."""

from __future__ import annotations

import json
import os
import sys

import httpx
import numpy as np
import yaml
from scipy.stats import spearmanr

from pipeline.data.datasets import load_images, open_dataset
from pipeline.lifecycle.registry import Registry
from pipeline.patchcore.bank import load_bank
from pipeline.patchcore.coreset import coreset_size
from tests.integration.service_support import free_port
from tests.integration.test_daily_loop import _process, _wait
from tests.integration.test_pipeline import BIN, _env, make_project, run


def test_a_fit_on_a_dask_cluster_is_registered_promoted_and_matches_one_machine(tmp_path):
    project = make_project(tmp_path / "dask")
    # compare with `tracebank fit` on all 24 images: no calibration split held out here
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["threshold"]["calibration"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    api = os.environ["PREFECT_API_URL"]  # the run's Prefect server (tests/conftest.py)
    scheduler = f"tcp://127.0.0.1:{free_port()}"
    env = _env(project)
    logs = tmp_path / "logs"
    logs.mkdir()
    with _process([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", scheduler.rsplit(":", 1)[1],
                   "--no-dashboard"], project, env, logs / "scheduler.log"), \
            _process([str(BIN / "dask"), "worker", scheduler, "--nthreads", "1", "--no-dashboard"], project, env,
                     logs / "worker-1.log"), \
            _process([str(BIN / "dask"), "worker", scheduler, "--nthreads", "1", "--no-dashboard"], project, env,
                     logs / "worker-2.log"):

        def two_workers() -> bool:
            from distributed import Client

            with Client(scheduler, timeout=10) as client:
                return len(client.scheduler_info()["workers"]) == 2

        _wait("two Dask workers", two_workers, 120, logs / "worker-2.log")
        proc = run(project, sys.executable, "-m", "flows.distributed", "--address", scheduler, "--shards", "2",
                   env=env)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    flow_run = httpx.post(f"{api}/flow_runs/filter", json={
        "flows": {"name": {"any_": ["tracebank-fit-distributed"]}}, "sort": "START_TIME_DESC", "limit": 1},
        timeout=10).json()[0]
    this_run = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}, "limit": 200}
    runs = httpx.post(f"{api}/task_runs/filter", json=this_run, timeout=10).json()
    task_logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}},
                                                       "limit": 200}, timeout=10).json()

    registry = Registry(project / "banks")
    lineage = registry.lineage(result["bank_id"])
    assert result["status"] == lineage["status"] == "candidate", result
    assert lineage["distributed"] | {"scheduler": scheduler, "workers": 2, "shards": 2} == lineage["distributed"]
    assert lineage["threshold"]["value"] > 0 and lineage["metrics"]["image_auroc"] >= 0.5
    assert lineage["model_tag"] == f"tracebank-bank:{result['bank_id']}"
    assert sorted(r["name"].split("-")[0] for r in runs if r["state_type"] == "COMPLETED") == [
        "extract_shard", "extract_shard", "select_shard", "select_shard"]
    assert any("shard-1: 12/12 images extracted" in entry["message"] for entry in task_logs)
    assert not list((project / "runs" / "distributed").glob("shard-*")), "shard files left behind"

    run(project, str(BIN / "tracebank"), "promote", result["bank_id"], "--registry", str(project / "banks"))
    test = open_dataset(f"mvtec:{project / 'data'}").test
    predicted = json.loads(run(project, str(BIN / "tracebank"), "predict", "production", test[0].path,
                               "--registry", str(project / "banks"), "--json").stdout)
    assert predicted["bank_id"] == result["bank_id"] and predicted["results"][0]["decision"] in ("anomalous", "good")

    single = json.loads(run(project, str(BIN / "tracebank"), "fit", "--data", "mvtec:data", "--out", "runs/one-bank",
                            "--ratio", "0.05", "--no-evaluate", "--json", "--quiet").stdout)
    dask_model, manifest = load_bank(project / "banks" / result["bank_id"])  # hashes verified
    one_model, _ = load_bank(project / "runs" / "one-bank")
    assert manifest["training"]["n_images"] == 24
    assert result["bank_size"] == coreset_size(result["rows"], 0.05) == single["bank_size"]
    images = [img for _, img, _ in load_images(test)]
    a = dask_model.predict(images, maps=False).scores
    b = one_model.predict(images, maps=False).scores
    assert spearmanr(a, b).statistic > 0.95
    assert np.median(np.abs(a - b) / b) < 0.05
