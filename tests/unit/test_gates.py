"""Promotion gates against hand-worked cases: each floor, non-regression, missing metrics."""

import pytest

from pipeline.lifecycle.gates import GateConfig, check_gates

CONFIG = GateConfig(image_auroc_min=0.9, pro_min=0.7, pixel_auroc_min=0.8, max_regression=0.02)
GOOD = {"image_auroc": 0.95, "pro": 0.75, "pixel_auroc": 0.85}


def by_name(result):
    return {c["name"]: c for c in result["checks"]}


def test_a_candidate_over_every_floor_passes():
    result = check_gates(GOOD, CONFIG)
    assert result["passed"] and result["failures"] == []
    assert [c["status"] for c in result["checks"]] == ["passed"] * 3


@pytest.mark.parametrize(("key", "value"), [("image_auroc", 0.89), ("pro", 0.69), ("pixel_auroc", 0.79)])
def test_each_floor_fails_alone_just_below_it(key, value):
    result = check_gates(GOOD | {key: value}, CONFIG)
    assert not result["passed"]
    assert len(result["failures"]) == 1 and result["failures"][0].startswith(f"{key} >= ")
    assert f"got {value}" in result["failures"][0]


def test_a_floor_is_met_at_equality():
    assert check_gates({"image_auroc": 0.9, "pro": 0.7, "pixel_auroc": 0.8}, CONFIG)["passed"]


def test_non_regression_against_production_on_the_same_set():
    production = {"image_auroc": 0.97, "pro": 0.80, "pixel_auroc": 0.86}
    # image 0.95 >= 0.97 - 0.02 (equal passes); pro 0.75 < 0.80 - 0.02 = 0.78 fails; pixel 0.85 >= 0.84
    result = check_gates(GOOD, CONFIG, production)
    checks = by_name(result)
    assert checks["image_auroc not below production 0.9700 - 0.02"]["passed"]
    assert checks["image_auroc not below production 0.9700 - 0.02"]["limit"] == pytest.approx(0.95)
    assert not checks["pro not below production 0.8000 - 0.02"]["passed"]
    assert checks["pixel_auroc not below production 0.8600 - 0.02"]["passed"]
    assert [f.split(" failed")[0] for f in result["failures"]] == ["pro not below production 0.8000 - 0.02"]


def test_floors_without_masks_are_reported_not_evaluated_or_fail_when_masks_are_required():
    no_masks = {"image_auroc": 0.95, "pro": None, "pixel_auroc": None}
    result = check_gates(no_masks, CONFIG)
    assert result["passed"]
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    assert statuses == {"image_auroc >= 0.9": "passed", "pro >= 0.7": "not evaluated",
                        "pixel_auroc >= 0.8": "not evaluated"}
    strict = check_gates(no_masks, GateConfig(image_auroc_min=0.9, pro_min=0.7, pixel_auroc_min=0.8,
                                              require_masks=True))
    assert not strict["passed"] and len(strict["failures"]) == 2
    assert all("no masks" in f for f in strict["failures"])


def test_a_missing_image_auroc_fails_and_a_disabled_floor_is_not_checked():
    result = check_gates({"pro": 0.9, "pixel_auroc": 0.9}, CONFIG)
    assert not result["passed"] and result["failures"][0].startswith("image_auroc >= 0.9 failed (got None)")
    loose = check_gates({"image_auroc": 0.5}, GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None))
    assert loose == {"passed": True, "defects": "real", "checks": [], "failures": []}


def test_a_production_metric_that_is_missing_skips_only_that_comparison():
    result = check_gates(GOOD, CONFIG, {"image_auroc": 0.99})
    names = [c["name"] for c in result["checks"]]
    assert names[-1] == "image_auroc not below production 0.9900 - 0.02" and len(names) == 4
    assert not result["passed"]  # 0.95 < 0.97


def test_floors_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"gates.pro_min must be in \[0, 1\]"):
        GateConfig(pro_min=1.5)


def test_the_false_reject_ceiling_is_met_at_equality_and_fails_above_or_unmeasured():
    config = GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None, max_false_reject=0.05)
    assert check_gates({"false_reject_rate": 0.05}, config)["passed"]  # 3 of 60 good parts rejected
    above = check_gates({"false_reject_rate": 4 / 60}, config)
    assert not above["passed"] and above["failures"] == ["false_reject_rate <= 0.05 failed (got 0.0667)"]
    unmeasured = check_gates({"false_reject_rate": None}, config)
    assert not unmeasured["passed"]
    assert unmeasured["failures"] == [
        "false_reject_rate <= 0.05 failed (got None); no good test images to measure it on"]
    assert by_name(check_gates({"false_reject_rate": 0.05}, config))["false_reject_rate <= 0.05"]["status"] == "passed"


def test_synthetic_metrics_are_named_synthetic_in_every_check():
    production = {"image_auroc": 0.99, "pro": 0.7, "pixel_auroc": 0.86}
    result = check_gates(GOOD, CONFIG, production, synthetic=True)
    assert result["defects"] == "synthetic"
    assert all(c["name"].startswith("synthetic ") for c in result["checks"]) and len(result["checks"]) == 6
    assert result["failures"] == ["synthetic image_auroc not below production 0.9900 - 0.02 failed (got 0.95)"]


def test_the_whole_report_of_a_candidate_without_masks_on_a_line_with_a_production_bank():
    # image AUROC floor disabled; no masks; production lacks image AUROC (compared on another
    # set), so only PRO is compared: 0.75 against 0.875 - 0.125 = 0.75 passes at equality.
    config = GateConfig(image_auroc_min=None, pro_min=0.7, pixel_auroc_min=0.8, max_regression=0.125,
                        max_false_reject=0.05)
    metrics = {"image_auroc": 0.75, "pro": 0.75, "pixel_auroc": None, "false_reject_rate": 0.1}
    production = {"image_auroc": None, "pro": 0.875, "pixel_auroc": 0.9}
    assert check_gates(metrics, config, production) == {
        "passed": False,
        "defects": "real",
        "checks": [
            {"name": "pro >= 0.7", "value": 0.75, "limit": 0.7, "passed": True, "status": "passed"},
            {"name": "pixel_auroc >= 0.8", "value": None, "limit": 0.8, "passed": True, "status": "not evaluated",
             "reason": "the evaluation set has no masks (gates.require_masks: false)"},
            {"name": "pro not below production 0.8750 - 0.125", "value": 0.75, "limit": 0.75, "passed": True,
             "status": "passed"},
            {"name": "false_reject_rate <= 0.05", "value": 0.1, "limit": 0.05, "passed": False, "status": "failed"},
        ],
        "failures": ["false_reject_rate <= 0.05 failed (got 0.1)"],
    }


def test_the_whole_report_of_a_candidate_failing_every_way_with_masks_required():
    config = GateConfig(image_auroc_min=0.9, pro_min=0.7, pixel_auroc_min=0.8, require_masks=True)
    metrics = {"pro": 0.5, "pixel_auroc": None}  # no image AUROC at all
    production = {"image_auroc": 0.95, "pro": 0.625}
    assert check_gates(metrics, config, production) == {
        "passed": False,
        "defects": "real",
        "checks": [
            {"name": "image_auroc >= 0.9", "value": None, "limit": 0.9, "passed": False, "status": "failed"},
            {"name": "pro >= 0.7", "value": 0.5, "limit": 0.7, "passed": False, "status": "failed"},
            {"name": "pixel_auroc >= 0.8", "value": None, "limit": 0.8, "passed": False, "status": "failed",
             "reason": "gates.require_masks is true but the evaluation set has no masks"},
            {"name": "pro not below production 0.6250 - 0.02", "value": 0.5, "limit": 0.625 - 0.02, "passed": False,
             "status": "failed"},
        ],
        "failures": [
            "image_auroc >= 0.9 failed (got None)",
            "pro >= 0.7 failed (got 0.5)",
            "pixel_auroc >= 0.8 failed (got None); gates.require_masks is true but the evaluation set has no masks",
            "pro not below production 0.6250 - 0.02 failed (got 0.5)",
        ],
    }


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_floors_and_the_false_reject_ceiling_may_sit_on_either_end_of_zero_one(value):
    config = GateConfig(image_auroc_min=value, pro_min=value, pixel_auroc_min=value, max_false_reject=value,
                        max_regression=0.0)
    assert (config.image_auroc_min, config.pro_min, config.pixel_auroc_min, config.max_false_reject) == (value,) * 4
    assert config.max_regression == 0.0  # no drop against production allowed at all


def test_a_ceiling_outside_zero_one_or_a_negative_regression_is_refused_with_the_setting_named():
    with pytest.raises(ValueError, match=r"gates.max_false_reject must be in \[0, 1\] or null, got 1.5"):
        GateConfig(max_false_reject=1.5)
    with pytest.raises(ValueError, match=r"gates.max_false_reject must be in \[0, 1\] or null, got -0.1"):
        GateConfig(max_false_reject=-0.1)
    with pytest.raises(ValueError, match=r"gates.max_regression must be >= 0, got -0.01"):
        GateConfig(max_regression=-0.01)
    with pytest.raises(ValueError, match=r"gates.image_auroc_min must be in \[0, 1\] or null, got -0.5"):
        GateConfig(image_auroc_min=-0.5)
