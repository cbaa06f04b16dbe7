"""Decision thresholds and the operating point, against hand-worked cases."""

import numpy as np
import pytest

from pipeline.evaluation.evaluate import choose_threshold, operating_point

# 10 good parts scoring 1..10, 4 defective ones scoring 6, 9, 11, 12.
LABELS = np.array([0] * 10 + [1] * 4)
SCORES = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 6, 9, 11, 12], dtype=float)


def test_nominal_threshold_is_the_quantile_of_good_scores_for_the_target_false_reject():
    chosen = choose_threshold(LABELS, SCORES, "nominal", target_false_reject=0.1)
    # numpy's linear quantile at 0.9 of 1..10: 1 + 0.9 * 9 = 9.1
    assert chosen == {"threshold": pytest.approx(9.1), "threshold_method": "nominal_quantile_0.9"}
    point = operating_point(LABELS, SCORES, chosen["threshold"])
    # rejected (score >= 9.1): good 10; defective 11, 12 -> 1 of 10 good, 2 of 4 missed
    assert point["false_reject_rate"] == pytest.approx(0.1) and point["miss_rate"] == pytest.approx(0.5)
    assert point["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))


def test_auto_is_f1_optimal_with_both_classes_and_nominal_without_defects():
    chosen = choose_threshold(LABELS, SCORES, "auto")
    # thresholds 11 (tp 2, fp 0, fn 2: F1 0.667) and 9 (tp 3, fp 2, fn 1: F1 0.667) tie with
    # 6 (tp 4, fp 5: 0.615); sklearn's curve keeps the highest-recall maximum in order, so 9
    assert chosen["threshold_method"] == "f1_optimal"
    assert chosen["f1"] == pytest.approx(2 / 3)
    assert operating_point(LABELS, SCORES, chosen["threshold"])["f1"] == pytest.approx(chosen["f1"])
    good_only = choose_threshold(np.zeros(10, int), SCORES[:10], "auto")
    assert good_only["threshold_method"] == "nominal_quantile_0.99"
    assert good_only["threshold"] == pytest.approx(1 + 0.99 * 9)


def test_f1_without_defects_gives_no_threshold_and_unknown_methods_are_refused():
    assert choose_threshold(np.zeros(10, int), SCORES[:10], "f1") == {"threshold": None, "threshold_method": None}
    assert operating_point(LABELS, SCORES, None) == {"false_reject_rate": None, "miss_rate": None, "f1": None}
    with pytest.raises(ValueError, match="threshold method must be one of"):
        choose_threshold(LABELS, SCORES, "median")


# --- threshold estimators (pipeline.evaluation.threshold) -------------------------------------

from pipeline.evaluation.threshold import estimate  # noqa: E402

ONE_TO_TEN = np.array([7, 3, 10, 1, 5, 9, 2, 8, 6, 4], dtype=float)


@pytest.mark.parametrize("n", [1, 7, 52, 149])
@pytest.mark.parametrize("target", [0.01, 0.0125, 0.05, 0.1])
def test_the_quantile_estimator_is_todays_nominal_threshold_exactly(n, target):
    scores = np.random.default_rng(n).lognormal(3.0, 0.1, n).astype(np.float32)
    today = choose_threshold(np.zeros(n, int), scores, "nominal", target_false_reject=target)
    assert estimate(scores, target, "quantile")["value"] == today["threshold"]


def test_the_quantile_and_its_order_statistic_interval_by_hand():
    # p = 0.9 of 1..10: linear quantile 1 + 0.9 * 9 = 9.1. B ~ Binomial(10, 0.9) scores lie
    # below xi: P(B <= 6) = 0.0128 <= 0.025 < P(B <= 7) = 0.0702, so l = 7; P(B >= 10) = 0.349 >
    # 0.025, so no order statistic bounds it above
    result = estimate(ONE_TO_TEN, 0.1, "quantile")
    assert result == {"value": pytest.approx(9.1), "estimator": "quantile", "ci": [7.0, np.inf],
                      "n_calibration": 10, "kept_previous": False}
    # the median: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024, symmetric: [x_(2), x_(9)]
    assert estimate(ONE_TO_TEN, 0.5, "quantile")["ci"] == [2.0, 9.0]
    # at 90% each side may miss 0.05: P(B <= 2) = 0.0547 > 0.05, so still [x_(2), x_(9)]; at 80%
    # (0.1 a side) P(B <= 2) <= 0.1 < P(B <= 3) = 176/1024: [x_(3), x_(8)]
    assert estimate(ONE_TO_TEN, 0.5, "quantile", confidence=0.9)["ci"] == [2.0, 9.0]
    assert estimate(ONE_TO_TEN, 0.5, "quantile", confidence=0.8)["ci"] == [3.0, 8.0]
    # the edge is inside: 1..5 at the median, P(B <= 0) = P(B >= 5) = 1/32, so at confidence
    # 1 - 2/32 the interval is [x_(1), x_(5)], and at any higher confidence unbounded
    assert estimate(ONE_TO_TEN[ONE_TO_TEN <= 5], 0.5, "quantile", confidence=1 - 2 / 32)["ci"] == [1.0, 5.0]
    assert estimate(ONE_TO_TEN[ONE_TO_TEN <= 5], 0.5, "quantile", confidence=0.94)["ci"] == [-np.inf, np.inf]


def test_the_unbiased_frr_quantile_by_hand():
    # position p (N + 1) = 0.9 * 11 = 9.9 of 1..10: 9 + 0.9 * (10 - 9); at p = 0.99 beyond N: the largest
    assert estimate(ONE_TO_TEN, 0.1, "unbiased_frr")["value"] == pytest.approx(9.9)
    assert estimate(ONE_TO_TEN, 0.01, "unbiased_frr")["value"] == 10.0
    assert estimate(ONE_TO_TEN, 0.1, "unbiased_frr")["ci"] == [7.0, np.inf]


def test_harrell_davis_by_hand():
    # n = 3, p = 0.5: Beta(2, 2) has cdf 3x^2 - 2x^3, 7/27 at 1/3, 20/27 at 2/3: weights 7, 13, 7 (/27)
    result = estimate(np.array([3.0, 0.0, 1.0]), 0.5, "harrell_davis")
    assert result["value"] == pytest.approx((0 * 7 + 1 * 13 + 3 * 7) / 27)
    assert estimate(np.array([2.0, 6.0]), 0.5, "harrell_davis")["value"] == pytest.approx(4.0)
    # n = 3, p = 0.75: Beta(3, 1) has cdf x^3: 1/27, 8/27, 1 at the thirds: weights 1, 7, 19 (/27)
    assert estimate(np.array([3.0, 0.0, 1.0]), 0.25, "harrell_davis")["value"] == pytest.approx((7 + 3 * 19) / 27)


def _standardised(n: int) -> np.ndarray:
    x = np.arange(n, dtype=float) ** 1.5
    return (x - x.mean()) / x.std(ddof=1)


def test_the_normal_fit_is_mean_plus_z_sd_and_its_upper_bound_the_tabled_tolerance_factor():
    scores = 20.0 + 2.0 * _standardised(10)  # mean 20, sd 2
    result = estimate(scores, 0.01, "normal", confidence=0.9)
    assert result["value"] == pytest.approx(20.0 + 2.0 * 2.3263, abs=1e-3)
    # one-sided 95% / 99% normal tolerance factor for n = 10 is 3.981 (Natrella's tables)
    assert result["ci"][1] == pytest.approx(20.0 + 2.0 * 3.981, abs=2e-3)
    assert result["ci"][0] < result["value"] < result["ci"][1]
    logged = estimate(np.exp(scores / 10), 0.01, "lognormal", confidence=0.9)
    assert np.log(logged["value"]) * 10 == pytest.approx(result["value"])
    assert np.log(logged["ci"][1]) * 10 == pytest.approx(result["ci"][1])


def test_hold_keeps_the_previous_threshold_inside_the_interval_and_moves_outside_it():
    # quantile base on 1..10 at p = 0.9: 9.1 with interval [7, inf)
    kept = estimate(ONE_TO_TEN, 0.1, "hold", base="quantile", previous=8.0)
    assert kept["value"] == 8.0 and kept["kept_previous"] and kept["estimator"] == "hold(quantile)"
    assert kept["ci"] == [7.0, np.inf]
    assert estimate(ONE_TO_TEN, 0.1, "hold", base="quantile", previous=7.0)["kept_previous"]  # the edge is inside
    moved = estimate(ONE_TO_TEN, 0.1, "hold", base="quantile", previous=6.5)
    assert moved["value"] == pytest.approx(9.1) and not moved["kept_previous"]
    first = estimate(ONE_TO_TEN, 0.1, "hold", base="quantile")
    assert first["value"] == pytest.approx(9.1) and not first["kept_previous"]
    # normal base (mean 20, sd 2, n = 10): the 95% interval is bounded above too
    scores = 20.0 + 2.0 * _standardised(10)
    lo, hi = estimate(scores, 0.01, "normal")["ci"]
    assert estimate(scores, 0.01, "hold", base="normal", previous=hi - 0.01)["value"] == hi - 0.01
    above = estimate(scores, 0.01, "hold", base="normal", previous=hi + 0.01)
    assert above["value"] == pytest.approx(20.0 + 2.0 * 2.3263, abs=1e-3) and not above["kept_previous"]
    assert not estimate(scores, 0.01, "hold", base="normal", previous=lo - 0.01)["kept_previous"]
    # the other estimators ignore a previous threshold
    assert estimate(ONE_TO_TEN, 0.1, "quantile", previous=8.0)["value"] == pytest.approx(9.1)


def test_the_bootstrap_is_reproducible_and_inside_its_interval():
    scores = np.random.default_rng(3).lognormal(3.0, 0.1, 52)
    first, again = estimate(scores, 0.01, "bootstrap"), estimate(scores, 0.01, "bootstrap")
    assert first == again
    assert first["ci"][0] < first["value"] < first["ci"][1]
    assert np.quantile(scores, 0.9) < first["value"] < scores.max() * 1.05


def test_bad_inputs_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimate(ONE_TO_TEN, 0.01, "median")
    with pytest.raises(ValueError, match="base of a hold must be one of"):
        estimate(ONE_TO_TEN, 0.01, "hold", base="hold")
    with pytest.raises(ValueError, match=r"target_false_reject must be in \(0, 1\)"):
        estimate(ONE_TO_TEN, 0.0)
    with pytest.raises(ValueError, match="no good calibration scores"):
        estimate(np.zeros(0), 0.01)
    with pytest.raises(ValueError, match="at least 2 good scores"):
        estimate(np.ones(1), 0.01, "normal")
    with pytest.raises(ValueError, match="positive scores"):
        estimate(np.array([0.0, 1.0, 2.0]), 0.01, "lognormal")
