"""scripts/two_cores.py times work on one thread and on two: each thread
must do its own share, and only its own, or the ratio it prints means
nothing. (Timing is for the script.)"""
import os

import numba
import numpy as np
import pytest
from conftest import load_script

two_cores = load_script("two_cores")


def test_each_thread_sums_its_own_buffer():
    first, second = np.ones(1000, np.float32), np.full(1000, 2, np.float32)
    assert two_cores.sums(first, second, 3, 1).tolist() == [3000, 0]
    assert two_cores.sums(first, second, 3, 2).tolist() == [3000, 6000]


def test_each_thread_computes_its_own_gradient():
    rng = np.random.default_rng(0)
    shape = (2, two_cores.ROWS)
    deltas = rng.standard_normal((*shape, two_cores.OUTPUTS)).astype(np.float32)
    inputs = rng.random((*shape, two_cores.INPUTS), dtype=np.float32)
    for threads in (1, 2):
        weights = np.zeros((2, two_cores.OUTPUTS, two_cores.INPUTS), np.float32)
        two_cores.gradients(weights, deltas, inputs, 2, threads)
        for p in range(2):
            expected = (deltas[p].T.astype(np.float64) @ inputs[p] if p < threads
                        else np.zeros_like(weights[p]))
            np.testing.assert_allclose(weights[p], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_line_goes_back_and_forth_every_trip():
    seconds, last = two_cores.bounce(1000, two_cores.first_two_cpus())
    assert last == 2000  # side 1's answer to the 1000th trip
    assert seconds > 0


def test_the_round_trip_needs_two_cpus():
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        assert two_cores.round_trip_ns(rounds=1, trips=10) is None
    finally:
        os.sched_setaffinity(0, allowed)
    if len(allowed) >= 2:
        assert two_cores.round_trip_ns(rounds=1, trips=1000) > 0


@pytest.mark.parametrize("streamed", [False, True])
def test_fill_writes_every_value(streamed):
    values = two_cores.line_aligned(8 * 5)
    two_cores.fill(values, 2.5, streamed)
    assert values.tolist() == [2.5] * 40


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2 or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two threads on two CPUs")
@pytest.mark.parametrize("kind", sorted(two_cores.EXCHANGE_LABELS))
def test_each_thread_reads_the_buffer_its_kind_names(kind):
    n, rounds = 8 * 16, 6
    buffers = two_cores.line_aligned(2 * n).reshape(2, n)
    times = np.zeros((2, rounds, 2), np.int64)
    totals = np.zeros(2)
    numba.set_num_threads(2)
    assert two_cores.exchange(buffers, times, totals, kind, two_cores.make_sync())
    # the last round wrote rounds - 1 + 1000 x part into each part's buffer
    source = [0, 1] if kind == two_cores.OWN else [1, 0]
    assert totals.tolist() == [n * (rounds - 1 + 1000.0 * source[p]) for p in range(2)]
    assert (times > 0).all()
