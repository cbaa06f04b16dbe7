"""The evaluation report as a quality engineer sees it: ``report.html`` opened in headless Chromium.

Two reports on real data: MTD tiles (masks, five defect types) with a production bank that
differs from the candidate, and ELPV cells (no masks) with no production bank. Each page is
loaded from its folder, screenshotted whole, and read the way a person reads it: what the
pictures show, what the sentences say, which gates were not evaluated. Counts and rates are
computed here from the scores and thresholds, not taken from the report's code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: A file name and a defect type that are markup if a page forgets to escape them.
HOSTILE_NAME = '"><img src=x onerror="window.pwned=1">.jpg'
HOSTILE_KIND = "<b onclick='window.pwned=1'>Crack</b>"
EXAMPLES_PER_GROUP = 10


@pytest.fixture(scope="module")
def _flows_report_to_one_server():
    """No Prefect server: these tests run no flow (overrides the conftest fixture of this name)."""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install -y chromium (.ci/run does it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def model(extractor, ratio):
    from pipeline.config import CoresetConfig
    from pipeline.patchcore.model import PatchCore

    return PatchCore(extractor.config, CoresetConfig(ratio=ratio), extractor=extractor)


def patch_features(extractor, samples):
    """``(N_images * h * w, D)``: the patch features of ``samples``, image after image."""
    from pipeline.data.datasets import load_images

    images = [img for _, img, _ in load_images(samples)]
    return model(extractor, 1.0).extract([images[i : i + 8] for i in range(0, len(images), 8)])


def counts(labels, scores, threshold):
    """(good parts rejected, good parts, defects passed, defects) at ``score >= threshold``."""
    rejected = np.asarray(scores) >= threshold
    good, bad = labels == 0, labels == 1
    return int((rejected & good).sum()), int(good.sum()), int((~rejected & bad).sum()), int(bad.sum())


def sentence(labels, scores, threshold):
    fp, n_good, fn, n_bad = counts(labels, scores, threshold)
    return (f"Rejects {fp} of {n_good} ({100 * fp / n_good:.1f}%) good parts and misses {fn} of {n_bad} "
            f"({100 * fn / n_bad:.1f}%) defects at threshold {threshold:.4g}")


@pytest.fixture(scope="module")
def mtd_report(tmp_path_factory, mtd_dataset, extractor):
    """Candidate (20 tiles, 5% coreset, nominal threshold from 6 held-out tiles) and production
    (the first 10 of them, 2% coreset, F1-optimal threshold) on the same 12 test tiles, plus a copy
    of a defective tile under a hostile name and type and an unreadable file under a hostile name."""
    from pipeline.data.datasets import Sample
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.report import write_report
    from pipeline.lifecycle.gates import GateConfig, check_gates

    data = mtd_dataset.subset(n_test=12, seed=3)
    hostile = tmp_path_factory.mktemp("hostile")
    source = next(s for s in data.test if s.label == 1)
    shutil.copy(source.path, hostile / HOSTILE_NAME)
    (hostile / f"broken {HOSTILE_NAME}").write_bytes(b"\x89PNG\r\n")
    test = [*data.test, Sample(str(hostile / HOSTILE_NAME), 1, source.mask, HOSTILE_KIND),
            Sample(str(hostile / f"broken {HOSTILE_NAME}"), 0)]
    features = patch_features(extractor, data.train[:20])
    candidate = model(extractor, 0.05).fit_features(features)
    production = model(extractor, 0.02).fit_features(features[: len(features) // 2])
    calibration = evaluate(candidate, data.train[20:26], keep_maps=False, threshold_method="nominal",
                           target_false_reject=0.1).metrics
    result = evaluate(candidate, test, fixed_threshold=(calibration["threshold"], calibration["threshold_method"]))
    theirs = evaluate(production, test, keep_maps=False, threshold_method="f1")
    gates = check_gates(result.metrics, GateConfig(max_false_reject=0.05), theirs.metrics)
    out = tmp_path_factory.mktemp("mtd") / "report"
    info = {"value": calibration["threshold"], "method": calibration["threshold_method"], "n_calibration": 6,
            "ci": [calibration["threshold"] * 0.95, calibration["threshold"] * 1.05], "chosen_on": "calibration split"}
    page = write_report(result, out, title="bank cand01", threshold=calibration["threshold"],
                        worst=EXAMPLES_PER_GROUP, dataset="mtd:../shared/datasets/mtd", threshold_info=info,
                        production={"bank_id": "prod01", "threshold": theirs.metrics["threshold"],
                                    "scores": theirs.scores.tolist(), "metrics": theirs.metrics}, gates=gates)
    return {"page": page, "result": result, "candidate": calibration["threshold"], "production_scores": theirs.scores,
            "production": theirs.metrics["threshold"]}


@pytest.fixture(scope="module")
def elpv_report(tmp_path_factory, elpv_mono, extractor):
    """A candidate on ELPV cells, which have no masks, and no production bank."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.report import write_report
    from pipeline.lifecycle.gates import GateConfig, check_gates

    data = elpv_mono.subset(n_train=16, n_test=10, seed=0)
    bank = model(extractor, 0.05).fit_features(patch_features(extractor, data.train))
    result = evaluate(bank, data.test, threshold_method="f1")
    gates = check_gates(result.metrics, GateConfig(image_auroc_min=0.8, pro_min=0.6, pixel_auroc_min=0.8))
    page = write_report(result, tmp_path_factory.mktemp("elpv") / "report", title="bank cells01",
                        threshold=result.metrics["threshold"], dataset="elpv:mono", gates=gates)
    return {"page": page, "result": result}


def open_page(browser, report: Path, screenshot: Path):
    """The page loaded from its file, a full-page screenshot, and every URL it requested."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(5_000)  # everything is on disk: what is missing is not coming
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(screenshot), full_page=True)
    return page, requested


def loaded(image) -> bool:
    return image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")


def table(page, selector: str) -> dict[str, list[str]]:
    """The rows of a table as shown, by the text of their first cell."""
    rows = page.eval_on_selector_all(f"{selector} tr", "trs => trs.map(tr => [...tr.cells].map(c => c.innerText))")
    return {row[0]: row[1:] for row in rows}


def assert_self_contained(page, requested: list[str], folder: Path) -> None:
    sources = page.eval_on_selector_all("img", "imgs => imgs.map(img => img.getAttribute('src'))")
    assert sources, "the page shows no picture"
    for src in sources:
        assert urlparse(src).scheme == "" and not src.startswith("/"), src
        target = (folder / src).resolve()
        assert target.is_relative_to(folder.resolve()) and target.is_file(), src
    for url in requested:
        assert url.startswith("file://") and Path(unquote(urlparse(url).path)).is_relative_to(folder.resolve()), url
    assert all(loaded(img) for img in page.locator("img").all())
    text, source = page.inner_text("body"), (folder / "report.html").read_text()
    assert "None" not in text and "nan" not in text.split()
    assert "pytest-of" not in source and str(folder.parent) not in source, "no folder of this machine or its user"


def test_the_mtd_report_compares_both_banks_and_shows_every_example_with_its_score_scale(
        browser, mtd_report, tmp_path):
    report, result = mtd_report["page"], mtd_report["result"]
    labels, scores = result.labels, result.scores
    ours, theirs = mtd_report["candidate"], mtd_report["production"]
    page, requested = open_page(browser, report, tmp_path / "mtd.png")
    assert (tmp_path / "mtd.png").stat().st_size > 10_000
    assert_self_contained(page, requested, report.parent)
    assert "mtd:../shared/datasets/mtd" in page.inner_text("h1") and "mvtec" not in page.inner_text("body")

    # the operating point of each bank at its own threshold, counted here; a swap would read differently
    candidate_words = page.inner_text("#operating-candidate")
    production_words = page.inner_text("#operating-production")
    assert sentence(labels, scores, ours) in candidate_words
    assert "nominal quantile 0.9 from 6 calibration images" in candidate_words
    assert "prod01" in production_words
    assert sentence(labels, mtd_report["production_scores"], theirs) in production_words
    assert counts(labels, scores, ours) != counts(labels, scores, theirs)

    # examples: the rows a person expects, each original | heatmap + colour bar | mask
    rejected = scores >= ours
    expected = {"caught": int((rejected & (labels == 1)).sum()), "missed": int((~rejected & (labels == 1)).sum()),
                "false_alarm": int((rejected & (labels == 0)).sum())}
    for group, n in expected.items():
        assert page.locator(f"tr.example.{group}").count() == min(n, EXAMPLES_PER_GROUP), group
    rows = page.locator("tr.example").all()
    assert len(rows) == sum(min(n, EXAMPLES_PER_GROUP) for n in expected.values()) > 0
    for row in rows:
        original, heatmap, bar = (row.locator(f"img.{name}") for name in ("original", "heatmap", "colour-bar"))
        assert original.count() == heatmap.count() == bar.count() == 1, row.inner_text()
        assert loaded(original) and loaded(heatmap) and loaded(bar)
        heat_box, bar_box = heatmap.bounding_box(), bar.bounding_box()
        assert bar_box["x"] >= heat_box["x"] + heat_box["width"] - 1, "the colour bar stands beside the heatmap"
        assert bar_box["y"] < heat_box["y"] + heat_box["height"] and heat_box["y"] < bar_box["y"] + bar_box["height"]
        if "false_alarm" in row.get_attribute("class"):
            assert "no mask" in row.inner_text() and row.locator("img.mask").count() == 0
        else:  # every MTD defect has its mask
            assert row.locator("img.mask").count() == 1 and loaded(row.locator("img.mask"))

    # readable metric names, the figures, per-type detection rates
    body = page.inner_text("body")
    for name in ("Image AUROC", "Pixel AUROC", "PRO (FPR <= 0.3)"):
        assert name in page.inner_text("table.metrics")
    assert "image_auroc" not in body and "pixel_auroc" not in body
    for src in ("histogram.png", "roc.png", "pro.png"):
        assert loaded(page.locator(f"img[src='{src}']"))
    types = table(page, "table.types")
    for kind in {s.kind for s in result.samples if s.label == 1}:
        chosen = np.array([s.label == 1 and s.kind == kind for s in result.samples])
        n, candidate, production = types[kind]
        assert n == str(int(chosen.sum()))
        assert candidate.startswith(f"caught {int((scores[chosen] >= ours).sum())} of {n} ")
        assert production.startswith(f"caught {int((mtd_report['production_scores'][chosen] >= theirs).sum())} of {n} ")
    assert types["good parts"][1].startswith(f"falsely rejected {int((rejected & (labels == 0)).sum())} of ")
    assert len((report.parent / "roc.csv").read_text().splitlines()) > 2
    assert len((report.parent / "pro.csv").read_text().splitlines()) > 2

    # hostile names are shown as text, never run as markup
    assert page.evaluate("window.pwned") is None and page.locator("img[src='x']").count() == 0
    assert HOSTILE_NAME in body and f"broken {HOSTILE_NAME}" in body and HOSTILE_KIND in body


def test_the_elpv_report_names_its_dataset_and_says_what_was_not_evaluated(browser, elpv_report, tmp_path):
    report, result = elpv_report["page"], elpv_report["result"]
    page, requested = open_page(browser, report, tmp_path / "elpv.png")
    assert_self_contained(page, requested, report.parent)
    assert "elpv:mono" in page.inner_text("h1") and "mvtec" not in page.inner_text("body")
    words = page.inner_text("#operating-candidate")
    assert sentence(result.labels, result.scores, result.metrics["threshold"]) in words
    assert "There is no production bank" in page.inner_text("#operating-production")

    value, _, status = next(row for name, row in table(page, "table.gates").items()
                            if name.startswith("PRO (FPR <= 0.3) >= "))
    assert value == "not evaluated" and status.startswith("not evaluated: ") and "no masks" in status
    assert table(page, "table.metrics")["Pixel AUROC"] == ["not evaluated (no masks)"]
    assert page.locator("img[src='pro.png']").count() == 0 and "No PRO curve" in page.inner_text("body")
    rows = page.locator("tr.example").all()
    assert rows
    for row in rows:
        pictures = [row.locator(f"img.{name}") for name in ("original", "heatmap", "colour-bar")]
        assert all(p.count() == 1 and loaded(p) for p in pictures)
        assert "no mask" in row.inner_text() and row.locator("img.mask").count() == 0
