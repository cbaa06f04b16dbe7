"""A line with good images only: the Prefect flow gates its banks on synthetic defects.

60 good magnetic tiles are imported as ``folder:`` data (no test split, no defect pictures);
``data: synthetic:mvtec:data`` holds out about a fifth of them (by a hash of each name) and
gives each a synthetic defect. A bank on ImageNet weights passes the floors (its threshold is
chosen on good calibration tiles) and is promoted; a bank on random weights (what a broken
weights file gives) fails them, is registered as rejected and production stays as it was.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from tests.conftest import MTD, REPO
from tests.integration.test_pipeline import BIN, production, run


def _line_project(root: Path) -> Path:
    incoming = root / "incoming"
    incoming.mkdir(parents=True)
    split = json.loads((MTD / "split.json").read_text())
    for rel in split["train"][:60]:
        shutil.copy(MTD / rel, incoming / rel.replace("/", "_"))
    project = root / "line"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = "synthetic:mvtec:data"
    params["coreset"]["ratio"] = 0.05
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run(project, "git", "init", "-q")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    run(project, str(BIN / "dvc"), "init", "-q")
    run(project, str(BIN / "tracebank"), "import", f"folder:{incoming}")
    return project


def _random_weights(path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_a_good_only_line_is_gated_on_synthetic_defects_and_a_broken_bank_is_not_promoted(tmp_path):
    project = _line_project(tmp_path)
    assert not (project / "data" / "test").exists()  # nothing but good images

    good = run(project, sys.executable, "-m", "flows.train")
    bank = production(project)
    assert bank and f"bank {bank}: production" in good.stdout
    lineage = json.loads(run(project, str(BIN / "tracebank"), "lineage", bank, "--json").stdout)
    evaluation_set = lineage["evaluation_set"]
    assert evaluation_set["synthetic"] is True and evaluation_set["seed"] == 0
    assert evaluation_set["settings"]["families"] == ["cutpaste", "blob", "scratch"]
    # held out: the tiles whose salted name hash draws below synthetic.holdout (0.2), one defect each
    from pipeline.data.synthetic_set import holdout_draw

    imported = sorted((project / "data" / "train" / "good").iterdir())
    held = [p for p in imported if holdout_draw(str(p), 0) < 0.2]
    assert len(imported) == 60 and 0 < len(held) < 60
    assert evaluation_set["n_good"] == evaluation_set["n_defects"] == len(held)
    # the threshold comes from good calibration tiles' scores, not from the synthetic defects
    threshold = lineage["threshold"]
    assert threshold["method"] == "nominal_quantile_0.99"
    n_calibration = int(threshold["chosen_on"].split("(")[1].split(" good")[0])
    assert threshold["chosen_on"] == f"calibration split ({n_calibration} good, 0 defective)" and n_calibration >= 1
    assert {Path(f["path"]).name for f in lineage["files"]}.isdisjoint(p.name for p in held)
    assert len(lineage["files"]) == 60 - len(held) - n_calibration  # neither the test tiles nor those are in it
    gates = lineage["gates"]
    assert gates["passed"] and gates["defects"] == "synthetic"
    assert {c["name"] for c in gates["checks"]} >= {"synthetic image_auroc >= 0.8", "synthetic pro >= 0.6"}
    assert lineage["metrics"]["image_auroc"] >= 0.8 and lineage["metrics"]["pro"] >= 0.6
    kept = project / "banks" / lineage["bank_id"] / lineage["report"]["path"]
    assert "Synthetic defects" in kept.read_text()

    _random_weights(tmp_path / "random.safetensors")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["weights"] = str(tmp_path / "random.safetensors")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    broken = run(project, sys.executable, "-m", "flows.train", check=False)
    assert broken.returncode == 3, broken.stdout + broken.stderr
    assert production(project) == bank
    rejected = json.loads(run(project, str(BIN / "tracebank"), "banks", "--json").stdout)
    rows = {row["bank_id"]: row for row in rejected["banks"]}
    (broken_id,) = [b for b in rows if b != bank]
    assert rows[broken_id]["status"] == "rejected"
    failed = json.loads(run(project, str(BIN / "tracebank"), "lineage", broken_id, "--json").stdout)["gates"]
    assert failed["defects"] == "synthetic" and not failed["passed"]
    names = [f.split(" failed")[0] for f in failed["failures"]]
    assert "synthetic image_auroc >= 0.8" in names and "synthetic pro >= 0.6" in names
    # the same synthetic set judged production too: non-regression is part of the verdict
    assert any(n.startswith("synthetic image_auroc not below production") for n in names)
