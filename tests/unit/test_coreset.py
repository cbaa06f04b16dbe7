import numpy as np
import pytest

from pipeline.coreset import coreset_size, covering_radius, greedy_coreset, greedy_coreset_naive


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


def test_two_stage_radius_close_to_naive_on_real_patches(mtd_dataset, extractor):
    from pipeline.datasets import load_images

    images = [img for _, img, _ in load_images(mtd_dataset.train[:40])]
    feats, _ = extractor(images)  # (40, 28, 28, 152)
    x = feats.reshape(-1, feats.shape[-1]).numpy()  # 31,360 real patch features
    fast = greedy_coreset(x, 0.01, shard_size=2048)
    slow = greedy_coreset_naive(x, 0.01)
    r_fast = covering_radius(x, x[fast])
    r_slow = covering_radius(x, x[slow])
    assert r_fast <= 1.05 * r_slow


def test_duplicates_never_chosen_twice():
    x = np.repeat(_clustered(50), 40, axis=0)  # 2000 rows, 50 distinct
    idx = greedy_coreset(x, 0.05)
    assert len(np.unique(idx)) == len(idx) == 100


def test_covering_radius_matches_numpy():
    x = _clustered(500)
    c = x[:7]
    expected = np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).max())
    assert covering_radius(x, c) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="coreset ratio must be in"):
        greedy_coreset(_clustered(100), ratio)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="zero features"):
        greedy_coreset(np.zeros((0, 8), np.float32), 0.1)
