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
