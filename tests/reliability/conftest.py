"""A real MTD bank, registered, packaged and promoted, shared by the reliability tests."""

from __future__ import annotations

import pytest

from tests.integration.service_support import BIN, fit_and_register, run


@pytest.fixture(scope="package")
def project(tmp_path_factory, mtd_dataset):
    root = tmp_path_factory.mktemp("reliability")
    bank = fit_and_register(root, "a", limit=40, seed=0)
    run(root, str(BIN / "tracebank"), "promote", bank, "--registry", str(root / "banks"))
    good = [s.path for s in mtd_dataset.test if s.label == 0][:6]
    bad = [s.path for s in mtd_dataset.test if s.label == 1][:6]
    return {"root": root, "bank": bank, "good": good, "bad": bad}
