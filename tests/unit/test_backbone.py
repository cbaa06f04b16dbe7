from collections import OrderedDict

import pytest
import torch

from pipeline.hashing import sha256_file
from pipeline.patchcore.backbone import BackboneError, load_backbone, packaged_weights_path


def test_default_weights_load_offline_with_hash():
    bb = load_backbone("tf_efficientnet_lite0", (2, 3))
    assert bb.channels == (40, 112) and bb.strides == (8, 16)
    assert bb.weights_sha256 == sha256_file(packaged_weights_path("tf_efficientnet_lite0"))
    out = bb.model(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in out] == [40, 112]


def test_weights_in_other_key_layout_are_remapped(tmp_path):
    # The packaged file is in EfficientNet-PyTorch layout; rename its keys again and save as
    # .pth and .safetensors: both must load to the same features as the default.
    from safetensors.torch import save_file

    source = torch.load(packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    renamed = OrderedDict(
        (f"layer{i:04d}.{k.rsplit('.', 1)[-1]}", v.contiguous().clone()) for i, (k, v) in enumerate(source.items())
    )
    torch.save(renamed, tmp_path / "w.pth")
    save_file(dict(renamed), str(tmp_path / "w.safetensors"))
    x = torch.rand(1, 3, 64, 64)
    ref = load_backbone("tf_efficientnet_lite0", (2, 3)).model(x)
    for name in ("w.pth", "w.safetensors"):
        got = load_backbone("tf_efficientnet_lite0", (2, 3), str(tmp_path / name)).model(x)
        assert all(torch.allclose(a, b) for a, b in zip(ref, got, strict=True))


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    torch.save({"a": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="does not fit this backbone"):
        load_backbone("tf_efficientnet_lite0", (2, 3), str(tmp_path / "bad.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        load_backbone("tf_efficientnet_lite0", (2, 3), str(tmp_path / "junk.pth"))
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("tf_efficientnet_lite0", (2, 3), str(tmp_path / "missing.pth"))


def test_unknown_backbone_and_levels():
    with pytest.raises(BackboneError, match="unknown timm backbone"):
        load_backbone("resnet_imaginary", (2, 3))
    with pytest.raises(BackboneError, match="feature stages"):
        load_backbone("tf_efficientnet_lite0", (2, 9))
    with pytest.raises(BackboneError, match="no offline packaged weights"):
        load_backbone("resnet18", (2, 3))
