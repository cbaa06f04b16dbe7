"""Which files `tracebank predict` reads from the paths it is given, and where their heatmaps go."""

from pathlib import Path

import pytest

from pipeline.data.inputs import image_inputs, output_paths, relative_names


@pytest.fixture
def parts(tmp_path):
    """A folder as a line's export looks: classes in subfolders, repeated file names, clutter."""
    for rel in ("good/001.png", "good/002.jpg", "crack/001.png", "crack/deep/003.PNG", "top.bmp",
                "notes.txt", ".thumbs/001.png", "good/.hidden.png"):
        path = tmp_path / "parts" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "parts"


def test_a_folder_stands_for_the_images_below_it_sorted_hidden_ones_skipped(parts):
    names = image_inputs([str(parts)])
    assert [str(name) for name in names.values()] == [
        "crack/001.png", "crack/deep/003.PNG", "good/001.png", "good/002.jpg", "top.bmp"]
    assert list(names) == [str(parts / name) for name in names.values()]


def test_files_keep_their_names_and_a_file_named_twice_counts_once(parts):
    one = str(parts / "good" / "001.png")
    names = image_inputs([one, str(parts / "good"), one])
    assert names == {one: Path("001.png"), str(parts / "good" / "002.jpg"): Path("002.jpg")}


def test_heatmaps_mirror_the_folders_so_equal_names_do_not_overwrite(parts, tmp_path):
    targets = output_paths(image_inputs([str(parts)]), tmp_path / "out", "_heatmap.png")
    assert targets[str(parts / "good" / "001.png")] == tmp_path / "out" / "good" / "001_heatmap.png"
    assert targets[str(parts / "crack" / "001.png")] == tmp_path / "out" / "crack" / "001_heatmap.png"
    assert len(set(targets.values())) == len(targets)


def test_two_files_that_would_write_one_heatmap_are_refused_naming_both(parts, tmp_path):
    good, crack = str(parts / "good" / "001.png"), str(parts / "crack" / "001.png")
    with pytest.raises(ValueError, match=f"{good} and {crack} would both write"):
        output_paths(image_inputs([good, crack]), tmp_path / "out", "_heatmap.png")


def test_a_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="no image files .* in this folder or its subfolders"):
        image_inputs([str(tmp_path / "empty")])


def test_dataset_files_are_named_below_the_folder_they_share():
    names = relative_names(["/d/test/good/001.png", "/d/test/crack/001.png"])
    assert names == {"/d/test/good/001.png": Path("good/001.png"), "/d/test/crack/001.png": Path("crack/001.png")}
    assert relative_names(["/d/test/good/001.png"]) == {"/d/test/good/001.png": Path("001.png")}
