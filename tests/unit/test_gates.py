"""Promotion gates against hand-worked cases: each floor, non-regression, missing metrics, the
operating point against production, and judge() on an evaluation.json built by hand."""

import dataclasses

import pytest
from scipy.stats import beta

from pipeline.lifecycle.gates import GateConfig, check_gates, judge, rate_interval, rise_p_value

#: The floors and non-regression alone: the operating-point gates have their own tests below.
FLOORS = {"max_miss_increase": None, "max_false_reject_increase": None}
CONFIG = GateConfig(image_auroc_min=0.9, pro_min=0.7, pixel_auroc_min=0.8, max_regression=0.02, **FLOORS)
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
                                              require_masks=True, **FLOORS))
    assert not strict["passed"] and len(strict["failures"]) == 2
    assert all("no masks" in f for f in strict["failures"])


def test_a_missing_image_auroc_fails_and_a_disabled_floor_is_not_checked():
    result = check_gates({"pro": 0.9, "pixel_auroc": 0.9}, CONFIG)
    assert not result["passed"] and result["failures"][0].startswith("image_auroc >= 0.9 failed (got None)")
    loose = check_gates({"image_auroc": 0.5}, GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None,
                                                         **FLOORS))
    assert loose == {"passed": True, "defects": "real", "checks": [], "failures": [], "flags": []}


def test_a_production_metric_that_is_missing_skips_only_that_comparison():
    result = check_gates(GOOD, CONFIG, {"image_auroc": 0.99})
    names = [c["name"] for c in result["checks"]]
    assert names[-1] == "image_auroc not below production 0.9900 - 0.02" and len(names) == 4
    assert not result["passed"]  # 0.95 < 0.97


def test_floors_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"gates.pro_min must be in \[0, 1\]"):
        GateConfig(pro_min=1.5)


def test_the_false_reject_ceiling_is_met_at_equality_and_fails_above_or_unmeasured():
    config = GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None, max_false_reject=0.05, **FLOORS)
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
                        max_false_reject=0.05, **FLOORS)
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
        "flags": [],
    }


def test_the_whole_report_of_a_candidate_failing_every_way_with_masks_required():
    config = GateConfig(image_auroc_min=0.9, pro_min=0.7, pixel_auroc_min=0.8, require_masks=True, **FLOORS)
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
        "flags": [],
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


# The operating point against production, worked by hand: 20 defective and 10 good test
# images, each bank deciding them at its own threshold (True = rejected).
OP = GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None, max_miss_increase=0.05,
                max_false_reject_increase=0.05, confidence=0.95)
LABELS = [1] * 20 + [0] * 10


def decided(missed, false_rejects=()):
    """Decisions that miss the defective images at ``missed`` and reject the good ones at
    ``false_rejects`` (indices among the good ones)."""
    return [i not in missed for i in range(20)] + [i in false_rejects for i in range(10)]


def op_gates(candidate, production, config=OP):
    result = check_gates({}, config, decisions={"labels": LABELS, "candidate": candidate, "production": production})
    return result, by_name(result)


def test_a_miss_rate_rise_beyond_noise_fails_with_the_counts_it_rests_on():
    # production misses 2 of 20 (0.10); the candidate misses those and 5 more (0.35): 5 images
    # decided worse, none better; p = 0.5 ** 5 = 1/32 < 0.05.
    result, checks = op_gates(decided({0, 1, 2, 3, 4, 5, 6}), decided({0, 1}))
    miss = checks["miss_rate not above production's + 0.05"]
    assert miss["status"] == "failed" and not result["passed"]
    assert (miss["value"], miss["production"], miss["worse"], miss["better"], miss["n"]) == (0.35, 0.1, 5, 0, 20)
    assert miss["p_value"] == pytest.approx(1 / 32) and miss["limit"] == pytest.approx(0.15)
    assert result["failures"] == [
        "miss_rate not above production's + 0.05 failed (got 0.35); 2 -> 7 of 20 defective test images; "
        "5 decided worse and 0 better than by production, p = 0.0312"]
    assert checks["false_reject_rate not above production's + 0.05"]["status"] == "passed"


def test_a_rise_within_noise_passes_flagged_and_fails_when_no_noise_is_allowed():
    # misses {0, 2, 3, 4} against {0, 1}: 3 worse, 1 better, rise 0.10; p = (4 + 1) / 16.
    candidate, production = decided({0, 2, 3, 4}), decided({0, 1})
    result, checks = op_gates(candidate, production)
    miss = checks["miss_rate not above production's + 0.05"]
    assert result["passed"] and miss["status"] == "passed" and miss["p_value"] == pytest.approx(5 / 16)
    assert result["flags"] == [
        "miss_rate not above production's + 0.05: rose +0.1000, past the setting but within noise at 95% "
        "(2 -> 4 of 20 defective test images; 3 decided worse and 1 better than by production, p = 0.312)"]
    strict, _ = op_gates(candidate, production, dataclasses.replace(OP, confidence=None))
    assert not strict["passed"] and strict["flags"] == []


def test_a_rise_at_the_setting_passes_and_a_swap_is_no_rise():
    result, checks = op_gates(decided({0, 1, 2}), decided({0, 1}))  # 0.10 -> 0.15: +0.05, at the setting
    assert result["passed"] and result["flags"] == []
    assert checks["miss_rate not above production's + 0.05"]["rise"] == pytest.approx(0.05)
    swapped, checks = op_gates(decided({0, 2}), decided({0, 1}))  # one worse, one better
    assert checks["miss_rate not above production's + 0.05"]["rise"] == 0 and swapped["flags"] == []


def test_false_rejects_are_compared_on_the_good_images_only():
    # the candidate rejects 3 of 10 good parts that production accepts: p = 1/8, within noise
    # at 95%, beyond it at 85%; its misses equal production's.
    candidate, production = decided({0}, {1, 4, 7}), decided({0})
    result, checks = op_gates(candidate, production)
    fr = checks["false_reject_rate not above production's + 0.05"]
    assert (fr["value"], fr["production"], fr["n"], fr["worse"]) == (0.3, 0.0, 10, 3) and result["passed"]
    loose, _ = op_gates(candidate, production, dataclasses.replace(OP, confidence=0.85))
    assert not loose["passed"] and loose["failures"][0].startswith("false_reject_rate not above production's")


def test_without_a_production_bank_the_comparison_is_not_evaluated_and_says_why():
    result = check_gates({}, OP, decisions={"labels": LABELS, "candidate": decided(set()), "production": None})
    assert result["passed"]
    assert {c["status"] for c in result["checks"]} == {"not evaluated"}
    assert {c["reason"] for c in result["checks"]} == {"there is no production bank to compare with"}
    unknown = check_gates({}, OP)
    assert {c["reason"] for c in unknown["checks"]} == {"the banks' decisions on the test images were not given"}


def test_the_miss_rate_ceiling_names_the_images_and_their_exact_interval():
    config = GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None, max_miss_rate=0.3, **FLOORS)
    result = check_gates({"miss_rate": 7 / 20, "n_defect": 20}, config)
    check = by_name(result)["miss_rate <= 0.3"]
    assert not result["passed"] and check["n"] == 20
    assert check["interval"] == pytest.approx([0.1539, 0.5922], abs=1e-4)  # Clopper-Pearson, binom.test(7, 20)
    assert result["failures"] == [
        "miss_rate <= 0.3 failed (got 0.35); 7 of 20 defective test images, interval 0.154-0.592"]
    assert check_gates({"miss_rate": 0.3, "n_defect": 20}, config)["passed"]


def test_the_exact_mcnemar_tail_by_hand():
    assert rise_p_value(5, 0) == 1 / 32
    assert rise_p_value(3, 1) == 5 / 16
    assert rise_p_value(0, 0) == 1.0
    assert rise_p_value(0, 4) == 1.0


def test_an_exact_tail_at_the_significance_level_is_within_noise():
    # 2 decided worse, none better: p = 0.5 ** 2 = 0.25, exactly 1 - 0.75. A p-value at the
    # level is not beyond noise, so the rise (0.10 -> 0.20, past 0.05) passes, flagged.
    at_level = dataclasses.replace(OP, confidence=0.75)
    result, checks = op_gates(decided({0, 1, 2, 3}), decided({0, 1}), at_level)
    miss = checks["miss_rate not above production's + 0.05"]
    assert miss["p_value"] == 0.25 and miss["status"] == "passed" and result["passed"]
    assert result["flags"] == [
        "miss_rate not above production's + 0.05: rose +0.1000, past the setting but within noise at 75% "
        "(2 -> 4 of 20 defective test images; 2 decided worse and 0 better than by production, p = 0.25)"]
    # one more image decided worse: p = 1/8 < 0.25, beyond noise
    beyond, _ = op_gates(decided({0, 1, 2, 3, 4}), decided({0, 1}), at_level)
    assert not beyond["passed"] and beyond["flags"] == []


def test_a_class_with_no_test_images_is_not_evaluated_and_says_which_class():
    # every test image is defective: the false-reject rise has nothing to be measured on
    labels = [1] * 4
    decisions = {"labels": labels, "candidate": [True, True, False, True], "production": [True] * 4}
    result = check_gates({}, OP, decisions=decisions)
    fr = by_name(result)["false_reject_rate not above production's + 0.05"]
    assert fr == {"name": "false_reject_rate not above production's + 0.05", "value": None, "limit": 0.05,
                  "passed": True, "status": "not evaluated",
                  "reason": "no good test images decided by both banks"}
    miss = by_name(result)["miss_rate not above production's + 0.05"]
    assert miss["detail"].startswith("0 -> 1 of 4 defective test images")  # 1 worse: p = 0.5, within noise
    assert result["passed"] and len(result["flags"]) == 1


def test_production_that_could_not_decide_the_images_is_not_evaluated_with_the_reason_given():
    why = "production was not scored on the same test images at a threshold"
    result = check_gates({}, OP, decisions={"labels": LABELS, "candidate": decided(set()), "production": None,
                                            "unavailable": why})
    assert result["passed"] and result["failures"] == []
    assert [(c["name"], c["status"], c["reason"]) for c in result["checks"]] == [
        ("miss_rate not above production's + 0.05", "not evaluated", why),
        ("false_reject_rate not above production's + 0.05", "not evaluated", why)]


def test_the_false_reject_ceiling_names_the_good_images_and_its_interval_at_the_set_confidence():
    # 3 of 60 good parts rejected: 0.05, at the ceiling. Clopper-Pearson at 80%:
    # [Beta(0.1; 3, 58), Beta(0.9; 4, 57)] quantiles (computed here by scipy, independently of gates).
    config = GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None, max_false_reject=0.05,
                        confidence=0.8, **FLOORS)
    check = by_name(check_gates({"false_reject_rate": 3 / 60, "n_good": 60}, config))["false_reject_rate <= 0.05"]
    low, high = beta.ppf(0.1, 3, 58), beta.ppf(0.9, 4, 57)
    assert check["status"] == "passed" and check["n"] == 60
    assert check["interval"] == pytest.approx([low, high], rel=1e-9)
    assert check["detail"] == f"3 of 60 good test images, interval {low:.3f}-{high:.3f}"
    # without a confidence setting (every rise fails) the interval is still given, at 95%
    loose = dataclasses.replace(config, confidence=None)
    check = by_name(check_gates({"false_reject_rate": 3 / 60, "n_good": 60}, loose))["false_reject_rate <= 0.05"]
    assert check["interval"] == pytest.approx([beta.ppf(0.025, 3, 58), beta.ppf(0.975, 4, 57)], rel=1e-9)


def test_an_unmeasured_ceiling_fails_and_the_next_ceiling_is_still_checked():
    # no good test images, so no false-reject rate; the miss rate (2 of 20) is still judged.
    config = GateConfig(image_auroc_min=None, pro_min=None, pixel_auroc_min=None, max_false_reject=0.05,
                        max_miss_rate=0.1, **FLOORS)
    result = check_gates({"false_reject_rate": None, "n_good": 0, "miss_rate": 0.1, "n_defect": 20}, config)
    assert [(c["name"], c["status"]) for c in result["checks"]] == [
        ("false_reject_rate <= 0.05", "failed"), ("miss_rate <= 0.1", "passed")]
    assert result["failures"] == ["false_reject_rate <= 0.05 failed (got None); no good test images to measure it on"]


@pytest.mark.parametrize("n", [1, 5, 20])
def test_clopper_pearson_at_the_ends_has_a_closed_form(n):
    # Beta(1, n) and Beta(n, 1) have closed-form quantiles, so the textbook bounds are
    # k = 0: [0, 1 - (a/2)^(1/n)];  k = n: [(a/2)^(1/n), 1];  k = 1: low 1 - (1 - a/2)^(1/n).
    a = 0.05
    assert rate_interval(0, n) == pytest.approx((0.0, 1 - (a / 2) ** (1 / n)), rel=1e-9)
    assert rate_interval(0, n)[0] == 0.0 and rate_interval(n, n)[1] == 1.0
    assert rate_interval(n, n) == pytest.approx(((a / 2) ** (1 / n), 1.0), rel=1e-9)
    if n > 1:
        assert rate_interval(1, n)[0] == pytest.approx(1 - (1 - a / 2) ** (1 / n), rel=1e-9)
    # at 90%: a = 0.10
    assert rate_interval(0, n, 0.9)[1] == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)


def test_clopper_pearson_of_ten_images_against_published_values():
    # 0 of 10: the 95% two-sided upper bound is 1 - 0.025 ** 0.1 = 0.3085 (Clopper-Pearson tables)
    assert rate_interval(0, 10) == pytest.approx((0.0, 0.3085), abs=1e-4)
    # 1 of 10: [0.0025, 0.4450] (binom.test(1, 10) in R)
    assert rate_interval(1, 10) == pytest.approx((0.0025, 0.4450), abs=1e-4)


def test_confidence_must_be_at_least_a_half_and_below_one():
    assert GateConfig(confidence=0.5).confidence == 0.5 and GateConfig(confidence=None).confidence is None
    for bad in (1.0, 1.5, 0.49):
        with pytest.raises(ValueError, match=rf"gates.confidence must be in \[0.5, 1\) or null, got {bad}"):
            GateConfig(confidence=bad)


# judge() reads evaluation.json as pipeline.lifecycle.steps.evaluate_step writes it: the
# candidate's metrics (its own threshold among them), the evaluation set (None for real
# defects), the per-image labels and scores, and production (production_metrics: its metrics
# at its own recorded threshold, bank_id, threshold_source and its scores on the same images).
# 8 defective then 8 good images. The candidate rejects at 0.5 (a score of 0.5 is rejected):
# it catches 3 defects and misses 5, and rejects 2 good ones. Production rejects at 2.0 on its
# own scale: it catches all 8 (one exactly at 2.0) and rejects no good one.
JUDGE = GateConfig(max_miss_increase=0.05, max_false_reject_increase=0.05)
PER_IMAGE = {"labels": [1] * 8 + [0] * 8,
             "scores": [0.9, 0.8, 0.5, 0.3, 0.2, 0.1, 0.4, 0.49] + [0.6, 0.7, 0.1, 0.2, 0.3, 0.0, 0.45, 0.49]}
CANDIDATE = {"image_auroc": 0.9, "pixel_auroc": 0.85, "pro": 0.7, "n_good": 8, "n_defect": 8, "threshold": 0.5,
             "threshold_method": "nominal_0.99", "false_reject_rate": 0.25, "miss_rate": 0.625, "f1": 6 / 13,
             "threshold_chosen_on": "calibration split (4 good, 0 defective)", "seconds": 1.5}
PRODUCTION = {"image_auroc": 0.95, "pixel_auroc": 0.85, "pro": 0.7, "n_good": 8, "n_defect": 8, "threshold": 2.0,
              "threshold_method": "nominal_0.99", "false_reject_rate": 0.0, "miss_rate": 0.0, "f1": 1.0,
              "bank_id": "b-prod", "threshold_source": "its own recorded threshold",
              "scores": [3.0, 2.5, 2.2, 2.0, 2.1, 2.9, 3.3, 2.4] + [1.0, 1.9, 0.5, 1.2, 1.1, 0.3, 1.5, 1.99]}


def evaluation(**changes):
    return {"bank_id": "b-new", "metrics": CANDIDATE, "evaluation_set": None, "per_image": PER_IMAGE,
            "production": PRODUCTION} | changes


def test_judge_decides_both_banks_at_their_own_thresholds_and_reports_every_gate():
    result = judge(evaluation(), JUDGE)
    assert result["passed"] is False and result["defects"] == "real"
    assert [(c["name"], c["status"]) for c in result["checks"]] == [
        ("image_auroc >= 0.8", "passed"), ("pro >= 0.6", "passed"), ("pixel_auroc >= 0.8", "passed"),
        ("image_auroc not below production 0.9500 - 0.02", "failed"),
        ("pro not below production 0.7000 - 0.02", "passed"),
        ("pixel_auroc not below production 0.8500 - 0.02", "passed"),
        ("miss_rate not above production's + 0.05", "failed"),
        ("false_reject_rate not above production's + 0.05", "passed")]
    # 5 defects missed that production caught, none the other way: p = 1/32, beyond noise.
    # 2 good parts rejected that production accepted: p = 1/4, within noise, flagged.
    assert result["failures"] == [
        "image_auroc not below production 0.9500 - 0.02 failed (got 0.9)",
        "miss_rate not above production's + 0.05 failed (got 0.625); 0 -> 5 of 8 defective test images; "
        "5 decided worse and 0 better than by production, p = 0.0312"]
    assert result["flags"] == [
        "false_reject_rate not above production's + 0.05: rose +0.2500, past the setting but within noise at 95% "
        "(0 -> 2 of 8 good test images; 2 decided worse and 0 better than by production, p = 0.25)"]
    assert result["production_metrics"] == {k: v for k, v in PRODUCTION.items() if k != "scores"}


def test_judge_of_a_first_bank_has_nothing_to_compare_with():
    result = judge(evaluation(production=None), JUDGE)
    assert result["passed"] and result["failures"] == [] and result["production_metrics"] is None
    assert [(c["name"], c["status"], c.get("reason")) for c in result["checks"]][3:] == [
        ("miss_rate not above production's + 0.05", "not evaluated", "there is no production bank to compare with"),
        ("false_reject_rate not above production's + 0.05", "not evaluated",
         "there is no production bank to compare with")]


@pytest.mark.parametrize("production", [
    PRODUCTION | {"scores": PRODUCTION["scores"][:-1]},  # scored on other images
    PRODUCTION | {"threshold": None},  # no threshold of its own
    {k: v for k, v in PRODUCTION.items() if k != "scores"},  # not scored image by image
])
def test_judge_with_production_not_decided_on_the_same_images_says_so_and_still_compares_metrics(production):
    result = judge(evaluation(production=production), JUDGE)
    checks = by_name(result)
    why = "production was not scored on the same test images at a threshold"
    for name in ("miss_rate not above production's + 0.05", "false_reject_rate not above production's + 0.05"):
        assert (checks[name]["status"], checks[name]["reason"]) == ("not evaluated", why)
    assert result["failures"] == ["image_auroc not below production 0.9500 - 0.02 failed (got 0.9)"]
    assert result["production_metrics"]["bank_id"] == "b-prod" and "scores" not in result["production_metrics"]


@pytest.mark.parametrize("changes", [
    {"per_image": None},  # an evaluation.json written before per-image scores were kept
    {"metrics": CANDIDATE | {"threshold": None}},  # a candidate without a threshold
])
def test_judge_without_the_candidates_decisions_says_they_were_not_given(changes):
    result = judge(evaluation(**changes), JUDGE)
    rises = [c for c in result["checks"] if "production's" in c["name"]]
    assert [(c["status"], c["reason"]) for c in rises] == [
        ("not evaluated", "the banks' decisions on the test images were not given")] * 2
    assert result["failures"] == ["image_auroc not below production 0.9500 - 0.02 failed (got 0.9)"]


def test_judge_of_a_synthetic_evaluation_set_names_every_gate_synthetic():
    result = judge(evaluation(evaluation_set={"spec": "synthetic:cutpaste", "synthetic": True}), JUDGE)
    assert result["defects"] == "synthetic" and len(result["checks"]) == 8
    assert all(c["name"].startswith("synthetic ") for c in result["checks"])
    assert result["failures"][1].startswith("synthetic miss_rate not above production's + 0.05 failed (got 0.625)")
