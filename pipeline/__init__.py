"""tracebank: PatchCore anomaly detection for industrial visual inspection.

The library layer: arrays and paths in, arrays and small dataclasses out. It never imports
prefect, dvc or bentoml; ``flows/`` and ``serving/`` build on it.
"""

__version__ = "0.1.0"
