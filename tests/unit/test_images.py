import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageError, decode_image, read_image


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_png(mtd_dataset) -> bytes:
    return Path(mtd_dataset.train[0].path).read_bytes()


def test_real_image_decodes_to_uint8(real_png):
    image = decode_image(real_png)
    assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 8


def test_empty_file_named(tmp_path):
    path = tmp_path / "part_17.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"part_17\.png: the file is empty"):
        read_image(path)


def test_truncated_file(real_png):
    with pytest.raises(ImageError, match="truncated or corrupt|not an image format"):
        decode_image(real_png[: len(real_png) // 2], source="cut.png")


def test_not_an_image():
    with pytest.raises(ImageError, match="not an image format"):
        decode_image(b"%PDF-1.4 this is not a picture", source="doc.pdf")


def test_one_pixel_image_refused():
    with pytest.raises(ImageError, match="too small"):
        decode_image(_encode(Image.new("L", (1, 1)), "PNG"))


def test_decompression_bomb_refused_before_decoding():
    # A PNG header that claims 100000 x 100000 pixels, with a tiny (invalid) body.
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    data = b"\x89PNG\r\n\x1a\n" + body
    with pytest.raises(ImageError, match="over the limit|decompression bomb"):
        decode_image(data, source="bomb.png")


def test_pixel_limit_is_configurable():
    data = _encode(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="over the limit of 5000"):
        decode_image(data, max_pixels=5000)


def test_animated_gif_refused():
    frames = [Image.new("L", (32, 32), color=c) for c in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="animated"):
        decode_image(buf.getvalue())


def test_sixteen_bit_is_scaled_by_its_bit_depth_not_its_own_range():
    arr = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)  # 0 .. 40950
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == round(40950 * 255 / 65535)  # 159
    # two shots of one part with different extremes: the shared pixels map to the same values
    brighter = arr.copy()
    brighter[0, 0] = 65535
    again = decode_image(_encode(Image.fromarray(brighter), "PNG"))
    assert np.array_equal(again[1:], out[1:]) and again[0, 0] == 255


def test_a_sixteen_bit_tile_decodes_to_its_eight_bit_reduction(real_png):
    tile = decode_image(real_png)
    rng = np.random.default_rng(0)
    exact = tile.astype(np.int32) * 257
    sixteen = np.clip(exact + rng.integers(-128, 128, tile.shape), 0, 65535)  # detail below one 8-bit step
    decoded = decode_image(_encode(Image.fromarray(sixteen.astype(np.uint16)), "PNG"))
    assert np.array_equal(decoded, tile)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA"])
def test_other_modes_become_rgb_or_gray(mode):
    img = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_encode(img, fmt))
    assert out.dtype == np.uint8 and out.shape[:2] == (30, 40)


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_grey_tile_prepares_as_its_three_channel_copy(mtd_dataset, resize):
    # Grey images are resized once and then repeated; the input must equal that of the
    # same picture stored as RGB, and letterboxing must keep the content box.
    from pipeline.patchcore.features import prepare

    grey = read_image(mtd_dataset.test[3].path)
    assert grey.ndim == 2
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    out_grey, place_grey = prepare(grey, 224, resize)
    out_rgb, place_rgb = prepare(rgb, 224, resize)
    assert out_grey.shape == (224, 224, 3) and out_grey.dtype == np.uint8
    np.testing.assert_array_equal(out_grey, out_rgb)
    assert place_grey == place_rgb
    if resize == "letterbox":
        assert max(place_grey.inner_h, place_grey.inner_w) == 224
        assert min(place_grey.inner_h, place_grey.inner_w) < 224  # MTD tiles are not square
