"""One batch on every core: the batch split between worker threads, each kernel single-threaded.

On the few cores of a line-side PC the stages of ``predict`` scale poorly when each one
takes every core in turn: on 2 cores the exact nearest-neighbour search ran 1.3x faster on
two BLAS threads than on one, and about a third of it (argmin, the pruning test) is
single-threaded numpy anyway. Giving each core its own slice of the batch, with ONNX Runtime
and BLAS at one thread per caller, keeps both cores busy from the first stage to the last
(MTD tiles, batch 16, 2 cores: 50-63 images/s end to end before, median 82-88 after;
BENCHMARKS.md). The kernels release
the GIL, so plain threads suffice and nothing is copied between processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from threadpoolctl import ThreadpoolController

from .runtime import available_cores

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None
_controller: ThreadpoolController | None = None
_pool: ThreadPoolExecutor | None = None
_local = threading.local()  # .inside: this thread is one of the pool's workers


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold the BLAS libraries numpy and faiss call at one thread while any caller is inside.

    Two threads that each call a multi-threaded OpenBLAS fight over its one thread pool
    (end-to-end predict fell to 27-32 images/s on 2 cores, against 63-90 at one thread); at one thread, each call
    runs on its caller's thread. The limit is process-wide, as OpenBLAS's setting is:
    nested and concurrent callers share it, and the original thread counts come back when
    the last one leaves.
    """
    global _blas_users, _blas_limiter, _controller
    with _lock:
        if _blas_users == 0:
            if _controller is None:  # scanning the loaded libraries takes a few ms: once
                _controller = ThreadpoolController()
            _blas_limiter = _controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def split(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``range(n)`` in order, sizes differing by at most 1."""
    if n < 0 or parts < 1:
        raise ValueError(f"cannot split {n} items into {parts} parts")
    size, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def worker_count(n_items: int, threads: int) -> int:
    """Workers for ``n_items``: one per allowed thread and core, at most one per item."""
    return max(1, min(n_items, threads, available_cores()))


def map_in_threads(func: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[func(item) for item in items]`` on a shared pool of worker threads, in order.

    The pool has one thread per available core and is shared by every caller, so
    concurrent callers (a service's requests) queue their work instead of multiplying
    threads. Called from one of the pool's own threads it runs the items in that thread (a
    nested call must not wait for the pool it occupies). The first exception raised by
    ``func`` propagates, after all items finished.
    """
    global _pool
    if getattr(_local, "inside", False):
        return [func(item) for item in items]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="tracebank")
        pool = _pool
    futures = [pool.submit(_in_worker, func, item) for item in items]
    errors = [f.exception() for f in futures]  # waits for every item
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's pool threads (a submit would wait forever)
    and may have copied the lock while held: start over."""
    global _lock, _pool, _blas_users, _blas_limiter, _controller
    _lock, _pool, _blas_users, _blas_limiter, _controller = threading.Lock(), None, 0, None, None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _in_worker(func: Callable[[T], R], item: T) -> R:
    _local.inside = True
    try:
        return func(item)
    finally:
        _local.inside = False
