"""Service latency and throughput against the offline batch throughput of the same bank.

    python -m benchmarks.service [--registry banks] [--images DIR_OR_SPEC] [--seconds 20]

Starts ``bentoml serve`` on 127.0.0.1 with the registry's production bank (a scratch audit
database), then for 1, 4 and 16 concurrent clients posts real images to ``/predict`` for
``--seconds`` each and prints p50/p95/p99 latency and requests/s; then scores the same
images in-process in batches of 16 with the same bank and prints images/s.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from pipeline.data.datasets import open_dataset
from pipeline.data.images import read_image
from pipeline.lifecycle.inspection import LoadedBank
from serving.store import production_bank_dir


def _images(spec: str, count: int) -> list[Path]:
    if Path(spec).is_dir():
        files = sorted(p for p in Path(spec).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    else:
        files = [Path(s.path) for s in open_dataset(spec).test]
    if not files:
        raise SystemExit(f"no images found in {spec}")
    step = max(1, len(files) // count)
    return files[::step][:count]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(registry: str, audit: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    env = dict(os.environ, TRACEBANK_REGISTRY=str(Path(registry).resolve()), TRACEBANK_AUDIT_DB=audit)
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {proc.returncode}; run it by hand to see why")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("service not ready after 240 s")


def _load(url: str, files: list[Path], clients: int, seconds: float, endpoint: str) -> dict[str, float | str]:
    payloads = [(f.name, f.read_bytes()) for f in files]
    encoded = [base64.b64encode(data).decode() for _, data in payloads]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(k: int) -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as client:
            i = k
            while time.monotonic() < stop:
                name, data = payloads[i % len(payloads)]
                start = time.perf_counter()
                if endpoint == "predict":
                    response = client.post(f"{url}/predict", files={"image": (name, data)},
                                           data={"part_id": f"bench-{i}"})
                else:
                    item = {"image_b64": encoded[i % len(encoded)], "part_id": f"bench-{i}"}
                    response = client.post(f"{url}/predict_batch", json={"items": [item]})
                took = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(took)
                    else:
                        errors += 1
                i += clients

    began = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ms = np.array(latencies) * 1000.0
    return {"endpoint": endpoint, "clients": clients, "requests": len(ms), "errors": errors, "rps": len(ms) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def _offline(bank_dir: Path, files: list[Path], batch: int = 16) -> tuple[float, str]:
    bank = LoadedBank(bank_dir)
    images = [read_image(f) for f in files]
    bank.model.predict(images[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        bank.model.predict(images[i : i + batch])
    return len(images) / (time.perf_counter() - start), bank.bank_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="banks")
    parser.add_argument("--images", default="mvtec:data", help="a folder of images or a dataset spec")
    parser.add_argument("--count", type=int, default=48, help="distinct images to cycle through")
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args(argv)
    files = _images(args.images, args.count)
    bank_dir = production_bank_dir(args.registry)
    with tempfile.TemporaryDirectory(prefix="tracebank-bench-") as tmp:
        proc, url = _serve(args.registry, str(Path(tmp) / "audit.sqlite"))
        try:
            _load(url, files, 2, 5.0, "predict")  # warm-up
            rows = [_load(url, files, int(c), args.seconds, endpoint)
                    for endpoint in ("predict", "predict_batch") for c in args.clients.split(",")]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    offline, bank_id = _offline(bank_dir, files)
    print(f"bank {bank_id}  images {len(files)} from {args.images}  {args.seconds:.0f} s per level")
    print(f"{'endpoint':>14} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50_ms':>8} {'p95_ms':>8} "
          f"{'p99_ms':>8}")
    for r in rows:
        print(f"{r['endpoint']:>14} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['rps']:>7.2f} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    print(f"offline batch-16 predict (same bank, in-process): {offline:.2f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
