"""Decoding images safely: one function every reader and the service go through.

Every failure becomes an :class:`ImageError` naming the source and what to do, so a bad
file is reported and skipped (or refused) at the boundary, never a crash deep in a batch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Largest image accepted, in pixels (width * height). Bigger inputs are refused before the
#: pixel data is decoded (Pillow reads only the header for ``Image.open``).
DEFAULT_MAX_PIXELS = 40_000_000
#: Smallest side accepted; a 1x1 "image" carries nothing to inspect.
DEFAULT_MIN_SIDE = 8


class ImageError(ValueError):
    """An input could not be used as an image; the message names it and says why."""


def decode_image(
    data: bytes,
    *,
    source: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decode encoded image bytes into an 8-bit array.

    Args:
        data: the encoded file (PNG, JPEG, BMP, TIFF, ...).
        source: name used in error messages (a path or an upload's filename).
        max_pixels: refuse images with more pixels than this, before decoding them.
        min_side: refuse images whose width or height is below this.

    Returns:
        ``(H, W)`` uint8 for grayscale inputs, ``(H, W, 3)`` uint8 otherwise.

    Note:
        16-bit grayscale (EL and X-ray cameras produce it) is scaled by the container's bit
        depth, ``round(v * 255 / 65535)``, never by the image's own range: the same scene
        gives the same 8-bit image whatever else is in the frame, and a 16-bit file and its
        8-bit reduction score alike. 32-bit integer images are read as 16-bit (clipped to
        0..65535), float images as 0..1. A camera that fills only 12 bits of a 16-bit
        container gives a dark image; shift it to the top bits when exporting. Palette,
        CMYK and alpha images become RGB; an animated file is refused
        rather than silently reduced to its first frame.
    """
    if not data:
        raise ImageError(f"{source}: the file is empty (0 bytes); supply an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on damaged TIFF tags: the
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # damage is reported below
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{source}: {width}x{height} is {width * height} pixels, over the limit of "
                    f"{max_pixels}; downscale the image or raise the pixel limit"
                )
            if min(width, height) < min_side:
                raise ImageError(
                    f"{source}: {width}x{height} is too small (each side must be >= {min_side} px)"
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageError(
                    f"{source}: animated or multi-page image with {frames} frames; "
                    "send one still frame"
                )
            image.load()
            return _to_uint8(image, source)  # conversion decodes some damaged files further
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{source}: not an image format this reader knows (PNG, JPEG, BMP, TIFF, ...); "
            f"{len(data)} bytes starting {data[:8]!r}"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{source}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # Pillow's plugins raise OSError, SyntaxError, TypeError, struct.error ... on damage
        raise ImageError(f"{source}: the image is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def _to_uint8(image: Image.Image, source: str) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return (array * (255.0 / 65535.0)).round().astype(np.uint8)
    if mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
        return (array * 255.0).round().astype(np.uint8)
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    raise ImageError(f"{source}: unsupported image mode {mode!r}; convert it to 8-bit RGB or gray")


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file; see :func:`decode_image` for the result and errors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    return decode_image(data, source=str(path), max_pixels=max_pixels)


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as a boolean ``(H, W)`` array matching ``shape``.

    Raises:
        ImageError: if the mask is unreadable or its size differs from the image's.
    """
    array = read_image(path)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.shape != tuple(shape):
        raise ImageError(
            f"{path}: mask is {array.shape[1]}x{array.shape[0]} but its image is "
            f"{shape[1]}x{shape[0]}; masks must match their images pixel for pixel"
        )
    return array > 127
