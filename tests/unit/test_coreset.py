import numpy as np
import pytest

import pipeline.patchcore.coreset as coreset_module
from pipeline.patchcore.coreset import coreset_size, covering_radius, greedy_coreset, greedy_coreset_naive, project


def _clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim)) * 5
    return (centres[rng.integers(20, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _brute_force_greedy(x: np.ndarray, k: int, first: int) -> list[int]:
    chosen = [first]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((x - x[nxt]) ** 2).sum(1))
    return chosen


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_size_and_uniqueness(ratio):
    x = _clustered(3000)
    idx = greedy_coreset(x, ratio, shard_size=500)
    assert len(idx) == coreset_size(3000, ratio)
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < 3000


def test_same_seed_same_result_other_seed_differs():
    x = _clustered(20000)
    a = greedy_coreset(x, 0.01, seed=3, shard_size=4000)
    b = greedy_coreset(x, 0.01, seed=3, shard_size=4000)
    c = greedy_coreset(x, 0.01, seed=4, shard_size=4000)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) != set(c.tolist())


def test_naive_matches_brute_force_greedy():
    x = _clustered(800, dim=16)
    got = greedy_coreset_naive(x, 0.05, proj_dim=64)  # proj_dim >= D: exact features
    first = int(np.random.default_rng(0).integers(800))
    assert got.tolist() == _brute_force_greedy(x.astype(np.float64), len(got), first)


@pytest.mark.parametrize("ratio", [0.002, 0.01, 0.05])
def test_lazy_greedy_picks_the_naive_centres(ratio):
    x = _clustered(6000, dim=48, seed=1)
    got = greedy_coreset(x, ratio, shard_size=0, proj_dim=32)
    want = greedy_coreset_naive(x, ratio, proj_dim=32)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("ratio", [0.01, 0.3])
def test_each_lazy_pick_is_the_farthest_point(ratio):
    x = _clustered(6000, dim=48, seed=1)
    idx = greedy_coreset(x, ratio, shard_size=0, proj_dim=32)
    p = project(x, 32, seed=0).double().numpy()  # the space the greedy works in
    assert idx[0] == np.random.default_rng(0).integers(6000)
    dist = ((p - p[idx[0]]) ** 2).sum(1)
    for pick in idx[1:]:  # farthest from the centres before it, up to float32 rounding among near ties
        assert dist[pick] >= dist.max() * (1 - 1e-5)
        dist = np.minimum(dist, ((p - p[pick]) ** 2).sum(1))


def test_lazy_greedy_matches_brute_force_greedy():
    x = _clustered(3000, dim=16, seed=2)
    got = greedy_coreset(x, 0.03, shard_size=0, proj_dim=64)  # proj_dim >= D: exact features
    first = int(np.random.default_rng(0).integers(3000))
    assert got.tolist() == _brute_force_greedy(x.astype(np.float64), len(got), first)


@pytest.fixture(scope="module")
def mtd_patches(mtd_dataset, extractor):
    from pipeline.data.datasets import load_images

    images = [img for _, img, _ in load_images(mtd_dataset.train[:40])]
    feats, _ = extractor(images)  # (40, h, w, D)
    return feats.reshape(-1, feats.shape[-1]).numpy()  # (40 * h * w, D) real patch features


def test_default_selection_is_the_naive_one_on_real_patches(mtd_patches):
    x = mtd_patches
    fast = greedy_coreset(x, 0.01)
    slow = greedy_coreset_naive(x, 0.01)
    assert set(fast.tolist()) == set(slow.tolist())


def test_two_stage_radius_close_to_naive_on_real_patches(mtd_patches):
    x = mtd_patches
    fast = greedy_coreset(x, 0.01, shard_size=2048)
    slow = greedy_coreset_naive(x, 0.01)
    assert covering_radius(x, x[fast]) <= 1.05 * covering_radius(x, x[slow])


def test_candidates_of_parts_compose_like_the_two_stage_selection(mtd_patches):
    # The distributed fit: each worker keeps candidates from its part, one greedy runs over
    # their union. The bank must cover the patches nearly as well as one greedy over all.
    from pipeline.patchcore.coreset import ratio_for, shard_candidates

    x = mtd_patches
    half = len(x) // 2
    parts = [np.arange(half), np.arange(half, len(x))]
    union = np.concatenate([part[shard_candidates(x[part], 0.01, shard_size=2048)] for part in parts])
    assert len(union) < len(x) / 5 and len(np.unique(union)) == len(union)
    k = coreset_size(len(x), 0.01)
    final = union[greedy_coreset(x[union], ratio_for(len(union), k))]
    assert len(final) == k
    slow = greedy_coreset_naive(x, 0.01)
    assert covering_radius(x, x[final]) <= 1.05 * covering_radius(x, x[slow])


def test_ratio_for_keeps_exactly_k():
    from pipeline.patchcore.coreset import ratio_for

    # ceil(25 * (7 / 25)) is 8 in floating point; every pair up to 400 must give k exactly
    assert all(coreset_size(n, ratio_for(n, k)) == k for n in range(1, 400) for k in range(1, n + 1))
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        ratio_for(4, 5)


def test_large_inputs_switch_to_two_stages(monkeypatch):
    x = _clustered(3000)
    sharded = greedy_coreset(x, 0.02, shard_size=500)
    monkeypatch.setattr(coreset_module, "EXACT_LIMIT", 2999)
    monkeypatch.setattr(coreset_module, "SHARD_SIZE", 500)
    assert greedy_coreset(x, 0.02).tolist() == sharded.tolist()
    monkeypatch.setattr(coreset_module, "EXACT_LIMIT", 3000)
    assert greedy_coreset(x, 0.02).tolist() == greedy_coreset(x, 0.02, shard_size=0).tolist()


@pytest.mark.parametrize("shard_size", [0, 500])
def test_float16_memory_map_gives_the_float32_result(tmp_path, shard_size):
    x16 = _clustered(3000).astype(np.float16)
    np.save(tmp_path / "f.npy", x16)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    got = greedy_coreset(mapped, 0.02, shard_size=shard_size)
    assert got.tolist() == greedy_coreset(x16.astype(np.float32), 0.02, shard_size=shard_size).tolist()


@pytest.mark.parametrize("shard_size", [0, 500])
def test_progress_counts_every_centre(shard_size):
    steps: list[int] = []
    idx = greedy_coreset(_clustered(3000), 0.05, shard_size=shard_size, progress=steps.append)
    assert sum(steps) == len(idx) == 150


@pytest.mark.parametrize("shard_size", [0, 500])
def test_duplicates_never_chosen_twice(shard_size):
    x = np.repeat(_clustered(50), 40, axis=0)  # 2000 rows, 50 distinct
    idx = greedy_coreset(x, 0.05, shard_size=shard_size)
    assert len(np.unique(idx)) == len(idx) == 100
    assert len(np.unique(x[idx], axis=0)) == 50  # every distinct row is covered before any repeat


def test_covering_radius_matches_numpy():
    x = _clustered(500)
    c = x[:7]
    expected = np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).max())
    assert covering_radius(x, c) == pytest.approx(expected, rel=1e-4)
    assert covering_radius(x, c, chunk=64) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="coreset ratio must be in"):
        greedy_coreset(_clustered(100), ratio)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="zero features"):
        greedy_coreset(np.zeros((0, 8), np.float32), 0.1)
