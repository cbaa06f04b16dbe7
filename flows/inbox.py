"""The line's inbox: new good images dropped into a folder become the next production bank.

    python -m flows.train --inbox /mnt/line3/inbox                      # one run now
    python -m flows.train --inbox /mnt/line3/inbox --serve "0 3 * * *"  # nightly, needs a Prefect server

Each run takes the image files directly inside the inbox (names starting with ``.`` are left
alone, so a camera can write ``.part.png`` and rename it when complete), adds them with
:func:`pipeline.data.intake.add_nominal` (duplicates skipped, failures quarantined, ``dvc add``),
and moves every file it took into ``processed/<time>/{added,duplicate,quarantined,refused}/`` inside
the inbox: nothing is deleted and nothing is taken twice. It retrains only if the data's DVC
hash differs from the production bank's, extending that bank when only good images were added.
A ``inbox-run`` artifact lists the files added, the duplicates, the quarantined files and the
decision. After a promotion, a running service is told to reload when ``reload_url`` is set.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from pipeline.data.importer import unique_name
from pipeline.data.intake import add_nominal, expand_inputs
from pipeline.lifecycle.registry import Registry, RegistryBusy
from pipeline.lifecycle.retrain import already_made
from pipeline.lifecycle.steps import Params

from .train import track_data, train


@task
def take_inbox(inbox: str, data_dir: str, quarantine: str, params: Params) -> dict[str, Any]:
    """Add the inbox's files to ``data_dir`` and move them to the inbox's ``processed/`` folder."""
    files = expand_inputs([inbox])  # links too: add_nominal refuses them, and they are moved aside below
    if not files:
        return {"n_added": 0, "n_duplicates": 0, "n_quarantined": 0, "n_refused": 0, "added": [], "duplicates": [],
                "quarantined": [], "refused": [], "processed": None}
    report = add_nominal(files, data_dir, config=params.validation, quarantine=quarantine).as_json()
    done = Path(inbox) / "processed" / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    for kind, items in (("added", report["added"]), ("duplicate", report["duplicates"]),
                        ("quarantined", report["quarantined"]), ("refused", report["refused"])):
        folder = done / kind
        for item in items:
            folder.mkdir(parents=True, exist_ok=True)
            source = Path(item["source"])
            shutil.move(source, folder / unique_name(folder, source))
    return report | {"processed": str(done)}


@task(retries=2, retry_delay_seconds=5)
def reload_service(url: str, bank_id: str) -> dict[str, Any]:
    """``POST {url}/reload`` (admin token from ``TRACEBANK_ADMIN_TOKEN``) and check that the
    service now serves ``bank_id`` (see :func:`pipeline.lifecycle.service_reload.reload_service`)."""
    from pipeline.lifecycle.service_reload import reload_service as reload

    return reload(url, bank_id)


def _summary(report: dict[str, Any], decision: str) -> str:
    lines = [f"# inbox run: {decision}", "",
             f"{report['n_added']} added, {report['n_duplicates']} duplicate(s), "
             f"{report['n_quarantined']} quarantined", ""]
    lines += [f"- added `{Path(a['source']).name}` as `{a['path']}`" for a in report["added"]]
    lines += [f"- duplicate `{Path(d['source']).name}`: same bytes as `{d['same_as']}`" for d in report["duplicates"]]
    lines += [f"- quarantined `{Path(q['source']).name}`: {q['reason']}" for q in report["quarantined"]]
    lines += [f"- refused `{Path(r['source']).name}`: {r['reason']}" for r in report["refused"]]
    return "\n".join(lines)


@flow(name="tracebank-inbox")
def retrain_from_inbox(
    inbox: str,
    params_file: str = "params.yaml",
    work_dir: str = "runs/flow",
    registry_dir: str = "banks",
    data_dir: str = "data",
    quarantine: str = "quarantine",
    full: bool = False,
    reload_url: str | None = None,
) -> dict[str, Any]:
    """Take the inbox, and retrain (and promote on passed gates) if the data changed."""
    registry = Registry(registry_dir)
    try:
        with registry.exclusive_run("tracebank-inbox"):
            return _retrain_from_inbox(inbox, params_file, work_dir, registry, data_dir, quarantine, full, reload_url)
    except RegistryBusy as exc:
        decision = f"inbox not taken, not retrained: {exc}"
        create_markdown_artifact(key="inbox-run", markdown=f"# inbox run: {decision}")
        return {"inbox": None, "data_hash": None, "decision": decision, "outcome": None}


def _retrain_from_inbox(inbox: str, params_file: str, work_dir: str, registry: Registry, data_dir: str,
                        quarantine: str, full: bool, reload_url: str | None) -> dict[str, Any]:
    params = Params.load(params_file)
    report = take_inbox(inbox, data_dir, quarantine, params)
    data_hash = track_data(data_dir, params.retrain.git_commit)
    registry_dir = str(registry.root)
    same = None if full else already_made(registry, data_hash, params)
    outcome: dict[str, Any] | None = None
    if same is not None:
        decision = same["decision"]
    else:
        outcome = train(params_file, work_dir, registry_dir, data_dir, auto_promote=True, full=full)
        fit = outcome["fit"]
        decision = (f"{fit['fit']} fit ({fit['reason']}): bank {outcome['bank_id']} {outcome['status']}"
                    + "".join(f"; gate failed: {f}" for f in outcome["gates"]["failures"])
                    + "".join(f"; gate flagged: {f}" for f in outcome["gates"].get("flags", [])))
        if outcome["status"] == "production" and reload_url:
            outcome["reload"] = reload_service(reload_url, outcome["bank_id"])
            decision += f"; service at {reload_url} reloaded"
    create_markdown_artifact(key="inbox-run", markdown=_summary(report, decision))
    return {"inbox": report, "data_hash": data_hash, "decision": decision, "outcome": outcome}
