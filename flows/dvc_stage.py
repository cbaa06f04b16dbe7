"""Entry point of the ``dvc.yaml`` stages: ``python -m flows.dvc_stage STAGE``.

Each stage reads ``params.yaml`` and calls the same ``pipeline.lifecycle.steps`` function as the
Prefect flow; outputs go to ``runs/``, metrics and plots to ``metrics/`` (kept in git). The
Prefect flow works in ``runs/flow/``, so neither leaves the other's outputs modified.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.data.importer import recover_interrupted
from pipeline.data.tracking import recorded_hash
from pipeline.lifecycle import steps
from pipeline.lifecycle.registry import Registry

WORK = Path("runs")
METRICS = Path("metrics")
UNDRAWN = {"roc.csv": "the test split holds only one class (good or defective), so there is no ROC curve",
           "pro.csv": "the test split has no defect masks, so there is no PRO curve; add masks under "
                      "ground_truth/ (or use synthetic:SPEC) to draw it"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["validate", "extract", "coreset", "evaluate", "gate", "package"])
    parser.add_argument("--registry", default="banks")
    args = parser.parse_args(argv)
    for line in recover_interrupted("data"):  # leftovers of an import --replace killed mid-swap
        print(line, file=sys.stderr)
    params = steps.Params.load("params.yaml")
    dataset = params.dataset()
    registry = Registry(args.registry)
    result: object
    if args.stage == "validate":
        try:
            result = steps.validate_step(dataset, params.validation, WORK).summary()
        except steps.ValidationFailed as exc:
            print(exc, file=sys.stderr)
            return 1
    elif args.stage == "extract":
        result = steps.extract_step(dataset, params, WORK)
    elif args.stage == "coreset":
        result = steps.coreset_step(params, WORK, params.data)
    elif args.stage == "evaluate":
        result = steps.evaluate_step(dataset, WORK, params, metrics_dir=METRICS,
                                     production=steps.production_metrics(registry, dataset, params))
        for name, reason in UNDRAWN.items():  # DVC drops an empty plot without a word
            if len((METRICS / "plots" / name).read_text().splitlines()) < 2:
                print(f"plot metrics/plots/{name} not drawn: {reason}", file=sys.stderr)
    elif args.stage == "gate":
        result = steps.gate_step(WORK, params)
    else:
        from serving.store import package as package_bank

        outcome = steps.register_step(WORK, params, registry, data_hash=recorded_hash("data.dvc"))
        if outcome["status"] == "candidate":
            outcome["model_tag"] = package_bank(registry, outcome["bank_id"])
        (WORK / "package.json").write_text(json.dumps(outcome, indent=2, default=str) + "\n")
        result = outcome
    print(json.dumps(result, indent=2, default=str) if not isinstance(result, str) else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
