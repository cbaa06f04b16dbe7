"""`tracebank audit --since`: ISO times and ages as docker and journalctl take them."""

import datetime as dt

import pytest

from pipeline.lifecycle.audit import parse_since

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", dt.datetime(2026, 11, 26, 11, 30, tzinfo=dt.UTC)),
    ("2h", dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)),
    ("7d", dt.datetime(2026, 11, 19, 12, 0, tzinfo=dt.UTC)),
    ("90s", dt.datetime(2026, 11, 26, 11, 58, 30, tzinfo=dt.UTC)),
    ("1w", dt.datetime(2026, 11, 19, 12, 0, tzinfo=dt.UTC)),
    ("2026-11-25T06:00", dt.datetime(2026, 11, 25, 6, 0, tzinfo=dt.UTC)),
    ("2026-11-25", dt.datetime(2026, 11, 25, tzinfo=dt.UTC)),
    ("2026-11-25T08:00+02:00", dt.datetime(2026, 11, 25, 6, 0, tzinfo=dt.UTC)),
])
def test_since_accepts_iso_times_and_ages(text, expected):
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "5y", "m", "-2h", "2 h"])
def test_since_refuses_anything_else_with_the_forms_it_takes(text):
    with pytest.raises(ValueError, match=r"neither an ISO date or time .* nor an age \(30m, 2h, 7d\)"):
        parse_since(text, NOW)
