"""The barriers between the phases of one parallel region (sync.py)."""
import numba
import numpy as np
import pytest
from numba import prange

from fastmlp.sync import (ABORTED, COUNT, GENERATION, START, START_TIMEOUT_CYCLES, all_started,
                          arrive, barrier, make_sync, release, wait)


@numba.njit(parallel=True)
def rounds_in_step(sync, slots, seen, rounds, parts, timeout):
    # each part writes its round into its slot, waits at the barrier, then
    # checks every slot: all parts must be past the round's write
    for p in prange(parts):
        if not all_started(sync, parts, timeout):
            seen[p] = -1
            continue
        for r in range(1, rounds + 1):
            slots[p] = r
            barrier(sync, parts)
            for q in range(parts):
                if slots[q] < r:
                    seen[p] += 1
            barrier(sync, parts)


@numba.njit(parallel=True)
def serial_work(sync, total, rounds, parts):
    # the last part at each barrier adds to total alone
    for p in prange(parts):
        if not all_started(sync, parts, START_TIMEOUT_CYCLES):
            continue
        for r in range(rounds):
            last, generation = arrive(sync, parts)
            if last:
                total[0] += 1
                release(sync, generation)
            else:
                wait(sync, generation)


def test_no_part_passes_a_barrier_before_every_part_reached_it():
    parts = numba.get_num_threads()
    if parts < 2:
        pytest.skip("needs 2 threads")
    sync, slots, seen = make_sync(), np.zeros(parts, np.int64), np.zeros(parts, np.int64)
    rounds_in_step(sync, slots, seen, 20000, parts, START_TIMEOUT_CYCLES)
    assert sync[START] == parts and sync[COUNT] == 0 and sync[GENERATION] == 40000
    assert not seen.any()
    assert (slots == 20000).all()
    total = np.zeros(1, np.int64)
    serial_work(make_sync(), total, 5000, parts)
    assert total[0] == 5000  # once a barrier, never twice


def test_parts_run_in_turn_on_one_thread_give_the_region_up():
    # the first part waits for the second, which cannot start: both return
    # at all_started, having done nothing
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        sync, slots, seen = make_sync(), np.zeros(2, np.int64), np.zeros(2, np.int64)
        rounds_in_step(sync, slots, seen, 10, 2, 100_000)
    finally:
        numba.set_num_threads(threads)
    assert sync[START] == ABORTED
    assert (seen == -1).all() and not slots.any()
