"""Prefect flows over the ``pipeline`` library (thin: each task calls one library step)."""

import pipeline  # noqa: F401  (first, so its OpenBLAS setting precedes numpy's loading)
