"""Property-based fuzzing of image decoding and of the service's request bodies, over mutated
real images (PNG from ELPV, JPEG from MTD), hand-built multipart bodies and JSON: no crash, no
500, no hang, no fetch of a URL found in a request, in a bounded number of cases (derandomized,
so CI runs the same ones)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.images import ImageError, decode_image
from tests.integration.service_support import TOKEN, Server, running
from tests.reliability.test_service_faults import record


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


class Canary:
    """A listening socket on 127.0.0.1 whose URL goes into fuzzed values: any connection to
    it is the service fetching what a client sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                try:
                    first = conn.recv(200)
                except OSError:
                    first = b""
            self.connections.append(f"{peer}: {first!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    listener = Canary()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(scope="module")
def server(project, canary) -> Iterator[Server]:
    with running(project["root"], TRACEBANK_AUDIT_DB=str(project["root"] / "fuzz.sqlite")) as started:
        yield started


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
#: what any request may be answered with: a result, the client's fault, or "retry later"; never 500
ALLOWED = frozenset({200, 503} | set(range(400, 500)))


def test_predict_endpoint_fuzzed_never_5xx(server):
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=60) as client:

        @FUZZ
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


# --- hostile multipart and JSON bodies ------------------------------------------------------

def _urls(port: int) -> list[str]:
    return [f"http://127.0.0.1:{port}/part.png", f"https://127.0.0.1:{port}/", f"//127.0.0.1:{port}/x",
            f"http://localhost:{port}/?q=1", "file:///etc/passwd", "/etc/passwd", "../../../etc/passwd",
            f"ftp://127.0.0.1:{port}/a"]


def _real_images() -> list[bytes]:
    tile = np.asarray(Image.open(io.BytesIO(SEEDS[0])).convert("L"))[:96, :96]
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG")
    return [buffer.getvalue(), SEEDS[0], SEEDS[1]]  # a small PNG, an MTD JPEG, an ELPV PNG


IMAGES = _real_images()
ODD = st.sampled_from(['"', "'", ";", "\r\n", "\n", "\r", "\x00", "\\", "=", ":", " ", "%22", "\u00e9",
                       "\u202e", "\ud7ff", "name=", "filename=", "*", "--", "\t"])


def _odd_text(known: list[str], port: int) -> st.SearchStrategy[str]:
    """Names and values an attacker would try: the expected ones, ones with quotes, semicolons
    and line breaks spliced in, URLs (some pointing at the canary), and any text."""
    base = st.sampled_from(known + _urls(port))
    spliced = st.tuples(base, st.lists(ODD, min_size=1, max_size=4), base).map(lambda t: t[0] + "".join(t[1]) + t[2])
    return st.one_of(base, spliced, st.text(max_size=40))


def _part(draw: st.DrawFn, port: int, name: str, value: bytes, *, file: bool, plain: bool = False) -> bytes:
    """One part: its name quoted in one of the ways clients do (or try; ``plain``: quoted),
    perhaps a file name, a content type and an odd extra header."""
    quoting = 'name="{}"' if plain else draw(st.sampled_from(
        ['name="{}"', "name={}", "name*=UTF-8''{}", 'name="{}"; name="image"']))
    disposition = "form-data; " + quoting.format(name)
    if file:
        filename = draw(_odd_text(["part.png", "a.jpg", "x", "", "../../x.png", "a.png.exe", "C:\\x\\y.png"], port))
        disposition += draw(st.sampled_from(['; filename="{}"', '; filename="{}"', "; filename={}",
                                             "; filename*=UTF-8''{}"])).format(filename)
    headers = [f"Content-Disposition: {disposition}"]
    kind = draw(st.sampled_from([None, "image/png", "image/jpeg", "text/plain", "application/json",
                                 "application/octet-stream", "multipart/mixed; boundary=inner", "image/png\rX: y",
                                 f"message/external-body; access-type=URL; URL=\"http://127.0.0.1:{port}/\""]))
    if kind is not None:
        headers.append(f"Content-Type: {kind}")
    if draw(st.integers(0, 5)) == 0:
        headers.append(draw(st.sampled_from(["Content-Transfer-Encoding: base64", "Content-Length: 99999999",
                                             f"Content-Location: http://127.0.0.1:{port}/", "X-Odd:\t\x01"])))
    return "\r\n".join(headers).encode("utf-8", "surrogatepass") + b"\r\n\r\n" + value


def _text_value(port: int, known: list[str]) -> st.SearchStrategy[bytes]:
    return _odd_text(known, port).map(lambda t: t.encode("utf-8", "surrogatepass"))


#: Content-Type headers of a multipart request, ``{}`` the boundary: quoted, bare, twice, missing, another type.
MULTIPART_TYPES = [
    'multipart/form-data; boundary="{}"', 'multipart/form-data; boundary="{}"', "multipart/form-data; boundary={}",
    "multipart/form-data; boundary={}; charset=utf-16", "Multipart/Form-Data; BOUNDARY={}", "multipart/form-data",
    "multipart/form-data; boundary=", "multipart/form-data; boundary={}; boundary=other",
    "multipart/form-data; boundary=other; boundary={}", "multipart/mixed; boundary={}"]


@st.composite
def multipart_request(draw: st.DrawFn, port: int) -> tuple[str, bytes]:
    """A hand-built ``multipart/form-data`` request (content type, body): two in three start
    from a usable form (a real PNG or JPEG in ``image``, perhaps ``part_id`` and ``output``)
    with odd file names, part content types and URL values (one in three only that); then fields with odd names
    (quotes, semicolons, line breaks), duplicated fields, URLs, random bytes; then perhaps
    the body truncated, its final boundary dropped, LF for CRLF, or sent with a boundary
    other than the body's."""
    boundary = draw(st.sampled_from(["XyZzy", "XyZzy", "XyZzy", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a" * 70,
                                     "b;c=d", "sp ace", "'q'", "x" * 200]))
    values = st.one_of(st.sampled_from(IMAGES), mutated(), st.binary(max_size=200), st.sampled_from(IMAGES).map(
        base64.b64encode), _text_value(port, ["4711", "heatmap", "mask", "none", "null", "true", "1e3", "[]"]))
    parts = []
    usable = draw(st.sampled_from(["no", "yes", "clean"]))  # clean: only file names, types and values odd
    if usable != "no":
        plain = usable == "clean"
        parts.append(_part(draw, port, "image", draw(st.sampled_from(IMAGES)), file=True, plain=plain))
        if draw(st.booleans()):
            parts.append(_part(draw, port, "part_id", draw(_text_value(port, ["4711", "null", "1e3"])), file=False,
                               plain=plain))
        if draw(st.booleans()):
            parts.append(_part(draw, port, "output", draw(st.sampled_from([b"none", b"heatmap", b"mask", b"x"])),
                               file=False, plain=plain))
    for _ in range(0 if usable == "clean" else draw(st.sampled_from([0, 0, 1, 2, 3]))):
        name = draw(_odd_text(["image", "part_id", "output", "image_b64", "image[]", "items"], port))
        parts.append(_part(draw, port, name, draw(values), file=draw(st.booleans())))
    parts = draw(st.permutations(parts))
    if usable == "clean":
        boundary = "XyZzy"
    delimiter = b"--" + boundary.encode("latin-1")
    body = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts) + delimiter + b"--\r\n"
    damage = "none" if usable == "clean" else draw(st.sampled_from(
        ["none"] * 6 + ["truncate", "no-end", "lf", "preamble", "other-boundary"]))
    if damage == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif damage == "no-end":
        body = body[: -len(delimiter) - 4]
    elif damage == "lf":
        body = body.replace(b"\r\n", b"\n")
    elif damage == "preamble":
        body = b"preamble " + delimiter + b"x\r\n" + body + b"epilogue"
    declared = boundary if damage != "other-boundary" else boundary + "Q"
    declared_as = 'multipart/form-data; boundary="{}"' if usable == "clean" else draw(st.sampled_from(MULTIPART_TYPES))
    return declared_as.format(declared), body


class Raw(str):
    """A JSON token written as is (numbers JSON allows but Python would not write)."""


NUMBERS = st.sampled_from([Raw("9" * 5000), Raw("-" + "9" * 400), Raw("1e999999"), Raw("-1e-99999"), Raw("1E+2"),
                           Raw("-0"), Raw("0.000000000000000000000000001"), Raw("NaN"), Raw("Infinity"),
                           Raw("-Infinity"), Raw("18446744073709551616")])


def _json_value(port: int) -> st.SearchStrategy[object]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), NUMBERS,
                       _odd_text(["none", "heatmap", "mask", "4711", "aGk="], port),
                       st.sampled_from(IMAGES).map(lambda b: base64.b64encode(b).decode()))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(_odd_text(["image_b64", "part_id", "output", "items", "image"], port),
                                          inner, max_size=4), max_leaves=12)


def dump(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, float):
        return {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(repr(value), repr(value))
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@st.composite
def json_request(draw: st.DrawFn, port: int) -> tuple[str, str, dict[str, str], bytes]:
    """(path, content type, extra headers, body) for a JSON endpoint: an object with the
    expected keys holding values of every type (deeply nested, huge numbers, URLs, real
    images in base64), or any JSON at all, or JSON nested 10,000 deep, cut short, or in
    another encoding."""
    path = draw(st.sampled_from(["/predict", "/predict_batch", "/metadata", "/reload"]))
    value = _json_value(port)
    if path == "/predict_batch":
        item = st.fixed_dictionaries({}, optional={"image_b64": value, "part_id": value, "output": value})
        shaped = st.fixed_dictionaries({"items": st.one_of(st.lists(item, max_size=3), value)})
    else:
        shaped = st.fixed_dictionaries({}, optional={"image_b64": value, "part_id": value, "output": value,
                                                     "image": value})
    text = dump(draw(st.one_of(shaped, value)))
    shape = draw(st.sampled_from(["as is", "as is", "as is", "deep", "truncated", "utf-16", "bom", "trailing"]))
    if shape == "deep":
        depth = draw(st.sampled_from([100, 1000, 10_000]))
        text = '{"image_b64":' + "[" * depth + "]" * depth + "}"
    body = text.encode("utf-8", "surrogatepass")
    if shape == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif shape == "utf-16":
        body = text.encode("utf-16", "surrogatepass")
    elif shape == "bom":
        body = b"\xef\xbb\xbf" + body
    elif shape == "trailing":
        body += b" garbage"
    content_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                         "application/json; charset=latin-1", "APPLICATION/JSON",
                                         "application/json;;;", "application/x-www-form-urlencoded"]))
    auth = draw(st.sampled_from([None, "Bearer wrong", f"Bearer {TOKEN}", f"bearer {TOKEN}", "Basic Og==",
                                 "Bearer " + "A" * 5000]))
    return path, content_type, ({"authorization": auth} if auth else {}), body


def _check(response: httpx.Response, tally: Counter, what: str) -> None:
    tally[response.status_code] += 1
    assert response.status_code in ALLOWED, f"{what}: {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500:
        body = response.json()  # {"error", "field"}, BentoML's own refusals included
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and "detail" not in body, (
            f"{what}: {response.text[:300]}")


def test_hostile_multipart_bodies_get_200_4xx_or_503_and_no_url_is_fetched(server, canary):
    tally: Counter = Counter()
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:

        url = f"http://127.0.0.1:{canary.port}/part.png".encode()
        form = 'multipart/form-data; boundary="B"'

        @settings(FUZZ, max_examples=300)
        @given(multipart_request(canary.port))
        # the canary's URL as the image (text), as a file's bytes and name, as a part's location
        @example((form, b'--B\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + url + b"\r\n--B--\r\n"))
        @example((form, b'--B\r\nContent-Disposition: form-data; name="image"; filename="' + url + b'"\r\n'
                  b"Content-Type: text/uri-list\r\n\r\n" + url + b"\r\n--B--\r\n"))
        @example((form, b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                  b"Content-Location: " + url + b"\r\nContent-Type: image/png\r\n\r\n\r\n--B--\r\n"))
        @example((form, b'--B\r\nContent-Disposition: form-data; name="image_b64"\r\n\r\n' + url + b"\r\n--B--\r\n"))
        def one(request: tuple[str, bytes]) -> None:
            content_type, body = request
            response = client.post(f"{server.url}/predict", content=body, headers={"content-type": content_type})
            _check(response, tally, f"multipart {content_type!r} {body[:300]!r}")

        one()
        assert client.get(f"{server.url}/readyz").status_code == 200
    record("fuzz_multipart", {"examples": sum(tally.values()), "statuses": dict(tally),
                              "seconds": round(time.perf_counter() - started, 1), "connections": canary.connections})
    assert canary.connections == []
    assert tally[200] > 0 and tally[400] > 0


def test_hostile_json_bodies_get_200_4xx_or_503_and_no_url_is_fetched(server, canary):
    tally: Counter = Counter()
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:

        url = f"http://127.0.0.1:{canary.port}/part.png"

        @settings(FUZZ, max_examples=300)
        @given(json_request(canary.port))
        # the canary's URL where BentoML takes a file or an image, in /predict and in a batch item
        @example(("/predict", "application/json", {}, json.dumps({"image": url}).encode()))
        @example(("/predict", "application/json", {}, json.dumps({"image": {"url": url}, "part_id": url}).encode()))
        @example(("/predict", "application/json", {}, json.dumps({"image_b64": url}).encode()))
        @example(("/predict_batch", "application/json", {}, json.dumps({"items": [{"image_b64": url}]}).encode()))
        @example(("/predict_batch", "application/json", {}, json.dumps({"items": [{"image": url}]}).encode()))
        def one(request: tuple[str, str, dict[str, str], bytes]) -> None:
            path, content_type, headers, body = request
            response = client.post(f"{server.url}{path}", content=body,
                                   headers={"content-type": content_type, **headers})
            _check(response, tally, f"{path} {content_type!r} {headers} {body[:300]!r}")

        one()
        assert client.get(f"{server.url}/readyz").status_code == 200
    record("fuzz_json", {"examples": sum(tally.values()), "statuses": dict(tally),
                         "seconds": round(time.perf_counter() - started, 1), "connections": canary.connections})
    assert canary.connections == []
    assert tally[200] > 0 and tally[400] > 0
