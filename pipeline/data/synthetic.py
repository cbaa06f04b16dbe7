"""Synthetic defects with exact masks, made from nominal images and a seed alone.

Families, after magnetic-tile and solar-cell defects: ``"cutpaste"`` (a rotated, rescaled patch of
another nominal image, feathered in), ``"blob"`` (a smooth noise blob taking another image's texture,
or shifted in intensity) and ``"scratch"`` (thin darker or brighter curves). The mask is exact:
pixels outside it are byte-identical to the input, pixels inside differ by >= :data:`MIN_PIXEL_CHANGE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: The defect families, in the order :func:`synthesize` cycles through them.
FAMILIES = ("cutpaste", "blob", "scratch")
#: Least change, in grey levels (largest over the channels), of every masked pixel.
MIN_PIXEL_CHANGE = 2
#: Width in pixels of the feathered rim inside a defect, per family.
_FEATHER = {"cutpaste": 3.0, "blob": 4.0, "scratch": 1.5}
#: ``(mask, new)``: the defect's ``(H, W)`` bool region and ``(H, W, C)`` float32 content.
Pair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class SyntheticConfig:
    """How :func:`synthesize` makes defective copies.

    Attributes:
        families: defect families to cycle through, a non-empty subset of :data:`FAMILIES`.
        min_area, max_area: range of a defect's area, as fractions of the image area; each
            target is drawn log-uniformly in it (see :func:`make_defect` for the tolerance).
        seed: makes the whole run reproducible.
        use_foreground: keep defects inside the object :func:`estimate_foreground` finds, if any.
        holdout: for an evaluation set (``synthetic:SPEC``) whose source has no good test images,
            the fraction of the good training images held out as its good images and defect bases.
    """

    families: tuple[str, ...] = FAMILIES
    min_area: float = 0.002
    max_area: float = 0.05
    seed: int = 0
    use_foreground: bool = True
    holdout: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        _check_settings(self.families, self.min_area, self.max_area)
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-friendly values (as a lineage records them)."""
        return asdict(self) | {"families": list(self.families)}


def synthesize(images: Sequence[np.ndarray], config: SyntheticConfig) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Make one defective copy of each nominal image.

    Args:
        images: nominal images, each ``(H, W)`` or ``(H, W, 3)`` uint8; sizes may differ.
        config: families, sizes and seed.

    Returns:
        ``(defective, mask, family)`` per image: uint8 of the input's shape, ``(H, W)`` bool,
        and the family, cycling through ``config.families`` in order.

    Note:
        Image ``i`` draws from its own generator seeded with ``(seed, i)`` and takes its
        donors from the other images, so its defect does not depend on how the others went.
    """
    results = []
    for i, image in enumerate(images):
        family, donors = config.families[i % len(config.families)], [im for j, im in enumerate(images) if j != i]
        defective, mask = make_defect(image, family=family, rng=np.random.default_rng([config.seed, i]),
                                      donors=donors, min_area=config.min_area, max_area=config.max_area,
                                      use_foreground=config.use_foreground)
        results.append((defective, mask, family))
    return results


def make_defect(
    image: np.ndarray, *, family: str, rng: np.random.Generator, donors: Sequence[np.ndarray] = (),
    min_area: float = 0.002, max_area: float = 0.05, use_foreground: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Add one synthetic defect to a copy of ``image``.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8 nominal image; it is not modified.
        family: one of :data:`FAMILIES`.
        rng: the only source of randomness.
        donors: other nominal images (any size, grey or colour) lending texture to
            ``"cutpaste"`` and ``"blob"``; without donors the image lends its own texture.
        min_area, max_area: range of the defect's area, as fractions of the image area.
        use_foreground: keep the defect inside :func:`estimate_foreground`'s object, if any.

    Returns:
        ``(defective, mask)``: ``defective`` uint8 of ``image.shape``; ``mask`` ``(H, W)``
        bool, exactly the pixels that changed.

    Raises:
        ValueError: an unknown family, a bad area range, or an image or donor not ``(H, W)`` or
            ``(H, W, 3)`` uint8.

    Note:
        The target area is capped at half the foreground. Blobs and scratches meet it to
        within a few pixels; a paste near the foreground's edge loses what falls outside it.
    """
    _check_settings((family,), min_area, max_area)
    for k, checked in enumerate([image, *donors]):
        _check_image(checked, f"donor {k - 1}" if k else "image")
    height, width = image.shape[:2]
    found = estimate_foreground(image) if use_foreground else None
    region = np.ones((height, width), dtype=bool) if found is None else found
    fraction = float(np.exp(rng.uniform(np.log(min_area), np.log(max_area))))
    target = int(max(9, min(round(fraction * height * width), region.sum() // 2)))
    base = image.astype(np.float32).reshape(height, width, -1)  # (H, W, C)
    donor = _as_channels(donors[int(rng.integers(len(donors)))] if donors else image, base.shape[2])
    if family == "scratch":
        mask, new = _scratch(base, region, target, rng)
    else:
        mask, new = (_cutpaste if family == "cutpaste" else _blob)(base, donor, region, target, rng)
    return _blend(base, new, mask, _FEATHER[family]).reshape(image.shape), mask


def estimate_foreground(image: np.ndarray) -> np.ndarray | None:
    """Find an object clearly separated from a uniform background, if there is one.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8.

    Returns:
        ``(H, W)`` bool, the object (largest component, holes filled); None without one.

    Note:
        The rule: Otsu's threshold of the image blurred with sigma 2 splits it in two; the class
        holding at least 95% of the one-pixel border is the background. The other class is an
        object only if it covers 5% to 95% of the image and the class means lie at least four
        pooled standard deviations apart. Frame-filling textures (tiles, cells) get None.
    """
    from scipy import ndimage  # here, not at the top: every flow run imports this module for its config
    grey = ndimage.gaussian_filter(_as_channels(image, 1)[..., 0], 2.0)
    hist = np.bincount(np.clip(grey, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    weight, moment = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (moment[-1] * weight - moment * weight[-1]) ** 2 / (weight * (weight[-1] - weight))
    threshold = int(np.nanargmax(np.nan_to_num(between[:-1], nan=-1.0)))
    high = grey >= threshold + 1  # bin t holds grey values in [t, t + 1)
    border = float(np.concatenate([high[0], high[-1], high[:, 0], high[:, -1]]).mean())
    objects = high if border <= 0.05 else ~high
    if 0.05 < border < 0.95 or not 0.05 <= objects.mean() <= 0.95:
        return None
    spread = np.sqrt((grey[objects].var() + grey[~objects].var()) / 2)
    if abs(grey[objects].mean() - grey[~objects].mean()) < 4 * spread:
        return None
    labels, count = ndimage.label(objects)
    largest = 1 + int(np.argmax(ndimage.sum_labels(objects, labels, index=np.arange(1, count + 1))))
    return np.asarray(ndimage.binary_fill_holes(labels == largest), dtype=bool)


def value_noise(shape: tuple[int, int], rng: np.random.Generator, *, cell: float, octaves: int = 3) -> np.ndarray:
    """Smooth fractal value noise: random values on a grid, smoothstep-interpolated.

    Args:
        shape: ``(H, W)`` of the result.
        rng: source of the grid values.
        cell: grid spacing of the coarsest octave in pixels; each octave halves it and the amplitude.
        octaves: number of octaves.

    Returns:
        ``(H, W)`` float64 in [0, 1].
    """
    height, width = shape
    total, norm, amplitude = np.zeros(shape), 0.0, 1.0
    for _ in range(octaves):
        cell = max(cell, 1.0)
        grid = rng.random((int(height / cell) + 2, int(width / cell) + 2))
        y, x = np.arange(height) / cell, np.arange(width) / cell
        y0, x0 = y.astype(np.int64), x.astype(np.int64)
        ty, tx = (y - y0) ** 2 * (3 - 2 * (y - y0)), (x - x0) ** 2 * (3 - 2 * (x - x0))  # smoothstep
        ty, tx = ty[:, None], tx[None, :]
        top = grid[y0][:, x0] * (1 - tx) + grid[y0][:, x0 + 1] * tx
        bottom = grid[y0 + 1][:, x0] * (1 - tx) + grid[y0 + 1][:, x0 + 1] * tx
        total += amplitude * (top * (1 - ty) + bottom * ty)
        norm, amplitude, cell = norm + amplitude, amplitude / 2, cell / 2
    return total / norm


def _cutpaste(base: np.ndarray, donor: np.ndarray, region: np.ndarray, target: int, rng: np.random.Generator) -> Pair:
    """A donor rectangle, rotated by a random angle and rescaled, placed inside ``region``."""
    from scipy import ndimage  # here, not at the top: every flow run imports this module for its config
    height, width = region.shape
    aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
    ph, pw = min(np.sqrt(target / aspect), 0.8 * height), min(np.sqrt(target * aspect), 0.8 * width)
    angle, scale = rng.uniform(0, 2 * np.pi), float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    cos, sin = np.cos(angle), np.sin(angle)
    ey, ex = (abs(cos) * ph + abs(sin) * pw) / 2, (abs(sin) * ph + abs(cos) * pw) / 2
    (yy, xx), (ys, xs) = np.mgrid[0:height, 0:width].astype(np.float64), np.nonzero(region)  # (H, W), (P,)
    best, best_score, best_uv = np.zeros_like(region), -1.0, (yy, xx)
    for _ in range(20):  # a region pixel, moved so the patch fits; keep the one most inside
        k = int(rng.integers(ys.size))
        cy = float(np.clip(ys[k], min(ey, height / 2), max(height - 1 - ey, height / 2)))
        cx = float(np.clip(xs[k], min(ex, width / 2), max(width - 1 - ex, width / 2)))
        u, v = (yy - cy) * cos + (xx - cx) * sin, -(yy - cy) * sin + (xx - cx) * cos
        rect = (np.abs(u) < ph / 2) & (np.abs(v) < pw / 2)
        score = (rect & region).sum() / max(rect.sum(), 1)
        if score > best_score:
            best, best_score, best_uv = rect & region, score, (u, v)
        if score >= 0.95:
            break
    u, v = best_uv[0][best], best_uv[1][best]  # (M,) rectangle coordinates of the masked pixels
    reach, (dy, dx) = np.hypot(ph, pw) / 2 / scale, donor.shape[:2]
    sy = rng.uniform(min(reach, dy / 2), max(dy - reach, dy / 2)) + u / scale
    sx = rng.uniform(min(reach, dx / 2), max(dx - reach, dx / 2)) + v / scale
    offset = rng.choice([-1.0, 1.0]) * rng.uniform(4, 16)  # brightness jitter, as in CutPaste
    new = base.copy()
    for c in range(base.shape[2]):
        new[best, c] = ndimage.map_coordinates(donor[..., c], [sy, sx], order=1, mode="mirror") + offset
    return best, new


def _blob(base: np.ndarray, donor: np.ndarray, region: np.ndarray, target: int, rng: np.random.Generator) -> Pair:
    """Value noise under a Gaussian envelope, thresholded to ``target`` pixels of ``region``."""
    height, width = region.shape
    radius, points = np.sqrt(target / np.pi), np.argwhere(region)  # (P, 2)
    cy, cx = points[rng.integers(len(points))]
    yy, xx = np.mgrid[0:height, 0:width]
    envelope = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.5 * radius) ** 2))
    field = envelope * (0.3 + value_noise((height, width), rng, cell=max(radius, 2.0)))
    field[~region] = -1.0
    mask = region & (field >= np.partition(field.ravel(), field.size - target)[field.size - target])
    if rng.random() < 0.5:  # texture from another nominal image, lined up at a random offset
        pad = ((0, max(height - donor.shape[0], 0)), (0, max(width - donor.shape[1], 0)), (0, 0))
        texture = np.pad(donor, pad, mode="symmetric")
        oy, ox = int(rng.integers(texture.shape[0] - height + 1)), int(rng.integers(texture.shape[1] - width + 1))
        offset = rng.choice([-1.0, 1.0]) * rng.uniform(4, 16)  # so a look-alike texture still shows
        return mask, texture[oy : oy + height, ox : ox + width] + offset
    return mask, base + rng.choice([-1.0, 1.0]) * rng.uniform(25, 70)


def _scratch(base: np.ndarray, region: np.ndarray, target: int, rng: np.random.Generator) -> Pair:
    """Bent, rough curves (a crack that may branch), widened until they cover ``target`` pixels."""
    from scipy import ndimage  # here, not at the top: every flow run imports this module for its config
    height, width = region.shape
    length = target / float(np.clip(np.sqrt(target) / 10, 2.0, 6.0))
    strokes = int(min(4, np.ceil(length / (0.6 * min(height, width)))))
    points = np.argwhere(region)  # (P, 2)
    start, centre = points[rng.integers(len(points))].astype(np.float64), np.zeros((height, width), dtype=bool)
    for _ in range(strokes):
        span, angle = length / strokes, rng.uniform(0, 2 * np.pi)
        step = np.array([np.sin(angle), np.cos(angle)])
        normal = np.array([-step[1], step[0]])
        t = np.linspace(0, 1, int(2 * span) + 2)[:, None]  # (N, 1)
        bend = rng.normal(0, 0.2 * span, 2)
        p1, p2 = start + span * step / 3 + bend[0] * normal, start + 2 * span * step / 3 + bend[1] * normal
        p3 = start + span * step
        curve = (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3  # (N, 2)
        rough = ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, 0.5, t.shape[0])), 2.0)
        curve += rough[:, None] * normal
        inside = (curve[:, 0] >= 0) & (curve[:, 0] <= height - 1) & (curve[:, 1] >= 0) & (curve[:, 1] <= width - 1)
        pts = np.rint(curve[inside]).astype(np.int64)
        centre[pts[:, 0], pts[:, 1]] = True
        if inside.any():
            start = curve[inside][int(rng.integers(inside.sum()))]  # the next stroke branches off
    distance = ndimage.distance_transform_edt(~centre)
    distance[~region] = np.inf
    half_width = float(np.clip(np.partition(distance.ravel(), target - 1)[target - 1], 1.0, 6.0))
    return distance <= half_width, base + rng.choice([-1.0, 1.0]) * rng.uniform(30, 80)


def _blend(base: np.ndarray, new: np.ndarray, mask: np.ndarray, feather: float) -> np.ndarray:
    """``base`` with ``new`` blended in on ``mask``: weight 1 deep inside, falling to 0.5 at the rim.

    Note:
        The weight is 0 outside the mask and at least 0.5 inside, so the feathered edge lies
        wholly inside. Masked pixels that rounding or a look-alike donor left within
        :data:`MIN_PIXEL_CHANGE` are pushed by that much, away from the nearer end of 0-255.
    """
    from scipy import ndimage  # here, not at the top: every flow run imports this module for its config
    depth = ndimage.distance_transform_edt(mask)
    alpha = np.where(mask, 0.5 + 0.5 * np.minimum(depth / feather, 1.0), 0.0)[..., None]  # (H, W, 1)
    out = np.clip(np.rint(base + alpha * (new - base)), 0, 255)
    weak = mask & (np.abs(out - base).max(axis=2) < MIN_PIXEL_CHANGE)
    out[weak] = base[weak] + np.where(base[weak] < 128, 1.0, -1.0) * MIN_PIXEL_CHANGE
    return out.astype(np.uint8)


def _as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``image`` as ``(H, W, channels)`` float32: grey is repeated, colour averaged to grey."""
    image = image.astype(np.float32).reshape(*image.shape[:2], -1)  # (H, W, C)
    if image.shape[2] == channels:
        return image
    return np.repeat(image, channels, axis=2) if channels == 3 else image.mean(axis=2, keepdims=True)


def _check_settings(families: Sequence[str], min_area: float, max_area: float) -> None:
    if not families:
        raise ValueError(f"families must name at least one of: {', '.join(FAMILIES)}")
    if unknown := [family for family in families if family not in FAMILIES]:
        raise ValueError(f"unknown defect family {unknown[0]!r}; known families: {', '.join(FAMILIES)}")
    if not 0 < min_area <= max_area <= 0.5:
        raise ValueError(f"need 0 < min_area <= max_area <= 0.5 (image-area fractions), got {min_area}, {max_area}")


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape[2:] not in ((), (3,)) \
            or image.ndim < 2:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a (H, W) or (H, W, 3) uint8 array, got {got}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"{name} is {image.shape[1]}x{image.shape[0]}; each side must be >= 8 px")
