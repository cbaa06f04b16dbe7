"""The PatchCore estimator: fit on nominal images, score new ones.

Scikit-learn style: ``__init__`` stores validated settings, :meth:`PatchCore.fit` returns
``self`` and sets ``memory_bank_`` and ``index_``; scoring before fitting is an error.
The estimator does no file I/O and no logging; callers loop over data and report progress.
Scoring needs no torch: a loaded bank brings its own ONNX graph
(:class:`~pipeline.patchcore.runtime.GraphExtractor`); fitting builds the torch
:class:`~pipeline.patchcore.features.FeatureExtractor`, imported when first needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import CoresetConfig, FeatureConfig, ScoringConfig

from .geometry import Placement
from .index import NNIndex
from .parallel import map_in_threads, single_threaded_blas, split, worker_count
from .runtime import GraphExtractor, thread_budget
from .scoring import anomaly_maps, reweighted_image_scores, smoothed_image_scores, to_original

if TYPE_CHECKING:  # torch loads with the fitting extractor only
    from .features import FeatureExtractor


class NotFittedError(RuntimeError):
    """Scoring was asked of a model that has no memory bank yet."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Scores of a batch of images.

    Attributes:
        scores: ``(B,)`` float32 image anomaly scores (Eq. 7).
        maps: B float32 anomaly maps, each at its image's original ``(H, W)``.
    """

    scores: np.ndarray
    maps: list[np.ndarray]


class PatchCore:
    """PatchCore anomaly detector.

    Args:
        features: how images become patch features.
        coreset: memory-bank subsampling.
        scoring: nearest-neighbour scoring and maps.
        extractor: a ready feature extractor: the torch
            :class:`~pipeline.patchcore.features.FeatureExtractor` (built from ``features``
            when omitted, which needs torch and timm) or a bank's
            :class:`~pipeline.patchcore.runtime.GraphExtractor`.
    """

    def __init__(
        self,
        features: FeatureConfig | None = None,
        coreset: CoresetConfig | None = None,
        scoring: ScoringConfig | None = None,
        *,
        extractor: FeatureExtractor | GraphExtractor | None = None,
    ) -> None:
        self.features = features or FeatureConfig()
        self.coreset = coreset or CoresetConfig()
        self.scoring = scoring or ScoringConfig()
        if extractor is None:
            from .features import FeatureExtractor

            extractor = FeatureExtractor(self.features)
        self.extractor = extractor

    def extract(
        self, batches: Iterable[Sequence[np.ndarray]], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Patch features of all images, stacked: ``(N_images * h * w, D)`` float32."""
        chunks: list[np.ndarray] = []
        for batch in batches:
            feats, _ = self.extractor(batch)  # (B, h, w, D)
            chunks.append(np.asarray(feats).reshape(-1, feats.shape[-1]))
            if on_batch is not None:
                on_batch(len(batch))
        if not chunks:
            raise ValueError("no training images: a memory bank needs at least one nominal image")
        return np.concatenate(chunks)

    def fit_features(
        self, features: np.ndarray, on_centres: Callable[[int], None] | None = None
    ) -> PatchCore:
        """Select the memory bank from precomputed patch features ``(N, D)`` and index it."""
        from .coreset import greedy_coreset

        idx = greedy_coreset(
            features,
            self.coreset.ratio,
            seed=self.coreset.seed,
            proj_dim=self.coreset.proj_dim,
            progress=on_centres,
        )
        self.set_bank(np.ascontiguousarray(features[np.sort(idx)], dtype=np.float32))
        self.n_train_features_ = int(len(features))
        return self

    def fit(
        self,
        batches: Iterable[Sequence[np.ndarray]],
        on_batch: Callable[[int], None] | None = None,
        on_centres: Callable[[int], None] | None = None,
    ) -> PatchCore:
        """Fit on batches of nominal images (``(H, W)`` or ``(H, W, 3)`` uint8 arrays)."""
        return self.fit_features(self.extract(batches, on_batch), on_centres)

    def set_bank(self, bank: np.ndarray, index: NNIndex | None = None) -> None:
        """Install a memory bank ``(M, D)`` (and its index, built when omitted)."""
        if bank.ndim != 2 or bank.shape[1] != self.extractor.dim:
            raise ValueError(
                f"memory bank must be (M, {self.extractor.dim}) for this backbone, got {bank.shape}"
            )
        self.memory_bank_ = bank
        self.index_ = index or NNIndex(self.scoring.index).fit(bank)

    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError("this PatchCore has no memory bank yet; call fit() or load a bank")

    def score_features(self, feats: Any) -> tuple[np.ndarray, np.ndarray]:
        """Image scores ``(B,)`` and patch-score grids ``(B, h, w)`` of ``(B, h, w, D)`` float32
        features (a numpy array or a CPU tensor)."""
        self._check_fitted()
        feats = np.asarray(feats)
        b, h, w, d = feats.shape
        queries = feats.reshape(b, h * w, d)
        dist_sq, nearest = self.index_.search(queries.reshape(-1, d), 1)
        patch = np.sqrt(dist_sq[:, 0]).reshape(b, h * w)  # (B, h*w)
        scores = reweighted_image_scores(
            queries, patch, nearest[:, 0].reshape(b, h * w), self.memory_bank_, self.index_,
            self.scoring.num_neighbors,
        )
        grid = patch.reshape(b, h, w)
        if self.scoring.image_score == "smoothed":
            scores = smoothed_image_scores(grid, scores, self.scoring.image_sigma, self.scoring.image_weight)
        return scores, grid

    def predict(self, images: Sequence[np.ndarray], *, maps: bool = True) -> Prediction:
        """Score a batch of images; anomaly maps at each image's original size.

        With the ONNX runtime a batch of several images is split between the CPU cores
        (as many parts as :func:`~pipeline.patchcore.runtime.thread_budget` allows): each part runs every stage
        in its own thread with single-threaded kernels (:mod:`.parallel`). Results are those
        of scoring the images one at a time, to float rounding.
        """
        self._check_fitted()
        images = list(images)
        onnx = self.extractor.onnx
        parts = worker_count(len(images), thread_budget())
        if onnx is None or parts == 1:
            return self._predict(images, maps, self.extractor.embed)
        embed = onnx.single_threaded()
        with single_threaded_blas():
            results = map_in_threads(lambda part: self._predict(images[part], maps, embed), split(len(images), parts))
        return Prediction(
            scores=np.concatenate([r.scores for r in results]), maps=[m for r in results for m in r.maps]
        )

    def _predict(
        self, images: Sequence[np.ndarray], maps: bool, embed: Callable[[Any], Any]
    ) -> Prediction:
        pixels, placements = self.extractor.prepare_batch(images)
        scores, grid = self.score_features(embed(pixels))
        return Prediction(scores=scores, maps=self._maps(grid, placements) if maps else [])

    def _maps(self, grid: np.ndarray, placements: list[Placement]) -> list[np.ndarray]:
        full = anomaly_maps(grid, self.features.image_size, self.scoring.sigma)
        return [to_original(m, p) for m, p in zip(full, placements, strict=True)]
