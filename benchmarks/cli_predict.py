"""`tracebank predict` against the library on the same images: does the CLI run at library speed?

    python -m benchmarks.cli_predict                      # fits an MTD bank first (ONNX features)
    python -m benchmarks.cli_predict --bank DIR --repeats 3

Times, on MTD's 190 good test tiles, (1) the library end to end (decode, features, search,
Eq. 7 score, no maps) at batch 16 in this process, and (2) the `tracebank predict` command on
the same files (a folder), whose own `timings.images_per_s` covers decoding and scoring
after the bank is loaded; the command's wall time including start-up is printed too.
Each is run ``--repeats`` times, alternating, and the best of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pipeline  # noqa: F401  (first: its OpenBLAS setting precedes numpy's loading)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mtd:../shared/datasets/mtd")
    parser.add_argument("--bank", help="a fitted bank (default: fit one on --data)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from pipeline.data.datasets import open_dataset
    from pipeline.data.images import read_image
    from pipeline.patchcore.bank import load_bank

    exe = Path(sys.executable).parent / "tracebank"
    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(args.bank) if args.bank else Path(tmp) / "bank"
        if not args.bank:
            subprocess.run([str(exe), "fit", "--data", args.data, "--out", str(bank), "--no-evaluate", "--json"],
                           check=True, capture_output=True)
        folder = Path(tmp) / "good"
        folder.mkdir()
        for sample in open_dataset(args.data).test:
            if sample.label == 0:
                os.symlink(Path(sample.path).resolve(), folder / Path(sample.path).name)
        paths = sorted(str(p) for p in folder.iterdir())
        model, _ = load_bank(bank)
        model.predict([read_image(paths[0])], maps=False)  # warm-up, not timed
        library, command, wall = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in range(0, len(paths), args.batch_size):
                model.predict([read_image(p) for p in paths[i : i + args.batch_size]], maps=False)
            library.append(len(paths) / (time.perf_counter() - start))
            start = time.perf_counter()
            proc = subprocess.run([str(exe), "predict", str(bank), str(folder), "--json",
                                   "--batch-size", str(args.batch_size)], check=True, capture_output=True, text=True)
            wall.append(len(paths) / (time.perf_counter() - start))
            command.append(json.loads(proc.stdout)["timings"]["images_per_s"])
    lib, cli, whole = max(library), max(command), max(wall)
    print(f"{len(paths)} images, batch {args.batch_size}, best of {args.repeats}; load average {os.getloadavg()}")
    print(f"library end to end      {lib:6.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in library)})")
    print(f"tracebank predict       {cli:6.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in command)})"
          f"  = {cli / lib:.2f} of the library")
    print(f"  with process start-up {whole:6.1f} images/s   (bank load, ONNX session, imports included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
