"""Splitting a batch between worker threads (pipeline/patchcore/parallel.py)."""

import threading

import pytest

from pipeline.patchcore.parallel import map_in_threads, split, worker_count
from pipeline.patchcore.runtime import available_cores


@pytest.mark.parametrize(("n", "parts", "sizes"), [(16, 2, [8, 8]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (2, 2, [1, 1])])
def test_split_is_contiguous_in_order_and_even(n, parts, sizes):
    slices = split(n, parts)
    assert [s.stop - s.start for s in slices] == sizes
    assert [i for s in slices for i in range(n)[s]] == list(range(n))


def test_worker_count_never_exceeds_items_threads_or_cores():
    assert worker_count(1, 8) == 1
    assert worker_count(16, 1) == 1
    assert worker_count(16, 64) == min(16, available_cores())


def test_results_come_back_in_order_and_the_first_error_is_raised():
    assert map_in_threads(lambda x: x * x, list(range(10))) == [x * x for x in range(10)]

    def fail_on_three(x):
        if x == 3:
            raise ValueError("item 3 is bad")
        return x

    with pytest.raises(ValueError, match="item 3 is bad"):
        map_in_threads(fail_on_three, list(range(6)))


def test_a_nested_call_from_a_worker_runs_inline_instead_of_deadlocking():
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(map_in_threads(lambda x: map_in_threads(lambda y: y + x, [1, 2]), [10, 20, 30]))
    )
    thread.start()
    thread.join(timeout=60)
    assert result == [[[11, 12], [21, 22], [31, 32]]]


def test_a_forked_child_gets_a_working_pool_of_its_own():
    """A process forked after the pool started (a server's worker, say) must not wait on the
    parent's threads, which the child does not have."""
    import multiprocessing

    assert map_in_threads(abs, [-1, -2]) == [1, 2]  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(map_in_threads, (abs, [-3, -4])).get(timeout=60) == [3, 4]
