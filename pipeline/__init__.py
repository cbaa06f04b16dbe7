"""tracebank: PatchCore anomaly detection for industrial visual inspection.

The library layer: arrays and paths in, arrays and small dataclasses out. It never imports
prefect, dvc or bentoml; ``flows/`` and ``serving/`` build on it.
"""

import os as _os

__version__ = "0.1.0"

# numpy's OpenBLAS leaves its worker threads spin-waiting for 2^28 cycles (~0.1 s) after
# every matrix product. In predict the next batch's feature extraction (ONNX Runtime) then
# runs with a core taken, about 30% of the throughput on 2 cores (BENCHMARKS.md); 2^4 cycles
# puts them to sleep at once. OpenBLAS reads this when numpy loads it, so it applies when
# tracebank is imported before numpy (as our entry points do); a value already set wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
