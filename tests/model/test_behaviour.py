"""Behaviour on real images: what a user of the detector would notice."""

import numpy as np
import pytest

from pipeline.datasets import load_images
from pipeline.evaluation import evaluate
from pipeline.model import NotFittedError, PatchCore


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


def test_map_has_the_original_image_size(small_mtd_model, mtd_dataset):
    _, image, _ = next(load_images(mtd_dataset.test[:1]))
    pred = small_mtd_model.predict([image])
    assert pred.maps[0].shape == image.shape[:2]


def test_scoring_before_fit_is_a_clear_error(extractor):
    model = PatchCore(extractor.config, extractor=extractor)
    with pytest.raises(NotFittedError, match="call fit"):
        model.predict([np.zeros((64, 64), np.uint8)])
