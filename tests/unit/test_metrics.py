import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    f1_optimal_threshold,
    image_auroc,
    integrate_to,
    pixel_auroc,
    pro_curve,
    pro_score,
    roc_points,
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


def test_pro_over_several_images_averages_every_region_of_the_set_worked_by_hand():
    # Three 4x4 images, 48 px: A (1 px) and B (2 px) in the first, C (2x2) and D (1 px) in the
    # second, the third good. R = 4 regions over the set and 48 - 8 = 40 nominal pixels.
    masks = [np.zeros((4, 4), bool) for _ in range(3)]
    maps = [np.zeros((4, 4)) for _ in range(3)]
    masks[0][0, 0] = True  # A
    masks[0][3, 2:4] = True  # B
    masks[1][0:2, 0:2] = True  # C
    masks[1][3, 3] = True  # D
    maps[0][0, 0] = 0.9  # A found first
    maps[0][3, 2] = 0.7  # half of B; its other pixel stays at 0 with the background
    maps[1][0:2, 0:2] = 0.8  # C, four tied pixels
    maps[1][3, 3] = 0.5  # D
    maps[2][0, 0:2] = 0.85  # 2 nominal pixels of the good image above most defects
    maps[2][1, 0:4] = 0.6  # 4 more
    curve = pro_curve(masks, maps)
    # threshold: 0.9 -> A (1/4); 0.85 -> 2/40 nominal; 0.8 -> + C; 0.7 -> + B/2; 0.6 -> 6/40 nominal;
    # 0.5 -> + D; 0 -> everything: mean over the 4 regions (A, B, C, D), not per image
    np.testing.assert_allclose(curve.thresholds, [np.inf, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.0])
    np.testing.assert_allclose(curve.fpr, [0, 0, 2 / 40, 2 / 40, 2 / 40, 6 / 40, 6 / 40, 1.0])
    np.testing.assert_allclose(curve.pro, [0, 1 / 4, 1 / 4, 2 / 4, 2.5 / 4, 2.5 / 4, 3.5 / 4, 1.0])
    # area to FPR 0.3: 0.05 * 1/4, then 0.1 * 2.5/4, then a trapezoid from (0.15, 7/8) to (0.3, y)
    # with y on the segment to (1, 1): 7/8 + (0.15 / 0.85) * 1/8
    y = 7 / 8 + (0.15 / 0.85) / 8
    area = 0.05 * 0.25 + 0.1 * 0.625 + 0.15 * (7 / 8 + y) / 2
    assert pro_score(masks, maps, max_fpr=0.3) == pytest.approx(area / 0.3)
    assert pro_score(masks, [m.astype(float) for m in masks], max_fpr=0.3) == pytest.approx(1.0)


def test_pro_regions_use_eight_connectivity():
    # An L of 3 pixels: (1, 1) meets (2, 2) at a corner only. 8-connected it is one region of
    # 3 px, so finding (2, 2) covers 1/3 of it (4-connected it would be mean(0, 1/2) = 1/4).
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = mask[2, 3] = True
    amap = np.zeros((5, 5))
    amap[2, 2] = 1.0
    assert pro_curve([mask], [amap]).pro[1] == pytest.approx(1 / 3)


def test_pro_refuses_unusable_inputs_with_the_reason():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match=r"^mask shape \(4, 4\) differs from map shape \(4, 5\)$"):
        pro_curve([mask], [np.zeros((4, 5))])
    with pytest.raises(ValueError):  # a map without its mask, either way round
        pro_curve([mask, mask], [np.zeros((4, 4))])
    with pytest.raises(ValueError):
        pro_curve([mask], [np.zeros((4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="^PRO needs at least one defect region in the masks$"):
        pro_curve([np.zeros((4, 4), bool)], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match=r"^PRO needs nominal \(background\) pixels to measure false positives$"):
        pro_curve([np.ones((4, 4), bool)], [np.zeros((4, 4))])


def test_integrate_to_interpolates_a_rising_segment_at_the_limit():
    x = np.array([0.0, 0.2, 0.5, 1.0])
    y = np.array([0.0, 0.4, 1.0, 1.0])
    # y(0.3) = 0.4 + (0.1 / 0.3) * 0.6 = 0.6; area = 0.2 * 0.4 / 2 + 0.1 * (0.4 + 0.6) / 2
    assert integrate_to(x, y, 0.3) == pytest.approx(0.04 + 0.05)
    # a limit on a point: no interpolation, the area up to it
    assert integrate_to(x, y, 0.5) == pytest.approx(0.04 + 0.3 * (0.4 + 1.0) / 2)


def test_integrate_to_the_ends_of_the_curve():
    x = np.array([0.0, 0.0, 0.5, 0.8])  # a curve that starts with a vertical step and stops at 0.8
    y = np.array([0.0, 0.5, 1.0, 1.0])
    whole = 0.5 * (0.5 + 1.0) / 2 + 0.3 * 1.0  # trapezoids 0..0.5 and 0.5..0.8
    assert integrate_to(x, y, 0.0) == 0.0  # no width, no area, whatever the step at 0
    # a limit at or past the last point: the area of the whole curve, nothing made up beyond it
    assert integrate_to(x, y, 0.8) == pytest.approx(whole)
    assert integrate_to(x, y, 1.0) == pytest.approx(whole)
    # PRO's own curve ends at FPR 1: a max_fpr of 1 is the area under all of it
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    amap = np.zeros((4, 4))
    amap[0, 0], amap[1, 1] = 0.5, 0.9  # one nominal pixel (1/15 of them) above the region
    assert pro_score([mask], [amap], max_fpr=1.0) == pytest.approx(1 - 1 / 15)


def test_f1_threshold_of_a_weak_model_and_of_a_top_scored_defect():
    # 20 images by descending score: 2 good, a defect, 16 good, the other defect last. Calling
    # the top 3 defective gives precision 1/3, recall 1/2, F1 = 2 (1/6) / (5/6) = 0.4; calling
    # all 20 gives F1 = 2 (0.1) / 1.1 = 0.18. The best threshold is the first defect's score.
    labels = np.array([0, 0, 1] + [0] * 16 + [1])
    scores = np.linspace(1.0, 0.05, 20)
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert threshold == pytest.approx(0.9) and f1 == pytest.approx(0.4)
    # the one defect scores highest: the threshold is its score
    threshold, f1 = f1_optimal_threshold(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.9]))
    assert threshold == pytest.approx(0.9) and f1 == 1.0


def test_roc_points_worked_by_hand():
    # descending scores 0.8 (defect), 0.4 (good), 0.35 (defect), 0.1 (good)
    fpr, tpr = roc_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
