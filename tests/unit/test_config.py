import pytest

from pipeline.config import ConfigError, CoresetConfig, FeatureConfig, ScoringConfig, from_mapping, to_dict


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"params.yaml: coreset: unknown key\(s\) ratoi"):
        from_mapping(CoresetConfig, "params.yaml: coreset", {"ratoi": 0.1})


@pytest.mark.parametrize(
    ("cls", "values", "field"),
    [
        (CoresetConfig, {"ratio": 1.5}, "coreset.ratio"),
        (FeatureConfig, {"resize": "crop"}, "features.resize"),
        (FeatureConfig, {"levels": [3, 2]}, "features.levels"),
        (FeatureConfig, {"image_size": 8}, "features.image_size"),
        (ScoringConfig, {"index": "hnsw"}, "scoring.index"),
        (ScoringConfig, {"num_neighbors": 0}, "scoring.num_neighbors"),
        (ScoringConfig, {"image_score": "mean"}, "scoring.image_score"),
        (ScoringConfig, {"image_sigma": 0}, "scoring.image_sigma"),
        (ScoringConfig, {"image_weight": 1.5}, "scoring.image_weight"),
    ],
)
def test_invalid_values_name_the_field(cls, values, field):
    with pytest.raises(ConfigError, match=field):
        from_mapping(cls, "params.yaml", values)


def test_round_trip_through_dict():
    cfg = FeatureConfig(levels=(1, 2), image_size=256, resize="letterbox")
    assert from_mapping(FeatureConfig, "x", to_dict(cfg)) == cfg
    assert to_dict(cfg)["levels"] == [1, 2]


def test_fit_preset_sets_size_and_sigma_and_explicit_flags_win():
    from pipeline.cli_args import build_parser, preset_value

    def resolved(*argv):
        args = build_parser().parse_args(["fit", "--data", "folder:x", "--out", "b", *argv])
        return (preset_value(args, "features", "image_size", args.size),
                preset_value(args, "scoring", "sigma", args.sigma))

    assert resolved() == (FeatureConfig().image_size, ScoringConfig().sigma) == (224, 10.0)
    assert resolved("--preset", "accurate") == (288, 14.0)
    assert resolved("--preset", "accurate", "--size", "320", "--sigma", "16") == (320, 16.0)
    with pytest.raises(SystemExit):
        resolved("--preset", "fastest")
