"""Frozen settings, one dataclass per stage, loaded from a section of ``params.yaml``.

Field names match the constructor arguments of the code they configure, so the CLI, the
DVC stages and the Prefect flow all pass the same object. Unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A settings section has an unknown key or a value out of range."""


#: Border treatments of the local neighbourhood average (``FeatureConfig.padding``).
PADDINGS = ("zeros", "sqrt", "exclude", "replicate", "reflect")

#: Image scores from the patch scores (``ScoringConfig.image_score``).
IMAGE_SCORES = ("eq7", "smoothed")

#: Named settings over the defaults, by section (``tracebank fit --preset``). ``accurate``
#: trades speed for localisation: 288 px inputs (1.65x the patches and the bank of 224 px)
#: and a wider map Gaussian; on MTD it lifts pixel AUROC and PRO over 0.83 and 0.75 where the
#: default stays near 0.82 and 0.72 (BENCHMARKS.md, issue 15).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "accurate": {"features": {"image_size": 288}, "scoring": {"sigma": 14.0}},
}


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How images become patch features.

    Attributes:
        backbone: timm model name.
        weights: ``"default"`` (the offline EfficientNet-Lite0 package weights), ``"hub"``
            (timm's pretrained weights, needs the network) or a path to ``.pth``/``.safetensors``.
        levels: two (or more) timm ``features_only`` stage indices; the first is the finest.
        image_size: side of the network input in pixels.
        resize: ``"squash"`` (stretch to a square) or ``"letterbox"`` (keep aspect, pad by
            edge replication, crop the map back).
        normalization: ``"tf"`` ((x - 127) / 128, for TensorFlow ports) or ``"imagenet"``.
        neighbourhood: side of the local average pooling window (the paper's p = 3).
        padding: what that window averages at the border of a feature map: ``"sqrt"`` (the
            default: the mean of the ``n`` positions inside the map times ``sqrt(n / 9)``, so
            the outer ring of patch features shrinks by up to 1/3), ``"zeros"`` (zero padding
            counted in the average, as the reference implementation's zero-padded unfold and
            ``torch.nn.AvgPool2d(3, 1, 1)`` do: a shrink of up to 5/9), ``"exclude"`` (the mean
            of the positions inside the map, no shrink; banks fitted before this setting
            existed were made with it and load with it), ``"replicate"`` or ``"reflect"`` (the
            map is padded by edge replication or reflection first). Shrinking the border
            keeps its noisier features from deciding image scores; shrinking it fully mutes
            defects at the edge of the part. BENCHMARKS.md has the ablation.
        proj_dim: optional random projection of the concatenated features (None keeps all).
        device: ``"cpu"`` or ``"cuda"``.
        runtime: ``"torch"`` (eager PyTorch) or ``"onnx"`` (the same computation exported to
            ONNX once, cached, and run by ONNX Runtime on the CPU; several times faster there).
    """

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "default"
    levels: tuple[int, ...] = (2, 3)
    image_size: int = 224
    resize: str = "squash"
    normalization: str = "tf"
    neighbourhood: int = 3
    padding: str = "sqrt"
    proj_dim: int | None = None
    device: str = "cpu"
    runtime: str = "torch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        if len(self.levels) < 1 or list(self.levels) != sorted(set(self.levels)):
            raise ConfigError(f"features.levels must be increasing stage indices, got {self.levels}")
        if not 32 <= self.image_size <= 2048:
            raise ConfigError(f"features.image_size must be in [32, 2048], got {self.image_size}")
        if self.resize not in ("squash", "letterbox"):
            raise ConfigError(f"features.resize must be 'squash' or 'letterbox', got {self.resize!r}")
        if self.normalization not in ("tf", "imagenet"):
            raise ConfigError(
                f"features.normalization must be 'tf' or 'imagenet', got {self.normalization!r}"
            )
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ConfigError(f"features.neighbourhood must be odd and >= 1, got {self.neighbourhood}")
        if self.padding not in PADDINGS:
            raise ConfigError(f"features.padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ConfigError(f"features.proj_dim must be positive or null, got {self.proj_dim}")
        if self.runtime not in ("torch", "onnx"):
            raise ConfigError(f"features.runtime must be 'torch' or 'onnx', got {self.runtime!r}")
        if self.runtime == "onnx" and self.device != "cpu":
            raise ConfigError(
                f"features.runtime 'onnx' runs on the CPU only, got device {self.device!r}; "
                "set features.device to 'cpu' or use runtime 'torch'"
            )


@dataclasses.dataclass(frozen=True)
class CoresetConfig:
    """Greedy k-center coreset selection.

    Attributes:
        ratio: fraction of patch features kept, in (0, 1].
        proj_dim: dimension of the Johnson-Lindenstrauss projection used for distances.
        seed: seed of the projection and the first centre.
    """

    ratio: float = 0.01
    proj_dim: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"coreset.ratio must be in (0, 1], got {self.ratio}")
        if self.proj_dim < 1:
            raise ConfigError(f"coreset.proj_dim must be positive, got {self.proj_dim}")


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """Nearest-neighbour scoring and anomaly maps.

    Attributes:
        num_neighbors: b of the paper's Eq. 7 reweighting (bank neighbours of m*).
        index: ``"flat"`` (exact L2) or ``"ivfpq"`` (approximate, for very large banks).
        sigma: Gaussian smoothing of the anomaly map, in input pixels (10 at 224 px is 1.25
            patch-grid cells of 8 px).
        image_score: ``"eq7"``: the paper's Eq. 7, the reweighted score of the single worst
            patch; ``"smoothed"``: ``image_weight`` x Eq. 7 + (1 - ``image_weight``) x the
            largest value of the patch-score grid after a Gaussian of ``image_sigma`` grid
            cells, so a defect must stand out over a neighbourhood, not in one patch.
        image_sigma: that Gaussian's standard deviation, in patch-grid cells.
        image_weight: the share of Eq. 7's single-patch score in the ``"smoothed"`` score.
    """

    num_neighbors: int = 9
    index: str = "flat"
    sigma: float = 10.0
    image_score: str = "smoothed"
    image_sigma: float = 4.0
    image_weight: float = 0.3

    def __post_init__(self) -> None:
        if self.num_neighbors < 1:
            raise ConfigError(f"scoring.num_neighbors must be >= 1, got {self.num_neighbors}")
        if self.index not in ("flat", "ivfpq"):
            raise ConfigError(f"scoring.index must be 'flat' or 'ivfpq', got {self.index!r}")
        if self.sigma < 0:
            raise ConfigError(f"scoring.sigma must be >= 0, got {self.sigma}")
        if self.image_score not in IMAGE_SCORES:
            raise ConfigError(
                f"scoring.image_score must be one of {', '.join(IMAGE_SCORES)}, got {self.image_score!r}"
            )
        if self.image_sigma <= 0:
            raise ConfigError(f"scoring.image_sigma must be > 0 (grid cells), got {self.image_sigma}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ConfigError(f"scoring.image_weight must be in [0, 1], got {self.image_weight}")


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
    """How the pipeline chooses a bank's decision threshold.

    Attributes:
        method: ``"nominal"``: the ``1 - target_false_reject`` quantile of the good calibration
            images' scores, so about that share of good parts is rejected; ``"f1"``: F1-optimal
            on the calibration split's labelled defects (held out from the test split; on a
            ``synthetic:`` set, which has none there, the synthetic test defects are used).
        target_false_reject: the share of good parts a ``"nominal"`` threshold rejects.
        estimator: how a ``"nominal"`` threshold is read off the good calibration scores
            (:data:`pipeline.evaluation.threshold.ESTIMATORS`): ``"quantile"`` (numpy's
            interpolated quantile; its expected false-reject rate is about the target plus
            ``1 / (N + 1)`` for ``N`` calibration images) or ``"unbiased_frr"`` (the target
            itself on average once ``N >= 99``), among others; see BENCHMARKS.md, "Threshold
            stability".
        calibration: share of the good training images (and, for ``"f1"``, of the defective
            test images) held out to choose the threshold on, disjoint from the images the bank
            is fitted on and from the test split that metrics and gates use; 0 chooses it on
            the test split.
    """

    method: str = "nominal"
    target_false_reject: float = 0.01
    calibration: float = 0.1
    estimator: str = "quantile"

    def __post_init__(self) -> None:
        if self.method not in ("nominal", "f1"):
            raise ConfigError(f"threshold.method must be 'nominal' or 'f1', got {self.method!r}")
        if not 0.0 <= self.target_false_reject < 1.0:
            raise ConfigError(f"threshold.target_false_reject must be in [0, 1), got {self.target_false_reject}")
        estimators = ("quantile", "unbiased_frr", "harrell_davis", "bootstrap", "normal", "lognormal")
        if self.estimator not in estimators:
            raise ConfigError(f"threshold.estimator must be one of {', '.join(estimators)}, got {self.estimator!r}")
        if not 0.0 <= self.calibration < 1.0:
            raise ConfigError(f"threshold.calibration must be in [0, 1), got {self.calibration}")


def from_mapping(cls: type[T], section: str, values: Mapping[str, Any] | None) -> T:
    """Build settings ``cls`` from a mapping, refusing keys it does not know.

    Args:
        cls: a dataclass type from this module (or any frozen dataclass).
        section: name used in error messages, e.g. ``"params.yaml: coreset"``.
        values: the mapping; ``None`` means all defaults.

    Raises:
        ConfigError: on an unknown key or an invalid value.
    """
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{section}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Settings as plain JSON-friendly types (tuples become lists)."""
    out = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def cache_root() -> Path:
    """Root of tracebank's caches: ``$TRACEBANK_CACHE``, else ``~/.cache/tracebank``
    (``XDG_CACHE_HOME`` replaces ``~/.cache`` when set). Nothing is created here."""
    root = os.environ.get("TRACEBANK_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tracebank"
