"""Property-based fuzzing of image decoding and of the predict endpoint, over mutated real
images (PNG from ELPV, JPEG from MTD): no crash, no 5xx, no hang, in a bounded number of cases."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.images import ImageError, decode_image
from tests.integration.service_support import running


def _seeds() -> list[bytes]:
    from pipeline.data.datasets import open_dataset
    from tests.conftest import MTD_SPEC

    mtd = open_dataset(MTD_SPEC)
    elpv = open_dataset("elpv:mono")
    seeds = [Path(mtd.test[0].path).read_bytes(), Path(elpv.train[0].path).read_bytes()]
    tile = np.asarray(Image.open(io.BytesIO(seeds[0])).convert("L"))[:64, :64]
    for fmt in ("BMP", "TIFF", "GIF"):  # other container formats the decoder accepts
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, format=fmt)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real image file with a few byte flips, an insertion, a deletion or a truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    header = draw(st.booleans())  # half the mutations hit the first 64 bytes, where headers live
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dimension"]))
        limit = min(len(data), 64) if header else len(data)
        if not data:
            break
        at = draw(st.integers(0, max(0, limit - 1)))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:  # a large width/height field, as in a decompression bomb
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x01\x00\x00", b"\x7f\xff"]))
    return bytes(data)


@settings(max_examples=400, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(mutated())
def test_decoding_mutated_images_returns_an_image_or_a_clear_error(data):
    start = time.perf_counter()
    try:
        image = decode_image(data, source="fuzz", max_pixels=40_000_000)
    except ImageError as exc:
        assert str(exc).startswith("fuzz: ")
    else:
        assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 8
    assert time.perf_counter() - start < 5.0


def test_predict_endpoint_fuzzed_never_5xx(project):
    db = project["root"] / "fuzz.sqlite"
    statuses: dict[int, int] = {}
    with running(project["root"], TRACEBANK_AUDIT_DB=str(db)) as server, httpx.Client(timeout=60) as client:

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                  HealthCheck.function_scoped_fixture], derandomize=True)
        @given(mutated(), st.text(max_size=300))
        def one(data: bytes, part_id: str) -> None:
            response = client.post(f"{server.url}/predict", files={"image": ("f.bin", data)},
                                   data={"part_id": part_id})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in (200, 400), response.text
            assert isinstance(response.json(), (dict, list))

        one()
        assert client.get(f"{server.url}/readyz").status_code == 200
    assert statuses.get(400, 0) > 0 and sum(statuses.values()) >= 60
