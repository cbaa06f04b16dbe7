"""The operating-point gate in the scenario that slipped past the AUROC gates.

A line trained by the Prefect flow (ELPV mono, 120 good training cells, 30 good and 30
defective test cells); then five new good cells arrive in an inbox, one of which the name hash
sends to the calibration split, and the scheduled inbox flow extends the production bank. When
that calibration cell is an unusual one (the new cell the production bank scores highest), the
threshold jumps and the candidate misses many more defects than production does at its own
threshold: the gate must refuse it and leave production as it was. When it is an ordinary one
(the new cell scored lowest), the candidate must be promoted.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.test_pipeline import BIN, _env, production, run

N_TRAIN, N_TEST = 120, 60


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A project with a production bank from the flow, and the new good cells to send it:
    calibration-bound ones by the production bank's score, highest first, and training-bound ones."""
    root = tmp_path_factory.mktemp("operating")
    project = root / "line"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["coreset"]["ratio"] = 0.05
    params["gates"].update({"image_auroc_min": 0.5, "pro_min": None, "pixel_auroc_min": None})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run(project, "git", "init", "-q")
    run(project, str(BIN / "dvc"), "init", "-q")
    run(project, str(BIN / "tracebank"), "import", "elpv:mono", "--limit-train", str(N_TRAIN),
        "--limit-test", str(N_TEST))
    run(project, sys.executable, "-m", "flows.train")
    bank = production(project)
    assert bank

    from pipeline.data.datasets import calibration_draw, open_dataset
    from pipeline.data.images import read_image
    from pipeline.patchcore.bank import load_bank

    imported = {p.name.split("_", 1)[1] for p in (project / "data" / "train" / "good").iterdir()}
    fresh = [s.path for s in open_dataset("elpv:mono").train if Path(s.path).name not in imported]
    to_calibration = [p for p in fresh if calibration_draw(p) < 0.1]
    to_training = [p for p in fresh if calibration_draw(p) >= 0.1][:4]
    model, _ = load_bank(project / "banks" / bank)
    scores = model.predict([read_image(p) for p in to_calibration], maps=False).scores
    ranked = [p for _, p in sorted(zip(scores.tolist(), to_calibration, strict=True), reverse=True)]
    return root, project, bank, ranked, to_training


def _inbox_run(line, name: str, calibration_cell: str) -> tuple[Path, dict, str]:
    """The line's project copied to ``name``, five new good cells in its inbox (one bound for
    calibration), and one inbox flow run; returns the copy, the new bank's lineage and the output."""
    root, project, _, _, to_training = line
    copy = root / name
    shutil.copytree(project, copy, symlinks=True)
    inbox = copy / "inbox"
    inbox.mkdir()
    for path in [calibration_cell, *to_training]:
        shutil.copy(path, inbox / Path(path).name)
    proc = run(copy, sys.executable, "-m", "flows.train", "--inbox", str(inbox), check=False, env=_env(copy))
    assert "incremental fit" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    candidate = re.search(r"bank ([0-9a-f]{16}) (production|candidate|rejected)", proc.stdout).group(1)
    lineage = json.loads(run(copy, str(BIN / "tracebank"), "lineage", candidate, "--json").stdout)
    return copy, lineage, proc.stdout


def _miss_check(lineage: dict) -> dict:
    return next(c for c in lineage["gates"]["checks"] if c["name"].startswith("miss_rate not above production"))


def test_an_unusual_calibration_cell_that_raises_the_miss_rate_is_refused(line):
    _, project, bank, ranked, _ = line
    before = json.loads((project / "banks" / bank / "lineage.json").read_text())["threshold"]["value"]
    copy, lineage, out = _inbox_run(line, "unusual", ranked[0])
    assert lineage["bank_id"] != bank and lineage["fit"]["parent_bank"] == bank
    assert lineage["threshold"]["value"] > before  # the new cell moved the threshold up
    record = lineage["threshold"]  # how it was estimated, and from how many images
    assert record["estimator"] == "quantile" and record["chosen_on"] == (
        f"calibration split ({record['n_calibration']} good, 0 defective)")
    assert record["ci"][0] <= record["value"]
    check = _miss_check(lineage)
    # production decides the same test cells at its own threshold; the candidate misses more
    # of them, beyond noise, and the rise is past the setting
    assert check["status"] == "failed" and check["production"] < check["value"]
    assert check["worse"] - check["better"] > 0.02 * check["n"] and check["p_value"] < 0.05
    assert check["n"] == lineage["metrics"]["n_defect"] == 30
    assert lineage["status"] == "rejected" and not lineage["gates"]["passed"]
    assert production(copy) == bank  # the line keeps its bank
    assert "rejected; gate failed: miss_rate not above production's + 0.02 failed" in out
    # the refused bank's report, kept in its folder, names the data as it was imported
    page = (copy / "banks" / lineage["bank_id"] / lineage["report"]["path"]).read_text()
    assert "elpv:mono (imported into data)" in page and "on mvtec:data" not in page
    shown = run(copy, str(BIN / "tracebank"), "lineage", lineage["bank_id"]).stdout
    assert "gates      FAILED" in shown and "FAILED        miss_rate not above production's" in shown


def test_an_ordinary_calibration_cell_is_promoted(line):
    _, _, bank, ranked, _ = line
    copy, lineage, _ = _inbox_run(line, "ordinary", ranked[-1])
    check = _miss_check(lineage)
    assert check["status"] == "passed" and lineage["gates"]["passed"]
    assert check["worse"] - check["better"] <= 0.02 * check["n"] or "within noise" in check["note"]
    assert production(copy) == lineage["bank_id"] != bank
    assert lineage["fit"]["parent_bank"] == bank
