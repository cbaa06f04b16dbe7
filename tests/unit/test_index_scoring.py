import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from pipeline.patchcore import scoring
from pipeline.patchcore.features import Placement
from pipeline.patchcore.index import NNIndex
from pipeline.patchcore.scoring import (
    anomaly_maps,
    gaussian_kernel,
    grid_blur_operator,
    reweighted_image_scores,
    smoothed_image_scores,
    to_original,
)


@pytest.fixture(autouse=True)
def _fresh_operators():
    """Each test builds the map and blur operators it uses: the caches would otherwise hand
    it matrices an earlier test (or, under `make mutate`, the unmutated code) built."""
    scoring.map_operator.cache_clear()
    scoring.grid_blur_operator.cache_clear()
    yield


def _bank(m=300, d=24, seed=0):
    return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


def test_flat_search_matches_brute_force():
    bank, queries = _bank(), _bank(50, seed=1)
    dist, idx = NNIndex("flat").fit(bank).search(queries, 3)
    full = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)
    expected = np.argsort(full, axis=1)[:, :3]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(full, expected, 1), rtol=1e-4)


def test_flat_top1_of_many_queries_matches_faiss_and_brute_force(tmp_path):
    # 600 queries take the GEMM path (>= 256); compare with faiss itself and with numpy.
    bank, queries = _bank(2000, 40) * 5, _bank(600, 40, seed=3) * 5
    index = NNIndex("flat").fit(bank)
    dist, idx = index.search(queries, 1)
    assert dist.shape == idx.shape == (600, 1) and dist.dtype == np.float32 and idx.dtype == np.int64
    full = ((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx[:, 0], full.argmin(1))
    np.testing.assert_allclose(dist[:, 0], full.min(1), rtol=1e-5)
    faiss_dist, faiss_idx = index.index_.search(queries, 1)
    np.testing.assert_array_equal(idx, faiss_idx)
    np.testing.assert_allclose(dist, faiss_dist, rtol=1e-5)
    index.save(tmp_path)
    loaded_dist, loaded_idx = NNIndex.load(tmp_path).search(queries, 1)
    np.testing.assert_array_equal(loaded_idx, idx)
    np.testing.assert_allclose(loaded_dist, dist, rtol=1e-6)
    self_dist, self_idx = index.search(bank[:300], 1)  # a bank vector finds itself at distance ~0
    np.testing.assert_array_equal(self_idx[:, 0], np.arange(300))
    assert np.all(self_dist >= 0) and float(self_dist.max()) < 1e-3


def test_index_save_load_round_trip(tmp_path):
    bank, queries = _bank(), _bank(10, seed=2)
    index = NNIndex("flat").fit(bank)
    index.save(tmp_path)
    loaded = NNIndex.load(tmp_path)
    assert loaded.ntotal == 300
    np.testing.assert_array_equal(index.search(queries, 2)[1], loaded.search(queries, 2)[1])


def test_ivfpq_finds_most_true_neighbours():
    bank = _bank(12000, 32)
    queries = bank[:200] + 0.01
    _, idx = NNIndex("ivfpq", nprobe=32).fit(bank).search(queries, 1)
    assert (idx[:, 0] == np.arange(200)).mean() > 0.9


def test_eq7_worked_case():
    # Bank on a line: m* = (0,0) with neighbours at distance 1 and 2 from it.
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]], np.float32)
    index = NNIndex("flat").fit(bank)
    query = np.array([[[0.0, 3.0], [0.0, 1.0]]], np.float32)  # (B=1, P=2, D=2)
    patch = np.array([[3.0, 1.0]], np.float32)
    nearest = np.array([[0, 0]])
    score = reweighted_image_scores(query, patch, nearest, bank, index, num_neighbors=3)[0]
    d = np.array([3.0, math.sqrt(10.0), math.sqrt(13.0)])  # query to m*, bank[1], bank[2]
    expected = (1 - math.exp(d[0]) / np.exp(d).sum()) * 3.0
    assert score == pytest.approx(expected, rel=1e-5)
    plain = reweighted_image_scores(query, patch, nearest, bank, index, num_neighbors=1)[0]
    assert plain == pytest.approx(3.0)


def _eq7_by_brute_force(query, bank, m_star, b):
    """Eq. 7 read off the paper: the b bank features nearest to m* (m* first, by numpy sort)."""
    around_m_star = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1), kind="stable")[:b]
    d = np.linalg.norm(bank[around_m_star].astype(np.float64) - query, axis=1)
    return (1 - math.exp(d[0]) / np.exp(d).sum()) * d[0]


def test_eq7_weighs_with_the_neighbours_of_m_star_not_those_of_the_query():
    # m* = (0, 0) is the query's nearest bank feature. Its neighbours are bank[1] (left, 1.0)
    # and bank[2] (below, 1.1); the query's are bank[3] (right of m*) and bank[2]: the two sets
    # differ, and Eq. 7 takes the first.
    bank = np.array([[0.0, 0.0], [-1.0, 0.0], [0.0, -1.1], [2.2, 0.0], [8.0, 8.0]], np.float32)
    index = NNIndex("flat").fit(bank)
    q = np.array([1.0, 0.1])
    assert list(np.argsort(np.linalg.norm(bank - q, axis=1))[:3]) == [0, 3, 2]
    assert list(np.argsort(np.linalg.norm(bank - bank[0], axis=1))[:3]) == [0, 1, 2]
    queries = np.array([[[7.5, 7.8], q], [q, [-1.0, 0.5]]], np.float32)  # (B=2, P=2, D=2)
    patch = np.linalg.norm(queries[..., None, :] - bank, axis=-1).min(-1).astype(np.float32)  # (2, 2)
    nearest = np.linalg.norm(queries[..., None, :] - bank, axis=-1).argmin(-1)
    assert patch[0].argmax() == 1 and patch[1].argmax() == 0  # q is the worst patch of both images
    d0, d1, d2 = math.sqrt(1.01), math.sqrt(4.01), math.sqrt(2.44)  # q to m*, bank[1], bank[2]
    by_hand = (1 - math.exp(d0) / (math.exp(d0) + math.exp(d1) + math.exp(d2))) * d0
    assert _eq7_by_brute_force(q, bank, 0, 3) == pytest.approx(by_hand)
    scores = reweighted_image_scores(queries, patch, nearest, bank, index, num_neighbors=3)
    assert scores.dtype == np.float32 and scores.shape == (2,)
    np.testing.assert_allclose(scores, [by_hand, by_hand], rtol=1e-5)
    two = reweighted_image_scores(queries, patch, nearest, bank, index, num_neighbors=2)
    np.testing.assert_allclose(two, _eq7_by_brute_force(q, bank, 0, 2), rtol=1e-5)
    assert two[0] == pytest.approx((1 - math.exp(d0) / (math.exp(d0) + math.exp(d1))) * d0, rel=1e-5)
    plain = reweighted_image_scores(queries, patch, nearest, bank, index, num_neighbors=1)
    assert plain.dtype == np.float32
    np.testing.assert_allclose(plain, [math.sqrt(1.01)] * 2, rtol=1e-6)


def test_eq7_takes_b_features_when_m_star_has_exact_copies_in_the_bank():
    # Three copies of one nominal feature: the search around m* = bank[2] may return the other
    # two copies and not m* itself. Eq. 7 still weighs b = 2 features, all at the same
    # distance from the query, so the weight is exactly 1 - 1/2.
    bank = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [-4.0, 2.0]], np.float32)
    index = NNIndex("flat").fit(bank)
    query = np.array([[[1.0, 4.0]]], np.float32)
    score = reweighted_image_scores(query, np.array([[3.0]], np.float32), np.array([[2]]), bank, index, 2)[0]
    assert score == pytest.approx(0.5 * 3.0, rel=1e-6)


def test_eq7_large_distances_do_not_overflow():
    bank = np.array([[0.0], [1000.0], [2000.0]], np.float32)
    index = NNIndex("flat").fit(bank)
    score = reweighted_image_scores(
        np.array([[[900.0]]], np.float32), np.array([[900.0]], np.float32), np.array([[0]]), bank, index, 3
    )[0]
    assert np.isfinite(score) and 0 < score <= 900.0


def test_eq7_with_a_bank_smaller_than_b_weighs_every_bank_feature_there_is():
    # Two bank features and b = 5: N_b(m*) can only be both of them, so the score is Eq. 7 with
    # b = 2, from the query (0, 1) at distance 1 from m* = (0, 0) and sqrt(10) from (3, 0).
    bank = np.array([[0.0, 0.0], [3.0, 0.0]], np.float32)
    query = np.array([[[0.0, 1.0]]], np.float32)
    patch, nearest = np.array([[1.0]], np.float32), np.array([[0]])
    score = reweighted_image_scores(query, patch, nearest, bank, NNIndex("flat").fit(bank), num_neighbors=5)[0]
    by_hand = (1 - math.exp(1.0) / (math.exp(1.0) + math.exp(math.sqrt(10.0)))) * 1.0
    assert score == pytest.approx(by_hand, rel=1e-6)
    assert score == pytest.approx(_eq7_by_brute_force(query[0, 0], bank, 0, 2), rel=1e-6)
    # a one-feature bank: m* has no neighbour at all; the image is still scored, within [0, s*]
    one = bank[:1]
    got = reweighted_image_scores(query, patch, nearest, one, NNIndex("flat").fit(one), num_neighbors=3)
    assert got.shape == (1,) and got.dtype == np.float32 and 0.0 <= got[0] <= 1.0


def test_smoothed_image_score_worked_case():
    # sigma 0.5 has radius 2 on a 3-cell axis: taps w2 w1 w0 w1 w2 = exp(-8), exp(-2), 1, ... over
    # their sum. Reflect padding folds index -1 onto 1, -2 onto 2, 3 onto 1 and 4 onto 0, so
    # row 0 of the axis operator is [w0, 2 w1, 2 w2], row 1 [w1, w0 + 2 w2, w1].
    e = np.array([math.exp(-8.0), math.exp(-2.0), 1.0])
    w2, w1, w0 = e / (2 * e[0] + 2 * e[1] + e[2])
    rows = np.array([[w0, 2 * w1, 2 * w2], [w1, w0 + 2 * w2, w1], [2 * w2, 2 * w1, w0]])
    np.testing.assert_allclose(grid_blur_operator(3, 0.5), rows, rtol=1e-6)
    # One patch of 9 at a corner: after the blur its value is 9 w0^2 (largest at that corner).
    grid = np.zeros((1, 3, 3), np.float32)
    grid[0, 0, 0] = 9.0
    single = np.array([8.0], np.float32)  # the Eq. 7 score of that patch
    got = smoothed_image_scores(grid, single, sigma=0.5, weight=0.3)[0]
    assert got == pytest.approx(0.3 * 8.0 + 0.7 * 9.0 * w0**2, rel=1e-6)
    assert smoothed_image_scores(grid, single, sigma=0.5, weight=1.0)[0] == pytest.approx(8.0)


def test_smoothed_image_scores_are_float32():
    grid = np.random.default_rng(2).gamma(2.0, 5.0, size=(3, 6, 6))
    got = smoothed_image_scores(grid, np.ones(3), sigma=1.0, weight=0.5)
    assert got.dtype == np.float32 and got.shape == (3,)


@pytest.mark.parametrize(("h", "w", "sigma"), [(28, 28, 4.0), (40, 40, 6.0), (20, 28, 2.5)])
def test_grid_blur_equals_reflect_padded_convolution(h, w, sigma):
    grid = np.random.default_rng(1).gamma(2.0, 5.0, size=(4, h, w)).astype(np.float32)
    kernel = torch.from_numpy(gaussian_kernel(sigma))
    r = len(kernel) // 2
    t = torch.nn.functional.pad(torch.from_numpy(grid)[:, None], (r, r, r, r), mode="reflect")
    t = torch.nn.functional.conv2d(t, kernel.view(1, 1, 1, -1))
    ref = torch.nn.functional.conv2d(t, kernel.view(1, 1, -1, 1))[:, 0].numpy()
    got = smoothed_image_scores(grid, np.zeros(4, np.float32), sigma, weight=0.0)
    np.testing.assert_allclose(got, ref.reshape(4, -1).max(axis=1), rtol=1e-5)


def test_smoothed_score_ranks_a_defect_region_above_one_stray_patch():
    # Same largest patch score in both images: a stray patch in one, a 3x3 region in the other.
    # Eq. 7 on its own cannot tell them apart; the smoothed score ranks the region higher.
    stray = np.full((28, 28), 1.0, np.float32)
    stray[14, 14] = 5.0
    region = np.full((28, 28), 1.0, np.float32)
    region[13:16, 13:16] = 5.0
    scores = smoothed_image_scores(np.stack([stray, region]), np.array([5.0, 5.0], np.float32), 4.0, 0.3)
    k = gaussian_kernel(4.0).astype(np.float64)  # 33 taps; the far edges stay inside the 28-cell grid
    centre, three = k[16], k[15:18].sum()  # weight of one cell and of three cells on the centre
    assert scores[0] == pytest.approx(0.3 * 5 + 0.7 * (1 + 4 * centre**2), rel=1e-5)
    assert scores[1] == pytest.approx(0.3 * 5 + 0.7 * (1 + 4 * three**2), rel=1e-5)
    # a radius longer than the grid still folds back into it (weights of every row sum to 1)
    np.testing.assert_allclose(grid_blur_operator(5, 4.0).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_gaussian_kernel_equals_scipy_ndimage_truncated_at_4_sigma(sigma):
    impulse = np.zeros(41)
    impulse[20] = 1.0
    ref = scipy.ndimage.gaussian_filter1d(impulse, sigma, mode="constant", truncate=4.0)
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    got = np.zeros(41)
    got[20 - r : 21 + r] = k
    np.testing.assert_allclose(got, ref, rtol=1e-6)  # zero where scipy's kernel ends


def test_gaussian_kernel_normalised_and_symmetric():
    k = gaussian_kernel(4.0)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert k.dtype == np.float32 and np.allclose(k, k[::-1])
    assert len(k) == 2 * 16 + 1


def test_anomaly_map_keeps_constant_and_location():
    grid = torch.zeros(1, 28, 28)
    grid[0, 5, 20] = 10.0
    amap = anomaly_maps(grid, 224, 4.0)[0]
    assert amap.shape == (224, 224)
    y, x = np.unravel_index(int(amap.argmax()), amap.shape)
    assert abs(y - (5 + 0.5) * 8) <= 8 and abs(x - (20 + 0.5) * 8) <= 8
    flat = anomaly_maps(torch.full((1, 28, 28), 2.5), 224, 4.0)[0]
    np.testing.assert_allclose(flat, 2.5, atol=1e-5)


def _maps_by_convolution(grid, size, sigma):
    """Upsample, reflect-pad and convolve on the full-size map: the direct reading of Sec. 3.3."""
    maps = torch.nn.functional.interpolate(grid[:, None], size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = torch.from_numpy(gaussian_kernel(sigma))
        r = len(kernel) // 2
        maps = torch.nn.functional.pad(maps, (r, r, r, r), mode="reflect")
        maps = torch.nn.functional.conv2d(maps, kernel.view(1, 1, 1, -1))
        maps = torch.nn.functional.conv2d(maps, kernel.view(1, 1, -1, 1))
    return maps[:, 0]


@pytest.mark.parametrize(
    ("h", "w", "size", "sigma"), [(28, 28, 224, 4.0), (20, 28, 160, 4.0), (28, 28, 224, 0.0), (7, 9, 64, 1.5)]
)
def test_anomaly_maps_equal_upsample_then_blur(h, w, size, sigma):
    grid = torch.from_numpy(np.random.default_rng(0).gamma(2.0, 5.0, size=(3, h, w)).astype(np.float32))
    ref = _maps_by_convolution(grid, size, sigma)
    got = anomaly_maps(grid.numpy(), size, sigma)  # numpy in and out: scoring needs no torch
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == ref.shape == (3, size, size)
    assert float(np.abs(got - ref.numpy()).max()) <= 1e-5 * float(ref.abs().max())


def test_pruned_top1_search_is_exact_on_real_patch_features(small_mtd_model, mtd_dataset):
    # A real bank (150 MTD tiles, 5% coreset) and every patch of 12 real test tiles: the search
    # must skip most of the bank and still return the true nearest vector of every patch.
    from pipeline.data.datasets import load_images
    from pipeline.patchcore.index import Top1Search

    bank = small_mtd_model.memory_bank_
    tiles = [img for _, img, _ in load_images(mtd_dataset.subset(None, 12, seed=5).test)]
    feats, _ = small_mtd_model.extractor(tiles)
    queries = feats.reshape(-1, bank.shape[1]).numpy()
    search = Top1Search(bank)
    dist, idx = search(queries)
    assert search.k > 0 and search.kept / (search.blocks * len(bank)) < 0.5

    q, b = queries.astype(np.float64), bank.astype(np.float64)  # brute force in float64
    exact = (q * q).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * q @ b.T
    best = exact.min(1)
    chosen = exact[np.arange(len(queries)), idx[:, 0]]
    # the chosen vector is the nearest, up to float32 ties (1e-5 relative)
    assert np.all(chosen <= best * (1 + 1e-5) + 1e-6)
    assert (idx[:, 0] == exact.argmin(1)).mean() > 0.999
    # distances by the expansion ||q||^2 + ||b||^2 - 2 q.b in float32 (as faiss): norms of ~1e3
    # leave ~1e-2 absolute rounding
    np.testing.assert_allclose(dist[:, 0], best, rtol=1e-5, atol=1e-2)


def test_pruned_top1_search_falls_back_where_no_axis_dominates():
    # Isotropic features: the bound cannot prune, the search must still be exact.
    from pipeline.patchcore.index import Top1Search

    bank, queries = _bank(3000, 96, seed=4), _bank(700, 96, seed=5)
    search = Top1Search(bank)
    _, idx = search(queries)
    full = ((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx[:, 0], full.argmin(1))
    assert search.k == 0 or search.kept == search.blocks * len(bank)


def test_to_original_crops_the_content_box_and_resizes_bilinearly():
    # A 6x6 map: the 2x2 content box at (1, 2) holds [[0, 4], [8, 12]], the padding 99.
    amap = np.full((6, 6), 99.0, np.float32)
    amap[1:3, 2:4] = [[0.0, 4.0], [8.0, 12.0]]
    same = to_original(amap.astype(np.float64), Placement(height=2, width=2, top=1, left=2, inner_h=2, inner_w=2))
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, [[0.0, 4.0], [8.0, 12.0]])
    # Up to 4x4, pixel centres aligned (as align_corners=False), edges held: along each axis the
    # four outputs sit at 0, 1/4, 3/4 and 1 of the way from the first value to the second.
    up = to_original(amap, Placement(height=4, width=4, top=1, left=2, inner_h=2, inner_w=2))
    a = np.array([0.0, 0.25, 0.75, 1.0])
    assert up.dtype == np.float32 and up.shape == (4, 4)
    np.testing.assert_allclose(up, 8.0 * a[:, None] + 4.0 * a[None, :], atol=1e-5)
    # a wide original (4 high, 8 wide) letterboxed into rows 1..2 of the map: no padding leaks in
    wide = to_original(amap, Placement(height=4, width=8, top=1, left=2, inner_h=2, inner_w=2))
    assert wide.shape == (4, 8) and float(wide.max()) <= 12.0 and float(wide.min()) >= 0.0


def test_anomaly_maps_are_float32_whatever_the_scores_come_in():
    """A float64 grid (scores computed in double, as Eq. 7 does) still gives float32 maps,
    the dtype the service encodes and the metrics read, equal to the float32 grid's."""
    grid = np.random.default_rng(1).gamma(2.0, 5.0, size=(2, 7, 9))
    maps = anomaly_maps(grid, 64, 1.5)
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps, anomaly_maps(grid.astype(np.float32), 64, 1.5), rtol=1e-6)
