import numpy as np
import pytest
from scipy import ndimage

from pipeline.data.images import read_image
from pipeline.data.synthetic import (
    FAMILIES,
    MIN_PIXEL_CHANGE,
    SyntheticConfig,
    estimate_foreground,
    make_defect,
    synthesize,
    value_noise,
)


def _texture(seed: int, shape: tuple[int, ...] = (96, 128)) -> np.ndarray:
    """A tile-like nominal image: smooth shading plus fine grain, uint8 of ``shape``."""
    rng = np.random.default_rng(seed)
    shading = ndimage.gaussian_filter(rng.normal(0, 1, shape), 8) * 400
    grain = ndimage.gaussian_filter(rng.normal(0, 12, shape), 0.7)
    return np.clip(110 + shading + grain, 0, 255).astype(np.uint8)


def _disk_on_background(colour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A bright textured disk on a flat dark background, and the disk's mask."""
    yy, xx = np.mgrid[:120, :160]
    disk = (yy - 60) ** 2 + (xx - 80) ** 2 < 45**2
    image = np.full((120, 160), 25, np.uint8)
    image[disk] = _texture(7, (120, 160))[disk] // 3 + 150
    return (np.repeat(image[..., None], 3, axis=2) if colour else image), disk


def _check_exact(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.shape == image.shape and out.dtype == np.uint8
    assert mask.shape == image.shape[:2] and mask.dtype == bool and mask.any()
    assert np.array_equal(out[~mask], image[~mask]), "a pixel outside the mask changed"
    change = np.abs(out.astype(int) - image).reshape(*mask.shape, -1).max(axis=2)
    assert change[mask].min() >= MIN_PIXEL_CHANGE, "a masked pixel did not change"


@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_is_exactly_the_changed_region(family, colour):
    images = [_texture(s) for s in range(3)]
    if colour:
        images = [np.stack([im, im // 2 + 60, 255 - im], axis=2) for im in images]
    for seed in range(4):
        out, mask = make_defect(images[0], family=family, rng=np.random.default_rng(seed), donors=images[1:])
        _check_exact(images[0], out, mask)
        assert np.abs(out.astype(float) - images[0])[mask].mean() >= 4, "the defect barely shows"


@pytest.mark.parametrize("family", FAMILIES)
def test_area_within_configured_range(family):
    image, donors = _texture(0), [_texture(1)]
    for seed, (low, high) in enumerate([(0.002, 0.005), (0.02, 0.05), (0.002, 0.05)]):
        _, mask = make_defect(image, family=family, rng=np.random.default_rng(seed), donors=donors,
                              min_area=low, max_area=high)
        # documented tolerance: scratches are at least 3 px wide, rotated pastes are pixelated
        assert 0.7 * low <= mask.mean() <= 1.3 * high, (family, low, high, mask.mean())


def test_small_and_large_defects_differ_in_size():
    image = _texture(0)
    sizes = {}
    for low, high in [(0.002, 0.003), (0.04, 0.05)]:
        sizes[high] = [make_defect(image, family=f, rng=np.random.default_rng(0), min_area=low,
                                   max_area=high)[1].sum() for f in FAMILIES]
    assert all(small * 5 < large for small, large in zip(sizes[0.003], sizes[0.05], strict=True))


def test_same_seed_same_result_other_seed_differs():
    images = [_texture(s) for s in range(4)]
    first = synthesize(images, SyntheticConfig(seed=3))
    again = synthesize(images, SyntheticConfig(seed=3))
    other = synthesize(images, SyntheticConfig(seed=4))
    for (a, ma, fa), (b, mb, fb) in zip(first, again, strict=True):
        assert fa == fb and np.array_equal(a, b) and np.array_equal(ma, mb)
    assert all(not np.array_equal(ma, mo) for (_, ma, _), (_, mo, _) in zip(first, other, strict=True))


def test_synthesize_one_copy_per_image_families_cycled_inputs_untouched():
    images = [_texture(s) for s in range(5)]
    copies = [im.copy() for im in images]
    results = synthesize(images, SyntheticConfig(families=("scratch", "blob"), seed=1))
    assert [family for _, _, family in results] == ["scratch", "blob", "scratch", "blob", "scratch"]
    assert all(np.array_equal(a, b) for a, b in zip(images, copies, strict=True))
    for image, (out, mask, _) in zip(images, results, strict=True):
        _check_exact(image, out, mask)


def test_grey_and_colour_donors_of_other_sizes_mix():
    grey, colour = _texture(0), np.stack([_texture(1, (40, 60))] * 3, axis=2)
    for family in ("cutpaste", "blob"):
        out, mask = make_defect(grey, family=family, rng=np.random.default_rng(0), donors=[colour])
        assert out.ndim == 2
        _check_exact(grey, out, mask)
        out, mask = make_defect(colour, family=family, rng=np.random.default_rng(0), donors=[grey])
        assert out.shape == colour.shape
        _check_exact(colour, out, mask)


def test_without_donors_the_image_lends_its_own_texture():
    image = _texture(0)
    out, mask = make_defect(image, family="cutpaste", rng=np.random.default_rng(0))
    _check_exact(image, out, mask)


@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
def test_defects_stay_on_the_object_when_one_is_found(colour):
    image, disk = _disk_on_background(colour)
    region = estimate_foreground(image)
    assert region is not None and (region == disk).mean() > 0.99
    for family in FAMILIES:
        for seed in range(3):
            out, mask = make_defect(image, family=family, rng=np.random.default_rng(seed), max_area=0.1)
            _check_exact(image, out, mask)
            assert not (mask & ~region).any(), f"{family} left the object"


def test_no_foreground_for_a_texture_filling_the_frame():
    assert estimate_foreground(_texture(0)) is None
    assert estimate_foreground(np.full((32, 32), 128, np.uint8)) is None


def test_foreground_can_be_switched_off():
    image, disk = _disk_on_background()
    masks = [make_defect(image, family="blob", rng=np.random.default_rng(s), use_foreground=False,
                         min_area=0.05, max_area=0.1)[1] for s in range(6)]
    assert any((mask & ~disk).any() for mask in masks)


def test_value_noise_is_smooth_and_in_range():
    noise = value_noise((64, 80), np.random.default_rng(0), cell=16)
    assert noise.shape == (64, 80) and 0 <= noise.min() and noise.max() <= 1 and noise.std() > 0.05
    assert np.abs(np.diff(noise, axis=1)).max() < 0.2


def test_real_mtd_tiles(mtd_dataset):
    images = [read_image(sample.path) for sample in mtd_dataset.train[:4]]
    for seed in (0, 1):
        results = synthesize(images, SyntheticConfig(seed=seed, families=FAMILIES))
        for image, (out, mask, family) in zip(images, results, strict=True):
            _check_exact(image, out, mask)
            assert 0.7 * 0.002 <= mask.mean() <= 1.3 * 0.05, family
            assert np.abs(out.astype(float) - image)[mask].mean() >= 4, family


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"families": ("cutpaste", "dent")}, r"unknown defect family 'dent'; known families: cutpaste, blob, scratch"),
        ({"families": ()}, "at least one"),
        ({"min_area": 0.0}, "min_area <= max_area"),
        ({"min_area": 0.1, "max_area": 0.05}, "min_area <= max_area"),
        ({"max_area": 0.9}, "<= 0.5"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_bad_inputs_are_refused():
    image, rng = _texture(0), np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect family 'crack'; known families"):
        make_defect(image, family="crack", rng=rng)
    with pytest.raises(ValueError, match=r"image must be a \(H, W\) or \(H, W, 3\) uint8 array, got float32"):
        make_defect(image.astype(np.float32), family="blob", rng=rng)
    with pytest.raises(ValueError, match="donor 0 must be"):
        make_defect(image, family="blob", rng=rng, donors=[np.zeros((10, 10, 4), np.uint8)])
    with pytest.raises(ValueError, match="each side must be >= 8 px"):
        make_defect(image[:4], family="scratch", rng=rng)
