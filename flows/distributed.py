"""Fitting a bank across Dask workers: feature extraction and the first coreset stage run per
shard of the nominal images, the second stage over the union of the shards' candidates.

    python -m flows.distributed --workers 2                       # local Dask cluster
    python -m flows.distributed --address tcp://scheduler:8786    # an existing cluster
    python -m flows.distributed --bench --workers 1,2             # 1 vs 2 workers, timed

A fit ends as the local flow's does: the bank is evaluated, its threshold calibrated, gated
and registered (lineage with shards, workers and scheduler), packaged into the BentoML model
store, so ``tracebank promote`` can make it production; the shards' feature files are
removed unless ``--keep-work``.

Greedy k-center composes: the union of per-shard coresets (each keeping ``oversample`` times
its share) is a small set that covers every shard, and a greedy pass over it picks the final
bank. Workers write their shard's features and candidates under ``--work``, which must be a
folder every worker and this process can read (a shared mount on a real cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task

from pipeline.config import CoresetConfig, FeatureConfig
from pipeline.data.datasets import Dataset, Sample
from pipeline.data.tracking import recorded_hash
from pipeline.lifecycle.registry import Registry
from pipeline.lifecycle.stages import FeatureStore, extract_features
from pipeline.lifecycle.steps import (
    Params,
    evaluate_step,
    gate_step,
    production_metrics,
    register_step,
)
from pipeline.patchcore.bank import save_bank
from pipeline.patchcore.coreset import SHARD_SIZE, coreset_size, greedy_coreset, ratio_for, shard_candidates
from pipeline.patchcore.model import PatchCore


@task(retries=1, retry_delay_seconds=5)
def extract_shard(samples: list[Sample], features: FeatureConfig, directory: str, batch_size: int,
                  threads: int) -> dict[str, Any]:
    """Patch features of one shard, streamed to ``directory`` on the worker; progress is
    logged to the task run about every tenth of the shard."""
    import torch
    from prefect import get_run_logger

    from pipeline.patchcore.features import FeatureExtractor

    torch.set_num_threads(threads)
    logger = get_run_logger()
    done, step, name = 0, max(1, len(samples) // 10), Path(directory).name

    def progress(n: int) -> None:
        nonlocal done
        before, done = done, done + n
        if done // step != before // step or done == len(samples):
            logger.info("%s: %d/%d images extracted", name, done, len(samples))

    store = extract_features(samples, FeatureExtractor(features), directory, batch_size=batch_size,
                             on_batch=progress)
    return {"directory": directory, "rows": store.rows, "files": store.files, "skipped": store.skipped}


@task
def select_shard(shard: dict[str, Any], coreset: CoresetConfig, oversample: float, threads: int) -> str:
    """First coreset stage on one shard: greedy over its sub-shards of ``SHARD_SIZE`` features,
    each keeping ``oversample`` times its share (the first stage of the in-process selection)."""
    import torch

    torch.set_num_threads(threads)
    feats = FeatureStore.open(shard["directory"]).array()
    idx = shard_candidates(feats, coreset.ratio, seed=coreset.seed, proj_dim=coreset.proj_dim,
                           shard_size=SHARD_SIZE, oversample=oversample)
    out = Path(shard["directory"]) / "candidates.npy"
    np.save(out, np.ascontiguousarray(feats[idx], dtype=np.float32), allow_pickle=False)
    return str(out)


@flow(name="tracebank-fit-distributed")
def fit_distributed(
    params_file: str = "params.yaml",
    work: str = "runs/distributed",
    shards: int = 2,
    oversample: float = 8.0,
    threads_per_task: int = 1,
    data: str | None = None,
    register: bool = True,
    registry_dir: str = "banks",
    cluster: dict[str, Any] | None = None,
    keep_work: bool = False,
) -> dict[str, Any]:
    """Fit a bank with extraction and the first coreset stage spread over the task runner;
    then (``register``) evaluate, gate, register and package it as the local flow does.
    ``cluster`` (scheduler address, workers) goes into the lineage."""
    params = Params.load(params_file, {"data": data} if data else None)
    out = Path(work) / "candidate"
    dataset = params.dataset()
    if shards < 1 or shards > len(dataset.train):
        raise ValueError(f"shards must be in [1, {len(dataset.train)}], got {shards}")
    start = time.perf_counter()
    bounds = np.linspace(0, len(dataset.train), shards + 1).astype(int)
    extracted = [
        extract_shard.submit(dataset.train[a:b], params.features, str(Path(work) / f"shard-{i}"), params.batch_size,
                             threads_per_task)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]
    selected = [select_shard.submit(e, params.coreset, oversample, threads_per_task) for e in extracted]
    shard_info = [e.result() for e in extracted]
    candidates = np.concatenate([np.load(s.result(), allow_pickle=False) for s in selected])
    stage1_s = time.perf_counter() - start
    rows = sum(s["rows"] for s in shard_info)
    target = coreset_size(rows, params.coreset.ratio)
    keep = ratio_for(len(candidates), min(target, len(candidates)))
    idx = np.sort(greedy_coreset(candidates, keep, seed=params.coreset.seed, proj_dim=params.coreset.proj_dim))
    model = PatchCore(params.features, params.coreset, params.scoring)
    model.set_bank(np.ascontiguousarray(candidates[idx]))
    shutil.rmtree(out, ignore_errors=True)
    training = {
        "spec": params.data,
        "n_images": sum(len(s["files"]) for s in shard_info),
        "files": [f for s in shard_info for f in s["files"]],
        "skipped": [f for s in shard_info for f in s["skipped"]],
        "distributed": {"shards": shards, "oversample": oversample, "candidates": len(candidates),
                        **(cluster or {})},
    }
    manifest = save_bank(out, model, training=training)
    result = {"bank_id": manifest["bank_id"], "bank": str(out), "bank_size": len(idx), "rows": rows,
              "n_images": training["n_images"],
              "candidates": len(candidates), "stage1_s": stage1_s, "total_s": time.perf_counter() - start}
    if not keep_work:
        for i in range(shards):
            shutil.rmtree(Path(work) / f"shard-{i}", ignore_errors=True)
    if register:
        result |= _register(params, dataset, Path(work), Registry(registry_dir),
                            {"fit_s": result["total_s"], "stage1_s": stage1_s})
    return result


def _register(params: Params, dataset: Dataset, work: Path, registry: Registry,
              timings: dict[str, float]) -> dict[str, Any]:
    """Evaluate (threshold on the calibration split), gate, register and package the candidate."""
    from serving.store import package

    started = time.perf_counter()
    metrics = evaluate_step(dataset, work, params, production=production_metrics(registry, dataset, params))
    gate_step(work, params)
    timings["evaluate_s"] = time.perf_counter() - started
    outcome = register_step(work, params, registry, data_hash=recorded_hash("data.dvc"), timings=timings)
    if outcome["status"] == "candidate":
        outcome["model_tag"] = package(registry, outcome["bank_id"])
    return {"bank_id": outcome["bank_id"], "status": outcome["status"], "bank_dir": outcome["bank_dir"],
            "gate_failures": outcome["gates"]["failures"], "image_auroc": metrics.get("image_auroc"),
            "threshold": metrics.get("threshold")}


def on_dask(workers: int | None = None, address: str | None = None) -> Any:
    """``fit_distributed`` on a local Dask cluster of ``workers`` processes, or on the
    cluster at ``address``.

    Note:
        Task runs report to the flow's Prefect API. Workers of an existing cluster need
        ``PREFECT_API_URL`` in their environment; a local cluster gets the address of this
        process's API, which is started here first when none is configured (Prefect's
        temporary server), so that each worker does not start a temporary server of its own.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        api_url = PREFECT_API_URL.value()
        if not api_url:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()  # the instance Prefect's own client then uses
            server.start()
            api_url = server.api_url
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None,
                                                "env": {"PREFECT_API_URL": api_url}})
    return fit_distributed.with_options(task_runner=runner)


def _worker_count(address: str | None) -> int | None:
    if not address:
        return None
    from distributed import Client

    with Client(address, timeout=30) as client:
        return len(client.scheduler_info()["workers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", help="dataset spec instead of params.yaml's")
    parser.add_argument("--workers", default="2", help="local cluster size; with --bench a list like 1,2")
    parser.add_argument("--address", help="scheduler address of an existing Dask cluster")
    parser.add_argument("--shards", type=int, help="shards of the training set (default: 2 per worker)")
    parser.add_argument("--work", default="runs/distributed", help="shards and candidate (a folder workers share)")
    parser.add_argument("--registry", default="banks")
    parser.add_argument("--keep-work", action="store_true", help="keep the shards' feature files")
    parser.add_argument("--bench", action="store_true", help="time each worker count in --workers (nothing "
                        "registered)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    results = []
    for workers in [int(w) for w in args.workers.split(",")]:
        shards = args.shards or 2 * workers
        threads = max(1, cores // workers)
        fit = on_dask(workers, args.address)  # starts the Prefect API first, outside the timing
        cluster = {"scheduler": args.address or "local", "workers": _worker_count(args.address) or workers}
        started = time.perf_counter()
        result = fit(params_file=args.params, work=args.work, shards=shards, threads_per_task=threads,
                     data=args.data, register=not args.bench, registry_dir=args.registry, cluster=cluster,
                     keep_work=args.keep_work)
        result.update({"workers": workers, "shards": shards, "threads_per_task": threads,
                       "wall_s": time.perf_counter() - started})
        results.append(result)
        if not args.bench:
            break
    if args.bench:
        print(f"{'workers':>7} {'shards':>6} {'threads':>7} {'images':>6} {'stage1_s':>8} {'fit_s':>7} {'wall_s':>7} "
              f"{'bank':>6}")
        for r in results:
            print(f"{r['workers']:>7} {r['shards']:>6} {r['threads_per_task']:>7} {r['n_images']:>6} "
                  f"{r['stage1_s']:>8.1f} {r['total_s']:>7.1f} {r['wall_s']:>7.1f} {r['bank_size']:>6}")
    else:
        print(json.dumps(results[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
