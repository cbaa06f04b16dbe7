import numpy as np
import pytest

from pipeline.patchcore.coreset import coreset_size, covering_radius, greedy_coreset, project
from pipeline.patchcore.incremental import extend_coreset, extended_bank_size, union_covering_radius


def _clustered(n: int, dim: int = 48, seed: int = 0, n_clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 5
    return (centres[rng.integers(n_clusters, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _old_and_new(n_old: int = 3000, n_new: int = 3000, dim: int = 48, ratio: float = 0.05):
    """A bank fitted on ``n_old`` features, and new features half from the old clusters, half new ones."""
    old = _clustered(n_old, dim, seed=0)
    new = np.concatenate([_clustered(n_new // 2, dim, seed=0)[::-1], _clustered(n_new - n_new // 2, dim, seed=7)])
    bank = old[np.sort(greedy_coreset(old, ratio, proj_dim=32))]
    return old, bank, new


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` squared distances in float64."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _naive_continued(bank: np.ndarray, new: np.ndarray, n_picks: int, proj_dim: int, seed: int = 0):
    """Plain continued greedy in float64: every new point updated per pick. Picks and their pick-time radii."""
    p_bank = project(bank, proj_dim, seed=seed).double().numpy()
    p_new = project(new, proj_dim, seed=seed).double().numpy()
    dist = _sq_dist(p_new, p_bank).min(1)
    picks, radii = [], []
    for _ in range(n_picks):
        j = int(np.argmax(dist))
        picks.append(j)
        radii.append(float(np.sqrt(dist[j])))
        dist = np.minimum(dist, ((p_new - p_new[j]) ** 2).sum(1))
        dist[j] = -1.0
    return picks, radii


@pytest.mark.parametrize(("proj_dim", "ratio"), [(32, 0.05), (32, 0.2), (64, 0.05)])
def test_picks_match_the_naive_continued_greedy(proj_dim, ratio):
    old, bank, new = _old_and_new(dim=48 if proj_dim < 64 else 16, ratio=ratio)
    k_total = extended_bank_size(len(old), len(new), ratio)
    got = extend_coreset(bank, new, k_total, proj_dim=proj_dim)
    want, _ = _naive_continued(bank, new, k_total - len(bank), proj_dim)
    assert got.dtype == np.int64
    assert got.tolist() == want


@pytest.mark.parametrize("extra", [0, -1, -100])
def test_no_picks_when_the_bank_is_big_enough(extra):
    _, bank, new = _old_and_new()
    got = extend_coreset(bank, new, len(bank) + extra)
    assert got.dtype == np.int64 and got.shape == (0,)


def test_picks_are_unique_even_among_duplicates_of_bank_vectors():
    _, bank, new = _old_and_new(n_new=400)
    new = np.concatenate([new, bank[:50], bank[:50]])  # exact copies: distance zero, picked last
    got = extend_coreset(bank, new, len(bank) + len(new))
    assert sorted(got.tolist()) == list(range(len(new)))


def test_same_seed_same_picks_other_seed_differs():
    old, bank, new = _old_and_new()
    k_total = extended_bank_size(len(old), len(new), 0.05)
    a = extend_coreset(bank, new, k_total, seed=3, proj_dim=16)
    b = extend_coreset(bank, new, k_total, seed=3, proj_dim=16)
    c = extend_coreset(bank, new, k_total, seed=4, proj_dim=16)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) != set(c.tolist())


def test_adding_the_picks_never_grows_the_covering_radius_of_the_new_features():
    old, bank, new = _old_and_new()
    picks = extend_coreset(bank, new, extended_bank_size(len(old), len(new), 0.05), proj_dim=32)
    before = covering_radius(new, bank)
    after = covering_radius(new, np.concatenate([bank, new[picks]]))
    assert after <= before
    assert after < 0.5 * before  # the new cluster was far from the bank and is now covered


def test_every_new_point_is_within_the_last_pick_radius():
    old, bank, new = _old_and_new()
    proj_dim = 32
    picks = extend_coreset(bank, new, extended_bank_size(len(old), len(new), 0.05), proj_dim=proj_dim)
    p_bank = project(bank, proj_dim, seed=0).double().numpy()
    p_new = project(new, proj_dim, seed=0).double().numpy()
    # pick-time radius of each pick: its distance to the bank and the earlier picks
    radii = [
        np.sqrt(min(_sq_dist(p_new[[j]], p_bank).min(), _sq_dist(p_new[[j]], p_new[picks[:i]]).min(initial=np.inf)))
        for i, j in enumerate(picks)
    ]
    assert all(a >= b - 1e-4 for a, b in zip(radii, radii[1:], strict=False))  # radii never grow
    centres = np.concatenate([p_bank, p_new[picks]])
    reach = np.sqrt(_sq_dist(p_new, centres).min(1))
    assert reach.max() <= radii[-1] + 1e-4


def test_extended_bank_size_is_the_coreset_size_of_all_features():
    assert extended_bank_size(12544, 3136, 0.1) == coreset_size(15680, 0.1) == 1568
    assert extended_bank_size(0, 10, 0.5) == 5
    assert extended_bank_size(7, 0, 1.0) == 7


@pytest.mark.parametrize(("n_old", "n_new", "ratio", "match"), [
    (-1, 5, 0.1, "non-negative"), (0, 0, 0.1, "zero patch"), (10, 5, 1.5, "ratio must be in"),
])
def test_extended_bank_size_rejects_bad_arguments(n_old, n_new, ratio, match):
    with pytest.raises(ValueError, match=match):
        extended_bank_size(n_old, n_new, ratio)


def test_extend_rejects_bad_inputs():
    _, bank, new = _old_and_new(n_new=100)
    with pytest.raises(ValueError, match="dimensions"):
        extend_coreset(bank, new[:, :10], len(bank) + 5)
    with pytest.raises(ValueError, match="empty memory bank"):
        extend_coreset(bank[:0], new, 5)
    with pytest.raises(ValueError, match="cannot grow"):
        extend_coreset(bank, new, len(bank) + len(new) + 1)
    with pytest.raises(ValueError, match="2-D"):
        extend_coreset(bank[0], new, 5)


def test_union_covering_radius_is_that_of_the_concatenation():
    old, bank, new = _old_and_new(n_new=600)
    assert union_covering_radius([old, new[:0], new], bank) == pytest.approx(
        covering_radius(np.concatenate([old, new]), bank)
    )
    with pytest.raises(ValueError, match="at least one"):
        union_covering_radius([new[:0]], bank)


def test_extending_a_real_bank_stays_within_the_greedy_bound(mtd_dataset, extractor):
    """A bank of 16 MTD tiles extended with 4 more covers all 20 about as well as a fit on all 20."""
    from pipeline.data.datasets import load_images

    images = [img for _, img, _ in load_images(mtd_dataset.train[:20], on_error="raise")]
    feats, _ = extractor(images)  # (20, h, w, D)
    per_tile = feats.shape[1] * feats.shape[2]
    features = feats.reshape(-1, feats.shape[-1]).numpy()  # (20 * h * w, D)
    old, new = features[: 16 * per_tile], features[16 * per_tile :]
    ratio = 0.1
    bank = old[greedy_coreset(old, ratio)]
    picks = extend_coreset(bank, new, extended_bank_size(len(old), len(new), ratio))
    extended = np.concatenate([bank, new[picks]])
    full = features[greedy_coreset(features, ratio)]
    assert len(extended) == len(full)
    incremental_radius = union_covering_radius([old, new], extended)
    full_radius = covering_radius(features, full)
    assert incremental_radius <= 2.0 * full_radius
