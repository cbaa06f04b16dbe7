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
    # between the two: the in-map mean times sqrt(n / 9), n in-map values (corner 4, edge 6)
    "sqrt": {(0, 0): (1 + 2 + 5 + 6) / 4 * (2 / 3), (0, 1): (1 + 2 + 3 + 5 + 6 + 7) / 6 * (6 / 9) ** 0.5,
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


def test_the_default_shrinks_the_border_by_the_square_root_of_the_in_map_share():
    """The default scales a border mean by sqrt(n / 9): 2/3 at a corner, sqrt(2/3) on an edge."""
    from pipeline.config import FeatureConfig

    ones = local_average(torch.ones(1, 1, 4, 4), 3, FeatureConfig().padding)[0, 0]
    assert ones[0, 0].item() == pytest.approx(2 / 3) and ones[0, 1].item() == pytest.approx((2 / 3) ** 0.5)
    assert ones[1, 1].item() == pytest.approx(1.0)


def test_sqrt_is_the_geometric_mean_of_counted_and_excluded_padding():
    maps = torch.rand(2, 5, 7, 9) + 0.1
    counted, excluded = local_average(maps, 3, "zeros"), local_average(maps, 3, "exclude")
    assert torch.allclose(local_average(maps, 3, "sqrt"), (counted * excluded).sqrt(), rtol=1e-5)


def test_zeros_is_the_reference_avgpool():
    """``zeros`` equals torch.nn.AvgPool2d(3, 1, 1), anomalib's and the paper code's pooling."""
    maps = torch.randn(2, 5, 7, 9)
    reference = torch.nn.AvgPool2d(3, 1, 1)(maps)
    assert torch.allclose(local_average(maps, 3, "zeros"), reference, atol=1e-6)
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
