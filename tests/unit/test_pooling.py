"""The 3x3 neighbourhood average of PatchCore (Eq. 2) against hand-worked values at a corner,
an edge and the interior of a 4x4 map, for every border treatment."""

import pytest
import torch

from pipeline.patchcore.features import local_average

# One channel, values 1..16 row by row:
#    1  2  3  4
#    5  6  7  8
#    9 10 11 12
#   13 14 15 16
MAP = torch.arange(1.0, 17.0).view(1, 1, 4, 4)

# (row, col): corner (0, 0), top edge (0, 1), interior (1, 1) and (2, 2)
HAND_WORKED = {
    # zeros counted: the corner's 4 in-map values over 9, the edge's 6 over 9
    "zeros": {(0, 0): (1 + 2 + 5 + 6) / 9, (0, 1): (1 + 2 + 3 + 5 + 6 + 7) / 9,
              (1, 1): (1 + 2 + 3 + 5 + 6 + 7 + 9 + 10 + 11) / 9, (2, 2): (6 + 7 + 8 + 10 + 11 + 12 + 14 + 15 + 16) / 9},
    # padding excluded: the mean of the in-map values only
    "exclude": {(0, 0): (1 + 2 + 5 + 6) / 4, (0, 1): (1 + 2 + 3 + 5 + 6 + 7) / 6,
                (1, 1): 54 / 9, (2, 2): 99 / 9},
    # edge replication: the corner's window is [[1,1,2],[1,1,2],[5,5,6]]
    "replicate": {(0, 0): (1 + 1 + 2 + 1 + 1 + 2 + 5 + 5 + 6) / 9, (0, 1): (1 + 2 + 3) * 2 / 9 + (5 + 6 + 7) / 9,
                  (1, 1): 54 / 9, (2, 2): 99 / 9},
    # reflection (no edge repeat): the corner's window is [[6,5,6],[2,1,2],[6,5,6]]
    "reflect": {(0, 0): (6 + 5 + 6 + 2 + 1 + 2 + 6 + 5 + 6) / 9, (0, 1): (5 + 6 + 7 + 1 + 2 + 3 + 5 + 6 + 7) / 9,
                (1, 1): 54 / 9, (2, 2): 99 / 9},
}


@pytest.mark.parametrize("padding", sorted(HAND_WORKED))
def test_corner_edge_and_interior_match_the_hand_worked_values(padding):
    out = local_average(MAP, 3, padding)
    assert out.shape == MAP.shape
    for (row, col), expected in HAND_WORKED[padding].items():
        assert out[0, 0, row, col].item() == pytest.approx(expected, rel=1e-6), (padding, row, col)


def test_the_default_shrinks_the_border_as_the_reference_avgpool_does():
    """tracebank's default equals torch.nn.AvgPool2d(3, 1, 1), anomalib's and the paper code's."""
    from pipeline.config import FeatureConfig

    maps = torch.randn(2, 5, 7, 9)
    reference = torch.nn.AvgPool2d(3, 1, 1)(maps)
    assert torch.allclose(local_average(maps, 3, FeatureConfig().padding), reference, atol=1e-6)
    ones = local_average(torch.ones(1, 1, 4, 4), 3, "zeros")[0, 0]
    assert ones[0, 0].item() == pytest.approx(4 / 9) and ones[0, 1].item() == pytest.approx(6 / 9)
    assert ones[1, 1].item() == pytest.approx(1.0)


def test_window_of_one_is_the_identity():
    assert torch.equal(local_average(MAP, 1, "zeros"), MAP)


def test_banks_from_before_the_setting_load_with_the_padding_they_were_fitted_with(tmp_path, small_mtd_model):
    import json

    from pipeline.patchcore.bank import load_bank, save_bank

    save_bank(tmp_path / "old", small_mtd_model, training={"spec": "t", "files": []})
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["params"]["features"]["padding"] == small_mtd_model.features.padding
    del manifest["params"]["features"]["padding"]  # as written before features.padding existed
    manifest["format"] = "tracebank-bank/1"
    from pipeline.patchcore.bank import bank_id_of

    manifest["bank_id"] = bank_id_of(manifest)
    manifest_path.write_text(json.dumps(manifest))
    model, _ = load_bank(tmp_path / "old")
    assert model.features.padding == "exclude" and model.extractor.embedding.padding == "exclude"
