"""Shared fixtures: real data from ../shared/datasets and the ELPV package, small subsets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MTD = (REPO.parent / "shared" / "datasets" / "mtd").resolve()
MTD_SPEC = f"mtd:{MTD}"

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (``prefect server start``) for the run: the flows the tests
    start report to it through ``PREFECT_API_URL`` instead of each starting a temporary
    server of its own (10-20 s apiece). Tests that need a server of their own set the URL."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                break
        time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
    os.environ["PREFECT_API_URL"] = api
    try:
        yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def _flows_report_to_one_server(request):
    """Modules that run Prefect flows share :func:`prefect_server` (started before their
    module-scoped fixtures run flows); unit tests start no server."""
    if any(part in request.node.nodeid for part in ("integration/", "reliability/")):
        request.getfixturevalue("prefect_server")


@pytest.fixture(scope="session")
def mtd_dataset():
    from pipeline.data.datasets import open_dataset

    if not MTD.is_dir():
        raise FileNotFoundError(f"the MTD dataset is expected at {MTD} (../shared beside the repository)")
    return open_dataset(MTD_SPEC)


@pytest.fixture(scope="session")
def elpv_mono():
    from pipeline.data.datasets import open_dataset

    return open_dataset("elpv:mono")


@pytest.fixture(scope="session")
def extractor():
    from pipeline.config import FeatureConfig
    from pipeline.patchcore.features import FeatureExtractor

    return FeatureExtractor(FeatureConfig())


@pytest.fixture(scope="session")
def small_mtd_model(mtd_dataset, extractor):
    """A bank fitted on 150 real MTD nominal tiles (5% coreset)."""
    from pipeline.config import CoresetConfig
    from pipeline.data.datasets import load_images
    from pipeline.patchcore.model import PatchCore

    images = [img for _, img, _ in load_images(mtd_dataset.train[:150])]
    model = PatchCore(extractor.config, CoresetConfig(ratio=0.05), extractor=extractor)
    return model.fit([images[i : i + 8] for i in range(0, len(images), 8)])


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the run (tests/postgres.py), started on first use."""
    from tests.postgres import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres):
    """The URL of a new empty PostgreSQL database of this test's own, dropped afterwards."""
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_url(request, tmp_path):
    """An empty audit database of each kind the audit log supports: a SQLite file, then a
    database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit' / 'decisions.sqlite'}"
    return request.getfixturevalue("postgres_url")
