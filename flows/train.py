"""Prefect flows: train -> gate -> register -> promote, and retrain when the data changed.

    python -m flows.train                       # train on params.yaml's data, promote on pass
    python -m flows.train --import elpv:mono    # import a dataset under DVC first
    python -m flows.train --runner dask         # run tasks on a local Dask cluster

Each task calls one ``pipeline`` function; only the I/O tasks (DVC, packaging) retry.
Runs without a Prefect server configured (Prefect starts a temporary local one).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.data.datasets import Dataset
from pipeline.data.importer import import_dataset, recover_interrupted
from pipeline.data.tracking import dvc_add
from pipeline.lifecycle.provenance import commit_data_pointer
from pipeline.lifecycle.registry import Registry, RegistryBusy
from pipeline.lifecycle.retrain import already_made, choose_fit, extend_step
from pipeline.lifecycle.steps import (
    Params,
    ValidationFailed,
    coreset_step,
    evaluate_step,
    extract_step,
    gate_step,
    production_metrics,
    register_step,
    validate_step,
)


def recover_data(data_dir: str = "data") -> None:
    """Complete ``data_dir`` after an ``import --replace`` that was killed mid-swap (see
    :func:`pipeline.data.importer.recover_interrupted`), before the run reads it."""
    for line in recover_interrupted(data_dir):
        print(line)


@task(retries=2, retry_delay_seconds=2)
def track_data(data_dir: str = "data", git_commit: bool = False) -> str | None:
    """``dvc add`` the data folder (a no-op when unchanged); returns the DVC hash. With
    ``git_commit`` (``retrain.git_commit``), commits the pointer files it changed."""
    data_hash = dvc_add(data_dir)  # skipped when nothing under data_dir changed since the last one
    if git_commit:
        commit_data_pointer([f"{data_dir}.dvc", "dvc.lock"], f"data: {data_dir} at DVC hash {data_hash}")
    return data_hash


@task
def validate(dataset: Dataset, params: Params, work: Path) -> str:
    result = validate_step(dataset, params.validation, work)
    return result.summary()


@task
def extract(dataset: Dataset, params: Params, work: Path) -> dict[str, Any]:
    return extract_step(dataset, params, work)


@task
def select(params: Params, work: Path) -> dict[str, Any]:
    return coreset_step(params, work, params.data)


@task
def plan(params: Params, registry: Registry, dataset: Dataset, full: bool) -> dict[str, Any]:
    return choose_fit(params, registry, dataset, full=full)


@task
def extend(params: Params, work: Path, registry: Registry, dataset: Dataset, parent: str) -> dict[str, Any]:
    return extend_step(params, work, registry, dataset, parent)


@task
def evaluate(dataset: Dataset, params: Params, work: Path, registry: Registry) -> dict[str, Any]:
    return evaluate_step(dataset, work, params, production=production_metrics(registry, dataset, params))


@task
def gate(params: Params, work: Path) -> dict[str, Any]:
    return gate_step(work, params)


@task(retries=2, retry_delay_seconds=2)
def package(params: Params, work: Path, registry: Registry, data_hash: str | None,
            timings: dict[str, float]) -> dict[str, Any]:
    from serving.store import package as package_bank

    outcome = register_step(work, params, registry, data_hash=data_hash, timings=timings)
    if outcome["status"] == "candidate":
        outcome["model_tag"] = package_bank(registry, outcome["bank_id"])
    return outcome


@task
def promote(registry: Registry, bank_id: str) -> dict[str, Any]:
    return registry.promote(bank_id, by="prefect:tracebank-train", reason="gates")


def _publish(outcome: dict[str, Any], metrics: dict[str, Any], report: str | None) -> None:
    rows = [{"metric": k, "value": metrics.get(k)} for k in ("image_auroc", "pixel_auroc", "pro", "n_good", "n_defect")]
    create_table_artifact(key="metrics", table=rows, description=f"bank {outcome['bank_id']}")
    gates = outcome["gates"]
    lines = [f"# bank {outcome['bank_id']}: {outcome['status']}", "", "| check | value | limit | status |",
             "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']} | {c['limit']} | {c.get('status', c['passed'])} |"
              for c in gates["checks"]]
    if report:
        lines += ["", f"Report: [{report}](file://{Path(report).resolve()})"]
    create_markdown_artifact(key="gate-results", markdown="\n".join(lines))


@flow(name="tracebank-train", task_runner=ThreadPoolTaskRunner(max_workers=2))
def train(
    params_file: str = "params.yaml",
    work_dir: str = "runs/flow",
    registry_dir: str = "banks",
    data_dir: str = "data",
    auto_promote: bool = True,
    full: bool = False,
) -> dict[str, Any]:
    """Validate, fit (extending production when only good images were added, see
    :func:`pipeline.lifecycle.retrain.choose_fit`; ``full`` refits), evaluate, gate, package and
    (on pass) promote a bank."""
    params = Params.load(params_file)
    work, registry = Path(work_dir), Registry(registry_dir)
    with registry.exclusive_run("tracebank-train"):
        return _train(params, work, registry, data_dir, auto_promote, full)


def _train(params: Params, work: Path, registry: Registry, data_dir: str, auto_promote: bool,
           full: bool) -> dict[str, Any]:
    recover_data(data_dir)
    data_hash = track_data(data_dir, params.retrain.git_commit) if Path(data_dir).is_dir() else None
    dataset = params.dataset()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    validate(dataset, params, work)
    timings["validate_s"] = time.perf_counter() - start
    fit = plan(params, registry, dataset, full)
    if fit["fit"] == "incremental":
        extended = extend(params, work, registry, dataset, fit["parent"])
        timings |= extended["timings"]
        fit |= {"n_extracted": extended["n_extracted"], "n_added": extended["n_added"]}
    else:
        timings["extract_s"] = extract(dataset, params, work)["seconds"]
        timings["coreset_s"] = select(params, work)["seconds"]
    metrics = evaluate(dataset, params, work, registry)
    timings["evaluate_s"] = metrics["seconds"]
    gate(params, work)
    outcome = package(params, work, registry, data_hash, timings)
    evaluation = json.loads((work / "evaluation.json").read_text())
    report = outcome.get("report") or evaluation.get("report")
    if outcome["status"] == "candidate" and auto_promote:
        outcome["promotion"] = promote(registry, outcome["bank_id"])
        outcome["status"] = "production"
    _publish(outcome, metrics, report)  # after promotion: the artifact states the final status
    outcome["report"] = report
    outcome["evaluation"] = {"metrics": metrics, "production": evaluation.get("production") and
                             {k: v for k, v in evaluation["production"].items() if k != "scores"}}
    outcome["data_hash"] = data_hash
    outcome["fit"] = fit
    return outcome


@flow(name="tracebank-retrain-if-changed")
async def retrain_if_changed(
    params_file: str = "params.yaml", work_dir: str = "runs/flow", registry_dir: str = "banks", data_dir: str = "data"
) -> dict[str, Any]:
    """Retrain unless a registered bank was made from the same data (by DVC hash) and params.

    A run that finds another training run active on the registry does nothing and says so.
    From synchronous code: ``asyncio.run(retrain_if_changed(...))``.

    Note:
        An async flow because most scheduled runs find nothing to do: Prefect's synchronous
        engine ends every flow run by joining its heartbeat thread, which sleeps in 1 s steps,
        and that wait (0.8 s measured) was most of such a run's own time; the asynchronous
        engine does not wait. The retrain itself is the synchronous :func:`train` flow, run as a
        subflow on a worker thread (the thread inherits the flow run's context and shares the
        registry's run lock).
    """
    registry = Registry(registry_dir)
    try:
        with registry.exclusive_run("tracebank-retrain-if-changed"):
            params = Params.load(params_file)
            recover_data(data_dir)
            data_hash = track_data(data_dir, params.retrain.git_commit)
            same = already_made(registry, data_hash, params)
            if same is not None:
                print(same["decision"])
                return {"retrained": False, "data_hash": data_hash, "decision": same["decision"],
                        "bank_id": same["bank_id"], "production": (registry.production() or {}).get("bank_id")}
            outcome = await asyncio.to_thread(train, params_file, work_dir, registry_dir, data_dir, auto_promote=True)
    except RegistryBusy as exc:
        print(f"not retrained: {exc}")
        return {"retrained": False, "decision": f"not retrained: {exc}"}
    outcome["retrained"] = True
    return outcome


def with_runner(kind: str, workers: int = 2) -> Any:
    """The training flow on the chosen task runner: ``thread`` or ``dask`` (a local
    cluster with ``workers`` processes; point ``address`` at a real cluster, see README)."""
    if kind == "thread":
        return train
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        return train.with_options(task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": workers,
                                                                             "threads_per_worker": 1}))
    raise ValueError(f"runner must be 'thread' or 'dask', got {kind!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--import", dest="source", help="dataset spec to import into data/ first")
    parser.add_argument("--limit-train", type=int, help="import only N training images")
    parser.add_argument("--limit-test", type=int, help="import only N test images")
    parser.add_argument("--replace", action="store_true", help="with --import: replace a data/ that holds a dataset")
    parser.add_argument("--runner", default="thread", choices=["thread", "dask"])
    parser.add_argument("--no-promote", action="store_true")
    parser.add_argument("--serve", metavar="CRON", help="serve the retrain flow on this cron schedule "
                        "(needs a Prefect server: PREFECT_API_URL)")
    parser.add_argument("--inbox", metavar="DIR", help="take new good images from DIR (see flows/inbox.py)")
    parser.add_argument("--full", action="store_true", help="refit instead of extending the production bank")
    parser.add_argument("--reload-url", metavar="URL", help="with --inbox: after a promotion, POST URL/reload "
                        "(token from TRACEBANK_ADMIN_TOKEN)")
    args = parser.parse_args(argv)
    if args.serve:
        return _serve(args)
    if args.inbox:
        from flows.inbox import retrain_from_inbox

        result = retrain_from_inbox(args.inbox, full=args.full, reload_url=args.reload_url)
        print(result["decision"])
        outcome = result["outcome"]
        return 0 if outcome is None or outcome["status"] in ("production", "candidate") else 3
    if args.source:
        import_dataset(args.source, "data", n_train=args.limit_train, n_test=args.limit_test, replace=args.replace)
    try:
        outcome = with_runner(args.runner)(auto_promote=not args.no_promote, full=args.full)
    except ValidationFailed as exc:
        print(f"stopped before training: {exc}", file=sys.stderr)
        return 1
    except RegistryBusy as exc:
        print(f"not trained: {exc}", file=sys.stderr)
        return 4
    show_outcome(outcome)
    return 0 if outcome["status"] in ("production", "candidate") else 3


def show_outcome(outcome: dict[str, Any]) -> None:
    """The end of a run for a person: the bank, its operating point beside production's,
    every gate with its status, and where its report is."""
    from pipeline.cli_show import gate_lines, operating_line

    print(f"bank {outcome['bank_id']}: {outcome['status']}")
    print(f"  bank:       {outcome['bank_dir']}")
    evaluation = outcome.get("evaluation") or {}
    metrics, production = evaluation.get("metrics") or {}, evaluation.get("production")
    print(f"  operating:  {operating_line(metrics, metrics.get('threshold')) or 'no threshold'} (test split)")
    if production:
        print(f"  production: {production['bank_id']} {operating_line(production, production.get('threshold'))}")
    for line in gate_lines(outcome["gates"]):
        print(f"  {line}")
    print(f"  report:     {outcome['report']}")


def _serve(args: argparse.Namespace) -> int:
    """Serve the scheduled deployment; refuses without a Prefect server (an ephemeral one
    cannot run schedules)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("--serve needs a running Prefect server, which keeps the schedule and runs it: start one "
              "with `prefect server start` (see README, 'Scheduled retraining'), then "
              "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run this again", file=sys.stderr)
        return 2
    # Prefect's runner keeps its files in <tmp>/runner_storage, one folder for every user of
    # the machine: one made by another user would refuse ours. Use a temp folder of our own.
    own = Path(tempfile.gettempdir()) / f"tracebank-{getpass.getuser()}"
    own.mkdir(mode=0o700, exist_ok=True)
    tempfile.tempdir = str(own)
    if args.inbox:
        from flows.inbox import retrain_from_inbox

        retrain_from_inbox.serve(name="inbox-retrain", cron=args.serve,
                                 parameters={"inbox": str(Path(args.inbox).resolve()), "full": args.full,
                                             "reload_url": args.reload_url})
    else:
        retrain_if_changed.serve(name="nightly-retrain", cron=args.serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
