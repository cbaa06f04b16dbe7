"""Fitting on a local Dask cluster of 2 worker processes through prefect-dask gives the bank a
single machine would give: same size, nearly the same scores."""

from __future__ import annotations

import json
import sys

import numpy as np
import yaml
from scipy.stats import spearmanr

from pipeline.data.datasets import load_images, open_dataset
from pipeline.patchcore.bank import load_bank
from pipeline.patchcore.coreset import coreset_size
from tests.integration.test_pipeline import BIN, make_project, run


def test_two_dask_workers_fit_the_same_bank_as_one_machine(tmp_path):
    project = make_project(tmp_path / "dask")
    # compare with `tracebank fit` on all 24 images: no calibration split held out here
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["threshold"]["calibration"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(project, sys.executable, "-m", "flows.distributed", "--workers", "2", "--shards", "2",
               "--out", "runs/dask-bank")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    single = json.loads(run(project, str(BIN / "tracebank"), "fit", "--data", "mvtec:data", "--out", "runs/one-bank",
                            "--ratio", "0.05", "--no-evaluate", "--json", "--quiet").stdout)
    dask_model, manifest = load_bank(project / "runs" / "dask-bank")  # hashes verified
    one_model, _ = load_bank(project / "runs" / "one-bank")
    assert manifest["training"]["n_images"] == 24 and manifest["training"]["distributed"]["shards"] == 2
    assert result["bank_size"] == coreset_size(result["rows"], 0.05) == single["bank_size"]
    test = open_dataset(f"mvtec:{project / 'data'}").test
    images = [img for _, img, _ in load_images(test)]
    a = dask_model.predict(images, maps=False).scores
    b = one_model.predict(images, maps=False).scores
    assert spearmanr(a, b).statistic > 0.95
    assert np.median(np.abs(a - b) / b) < 0.05
