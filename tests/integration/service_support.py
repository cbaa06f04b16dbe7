"""Starting the real inspection service for tests: banks fitted on real MTD tiles,
registered and packaged into a scratch BentoML store, then ``bentoml serve`` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from tests.conftest import MTD_SPEC, REPO

BIN = Path(sys.executable).parent
TOKEN = "test-admin-token"

REGISTER = """
import json, sys
from pipeline.lifecycle.gates import GateConfig, check_gates
from pipeline.lifecycle.registry import Registry
from serving.store import save_to_store
bank_dir, registry_root, metrics_json = sys.argv[1:4]
metrics = json.loads(metrics_json)
registry = Registry(registry_root)
lineage = {"data_spec": "mtd (test subset)", "metrics": metrics,
           "gates": check_gates(metrics, GateConfig(image_auroc_min=0.5, pro_min=0.0, pixel_auroc_min=0.5))}
bank_id = registry.register(bank_dir, lineage)
registry.record_packaged(bank_id, save_to_store(registry.bank_dir(bank_id), registry.lineage(bank_id)))
print(bank_id)
"""


def env_for(project: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
        "BENTOML_HOME": str(project / ".bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO),
        "TRACEBANK_REGISTRY": str(project / "banks"),
        "TRACEBANK_AUDIT_DB": str(project / "audit" / "decisions.sqlite"),
        "TRACEBANK_ADMIN_TOKEN": TOKEN,
    })
    env.update(extra)
    return env


def run(project: Path, *args: str, timeout: int = 900) -> str:
    proc = subprocess.run(list(args), cwd=REPO, env=env_for(project), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def fit_and_register(project: Path, name: str, *, limit: int, seed: int) -> str:
    """Fit a small real MTD bank (threshold from its test subset) and register + package it."""
    out = project / "work" / name
    fitted = json.loads(run(project, str(BIN / "tracebank"), "fit", "--data", MTD_SPEC, "--out", str(out),
                            "--limit", str(limit), "--ratio", "0.05", "--seed", str(seed), "--json", "--quiet"))
    return run(project, sys.executable, "-c", REGISTER, str(out), str(project / "banks"),
               json.dumps(fitted["metrics"])).strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``bentoml serve`` of this repository's bentofile, in its own process group."""

    def __init__(self, project: Path, *, target: str | None = None, cwd: Path = REPO,
                 environ: dict[str, str] | None = None, bentoml: Path = BIN / "bentoml", **env: str) -> None:
        """``target`` a Bento tag (default: the bentofile in ``cwd``); ``environ`` replaces
        the project's environment (see :func:`env_for`); ``bentoml`` the command that serves
        (another environment's, for a deployment)."""
        self.bentoml = bentoml
        self.project = project
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = project / f"server-{self.port}.log"
        self.env = {**environ, **env} if environ is not None else env_for(project, **env)
        self.target = [target] if target else []
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0, *, interval: float = 1.0, probe: str = "/readyz") -> Server:
        """Start ``bentoml serve`` and return once ``probe`` answers 200 (polled every ``interval`` s):
        ``/readyz`` by default, ``/healthz`` for a service that is up but may not be ready."""
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(self.bentoml), "serve", *self.target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bentoml serve exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}{probe}", timeout=2).status_code == 200:
                    return self
            time.sleep(interval)
        self.stop()
        raise AssertionError(f"service: no 200 from {probe} after {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """The arbiter and its workers (BentoML starts workers in sessions of their own)."""
        if self.proc is None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """``kill -9`` of every process of the server at once."""
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the arbiter (it stops its workers); SIGKILL whatever is left after 30 s."""
        processes = self.processes()
        if self.proc is None or self.proc.poll() is not None:
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            return
        self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=30)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.proc.wait(timeout=30)

    def predict(self, client: httpx.Client, path: str | Path, part_id: str, **fields: str) -> httpx.Response:
        data = Path(path).read_bytes()
        return client.post(f"{self.url}/predict", files={"image": (Path(path).name, data, "image/png")},
                           data={"part_id": part_id, **fields}, timeout=120)


@contextlib.contextmanager
def running(project: Path, **env: str) -> Iterator[Server]:
    server = Server(project, **env).start()
    try:
        yield server
    finally:
        server.stop()


def png(array: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def clean_and_painted(bank_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A tile the bank was fitted on (good), and the same tile with a dark and a bright square
    painted on it (anomalous): a pair a person can judge, written as PNGs into ``folder``."""
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    tile = np.asarray(Image.open(manifest["training"]["files"][0]["path"]).convert("L")).copy()
    h, w = tile.shape
    clean, painted = folder / "clean.png", folder / "painted.png"
    clean.write_bytes(png(tile))
    tile[h // 3 : h // 3 + h // 6, w // 3 : w // 3 + w // 6] = 0
    tile[h // 2 : h // 2 + h // 8, w // 6 : w // 6 + w // 8] = 255
    painted.write_bytes(png(tile))
    return clean, painted


# --- a deployment: the Bento exported, installed where only its own requirements are -------------

#: Where an exported Bento keeps what it installs (``bentoml build`` adds its own bentoml pin).
BENTO_REQUIREMENTS = "env/python/requirements.txt"


def build_and_export(project: Path, archive: Path) -> str:
    """``bentoml build`` of this repository with ``project``'s production bank, then ``bentoml
    export`` to ``archive``; returns the Bento's tag."""
    bentoml = str(BIN / "bentoml")
    tag = run(project, bentoml, "build", "--output", "tag").strip().splitlines()[-1].removeprefix("__tag__:")
    run(project, bentoml, "export", tag, str(archive))
    return tag


def bento_requirements(archive: Path) -> str:
    """The requirements file inside an exported Bento, as text."""
    with tarfile.open(archive) as tar:
        names = [n for n in tar.getnames() if n.removeprefix("./") == BENTO_REQUIREMENTS]
        member = tar.extractfile(names[0]) if names else None
        if member is None:
            raise AssertionError(f"{archive} has no {BENTO_REQUIREMENTS}")
        return member.read().decode()


def bento_venv(archive: Path, venv: Path, *, python: str = sys.executable, timeout: int = 900) -> Path:
    """A new virtual environment holding only what the exported Bento's requirements install.

    No constraints file (``PIP_CONSTRAINT`` is cleared: the project's and any machine-wide one
    are not the Bento's) and nothing of this environment; pip's cache is used as usual.
    """
    requirements = venv.parent / f"{venv.name}-requirements.txt"
    requirements.write_text(bento_requirements(archive))
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(requirements)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"pip install -r {BENTO_REQUIREMENTS} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return venv


def machine_environ(home: Path, venv: Path) -> dict[str, str]:
    """The environment of another machine: its own HOME and empty BentoML home, ``venv``'s
    commands first on PATH, no tracebank, BentoML, XDG or Python path settings of this one."""
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(("TRACEBANK_", "BENTOML_", "PYTHONPATH", "XDG_", "VIRTUAL_ENV"))}
    path = [entry for entry in environ.get("PATH", "").split(os.pathsep) if entry and Path(entry) != BIN]
    environ.update({"HOME": str(home), "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                    "DO_NOT_TRACK": "1", "PATH": os.pathsep.join([str(venv / "bin"), *path])})
    return environ


def bentoml_import(archive: Path, venv: Path, environ: dict[str, str], cwd: Path) -> None:
    """``bentoml import`` with ``venv``'s bentoml into the BentoML home that ``environ`` names."""
    proc = subprocess.run([str(venv / "bin" / "bentoml"), "import", str(archive)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"bentoml import failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-2000:]}")
