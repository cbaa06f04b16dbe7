"""Benchmarks of tracebank (accuracy, speed, memory, service, peer comparison).

Run from the repository root as ``python -m benchmarks.NAME``. They measure the library and
print figures; they are not shipped in its wheel and not part of ``make test``.
"""
