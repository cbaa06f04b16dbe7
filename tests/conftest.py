"""Shared fixtures: real data from ../shared/datasets and the ELPV package, small subsets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MTD = (REPO.parent / "shared" / "datasets" / "mtd").resolve()
MTD_SPEC = f"mtd:{MTD}"

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session")
def mtd_dataset():
    from pipeline.data.datasets import open_dataset

    if not MTD.is_dir():
        raise FileNotFoundError(f"the MTD dataset is expected at {MTD} (../shared beside the repository)")
    return open_dataset(MTD_SPEC)


@pytest.fixture(scope="session")
def elpv_mono():
    from pipeline.data.datasets import open_dataset

    return open_dataset("elpv:mono")


@pytest.fixture(scope="session")
def extractor():
    from pipeline.config import FeatureConfig
    from pipeline.patchcore.features import FeatureExtractor

    return FeatureExtractor(FeatureConfig())


@pytest.fixture(scope="session")
def small_mtd_model(mtd_dataset, extractor):
    """A bank fitted on 150 real MTD nominal tiles (5% coreset)."""
    from pipeline.config import CoresetConfig
    from pipeline.data.datasets import load_images
    from pipeline.patchcore.model import PatchCore

    images = [img for _, img, _ in load_images(mtd_dataset.train[:150])]
    model = PatchCore(extractor.config, CoresetConfig(ratio=0.05), extractor=extractor)
    return model.fit([images[i : i + 8] for i in range(0, len(images), 8)])
