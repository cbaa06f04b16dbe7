"""The calibration split: disjoint from training and test, and stable as new images arrive."""

from pipeline.data.datasets import Dataset, Sample, calibration_draw, hold_out_calibration


def _dataset(n_train: int, n_bad: int = 0) -> Dataset:
    train = [Sample(f"/data/train/good/{i:04d}.png", 0) for i in range(n_train)]
    test = [Sample(f"/data/test/good/{i:04d}.png", 0) for i in range(20)]
    test += [Sample(f"/data/test/crack/{i:04d}.png", 1, f"/m/{i}.png", "crack") for i in range(n_bad)]
    return Dataset("mvtec:/data", train, test)


def test_the_held_out_share_is_disjoint_from_training_and_test_and_close_to_the_share():
    split = hold_out_calibration(_dataset(400, n_bad=100), 0.1)
    names = {s.path for s in split.calibration}
    assert names.isdisjoint(s.path for s in split.train) and names.isdisjoint(s.path for s in split.test)
    assert len(split.calibration) + len(split.train) == 400 and len(split.test) == 120
    assert 25 <= len(split.calibration) <= 55  # binomial(400, 0.1): mean 40, sd 6
    assert all(calibration_draw(s.path) < 0.1 for s in split.calibration)


def test_adding_images_never_moves_an_earlier_image_between_training_and_calibration():
    before = hold_out_calibration(_dataset(300), 0.1)
    after = hold_out_calibration(_dataset(350), 0.1)
    assert {s.path for s in before.calibration} <= {s.path for s in after.calibration}
    assert {s.path for s in before.train} <= {s.path for s in after.train}


def test_f1_calibration_also_holds_out_labelled_defects_from_the_test_split():
    split = hold_out_calibration(_dataset(100, n_bad=200), 0.1, defects=True)
    bad = [s for s in split.calibration if s.label == 1]
    assert 8 <= len(bad) <= 35 and not set(bad) & set(split.test)
    assert sum(s.label for s in split.test) + len(bad) == 200


def test_tiny_sets_keep_one_image_on_each_side_and_share_zero_moves_nothing():
    two = hold_out_calibration(_dataset(2), 0.01)
    assert len(two.calibration) == 1 and len(two.train) == 1
    assert hold_out_calibration(_dataset(2), 0.99).train  # never all of them
    assert hold_out_calibration(_dataset(50), 0.0).calibration == []
