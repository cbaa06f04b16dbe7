"""Behaviour on real images: what a user of the detector would notice."""

import numpy as np
import pytest

from pipeline.data.datasets import load_images
from pipeline.evaluation.evaluate import evaluate
from pipeline.patchcore.model import NotFittedError, PatchCore


def test_defective_tiles_score_above_good_ones(small_mtd_model, mtd_dataset):
    test = mtd_dataset.subset(None, 40, seed=1).test
    result = evaluate(small_mtd_model, test, batch_size=8)
    # 150 training tiles only: still clearly better than chance on real cracks and blowholes.
    assert result.metrics["image_auroc"] > 0.75
    assert result.metrics["pixel_auroc"] > 0.7
    assert result.metrics["n_good"] == 20 and result.metrics["n_defect"] == 20
    assert all(m.shape == mk.shape for m, mk in zip(result.maps, result.masks, strict=True))


def test_small_brightness_change_barely_moves_a_good_score(small_mtd_model, mtd_dataset):
    images = [img for _, img, _ in load_images(mtd_dataset.test[:8]) ]
    brighter = [np.clip(img.astype(np.int16) + 6, 0, 255).astype(np.uint8) for img in images]
    base = small_mtd_model.predict(images, maps=False).scores
    moved = small_mtd_model.predict(brighter, maps=False).scores
    assert np.all(np.abs(moved - base) < 0.1 * base)


def test_a_sixteen_bit_shot_scores_within_one_percent_of_its_eight_bit_reduction(small_mtd_model, mtd_dataset,
                                                                                 tmp_path):
    """The same part from a 16-bit camera and from its 8-bit export must get the same verdict."""
    from PIL import Image

    from pipeline.data.images import read_image

    paths = [s.path for s in mtd_dataset.test[:4]] + [s.path for s in mtd_dataset.test if s.label == 1][:4]
    eight, sixteen = [], []
    for i, path in enumerate(paths):
        tile = read_image(path)
        wide = np.minimum(tile.astype(np.int32) * 257 + 100, 65535).astype(np.uint16)  # detail below 8-bit steps
        Image.fromarray(wide).save(tmp_path / f"{i}.png")
        eight.append(tile)
        sixteen.append(read_image(tmp_path / f"{i}.png"))
    base = small_mtd_model.predict(eight, maps=False).scores
    wide_scores = small_mtd_model.predict(sixteen, maps=False).scores
    assert np.all(np.abs(wide_scores - base) <= 0.01 * base), (base, wide_scores)


def test_map_has_the_original_image_size(small_mtd_model, mtd_dataset):
    _, image, _ = next(load_images(mtd_dataset.test[:1]))
    pred = small_mtd_model.predict([image])
    assert pred.maps[0].shape == image.shape[:2]


def test_scoring_before_fit_is_a_clear_error(extractor):
    model = PatchCore(extractor.config, extractor=extractor)
    with pytest.raises(NotFittedError, match="call fit"):
        model.predict([np.zeros((64, 64), np.uint8)])


def test_normal_only_validation_gives_a_usable_threshold(elpv_mono, extractor):
    """No defective images to tune on (anomalib's broken case): the threshold is a high
    quantile of held-out good scores; it passes good cells and flags most defective ones."""
    from pipeline.config import CoresetConfig
    from pipeline.evaluation.evaluate import choose_threshold

    train = [img for _, img, _ in load_images(elpv_mono.train[:80])]
    model = PatchCore(extractor.config, CoresetConfig(ratio=0.05), extractor=extractor)
    model.fit([train[i : i + 8] for i in range(0, len(train), 8)])
    held_out = [img for _, img, _ in load_images(elpv_mono.train[80:140])]  # good, not in the bank
    scores = model.predict(held_out, maps=False).scores
    chosen = choose_threshold(np.zeros(len(scores), int), scores)
    assert chosen["threshold_method"] == "nominal_quantile_0.99" and np.isfinite(chosen["threshold"])
    good = [img for _, img, _ in load_images([s for s in elpv_mono.test if s.label == 0][:30])]
    bad = [img for _, img, _ in load_images([s for s in elpv_mono.test if s.label == 1][:30])]
    flagged_good = np.mean(model.predict(good, maps=False).scores >= chosen["threshold"])
    flagged_bad = np.mean(model.predict(bad, maps=False).scores >= chosen["threshold"])
    assert flagged_good <= 0.15
    assert flagged_bad >= 0.5
