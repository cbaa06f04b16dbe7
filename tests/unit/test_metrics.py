import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    f1_optimal_threshold,
    image_auroc,
    integrate_to,
    pixel_auroc,
    pro_curve,
    pro_score,
)


def test_pro_two_regions_worked_by_hand():
    # One 4x4 image: region A (2 px) top-left, region B (4 px) bottom-right; 10 nominal px.
    mask = np.zeros((4, 4), bool)
    mask[0, 0:2] = True
    mask[2:4, 2:4] = True
    amap = np.zeros((4, 4))
    amap[0, 0] = 0.9  # half of A at the top score
    amap[2:4, 2:4] = [[0.8, 0.8], [0.8, 0.1]]  # 3/4 of B next
    amap[1, 1] = 0.85  # one nominal pixel between them
    curve = pro_curve([mask], [amap])
    # thresholds 0.9, 0.85, 0.8, ...: PRO = mean(A overlap, B overlap)
    assert curve.pro[1] == pytest.approx((0.5 + 0.0) / 2)
    assert curve.fpr[1] == 0.0
    assert curve.fpr[2] == pytest.approx(1 / 10) and curve.pro[2] == pytest.approx(0.25)
    assert curve.pro[3] == pytest.approx((0.5 + 0.75) / 2)


def test_pro_perfect_and_inverted_maps():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    assert pro_score([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert pro_score([mask], [(~mask).astype(float)]) == pytest.approx(0.0)


def test_pro_regions_weighted_equally_regardless_of_size():
    mask = np.zeros((20, 20), bool)
    mask[0:10, 0:10] = True  # big region, found
    mask[15, 15] = True  # tiny region, missed
    amap = mask.astype(float)
    amap[15, 15] = 0.0
    curve = pro_curve([mask], [amap])
    assert curve.pro[1] == pytest.approx(0.5)


def test_pro_regions_use_eight_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region
    amap = np.zeros((5, 5))
    amap[1, 1] = 1.0
    assert pro_curve([mask], [amap]).pro[1] == pytest.approx(0.5)


def test_integrate_to_interpolates_at_limit():
    x = np.array([0.0, 0.2, 0.4, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    # area to 0.3: triangle 0..0.2 (0.1) plus 0.1 * 1
    assert integrate_to(x, y, 0.3) == pytest.approx(0.2)


def test_image_auroc_and_pixel_auroc():
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert image_auroc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    mask = np.zeros((4, 4), bool)
    mask[0] = True
    assert pixel_auroc([mask], [mask.astype(float)]) == 1.0


def test_f1_threshold_separates_classes():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert f1 == 1.0 and 0.3 < threshold <= 0.7
