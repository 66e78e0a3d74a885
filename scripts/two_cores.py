"""How much slower each core runs when both cores work at once.

    python scripts/two_cores.py [--rounds 15]

Two threads can make a step at most twice as fast, and only where each
thread runs its share as fast as one thread alone runs it. On a virtual
machine that need not hold: the host's other tenants share each core's
caches and memory path. This script times three kinds of work on one
thread alone and on two threads at once, each thread on buffers of its own
(no data shared, nothing to synchronize), in alternated rounds:

- a register-only loop of float32 FMAs (core_peaks.py's);
- sums of a buffer that stays in L1, in L2, in L3, and one that does not;
- fastmlp's weight-gradient kernel (`kernels.dense_backward_weight`) on the
  shape that `MLPClassifier((100,))` sums on each thread: 100 batch rows of
  784 inputs and 100 outputs.

It prints each one's median rate per thread, alone and together, and the
ratio: the fraction of a second core's speed-up that the host leaves. The
threads are Numba's (`NUMBA_NUM_THREADS` at least 2).
"""
import argparse
import ctypes
import os
import statistics
import sys
import threading
import time

import numba
import numpy as np
from numba import njit, prange

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]  # core_peaks.py; this fastmlp
import core_peaks  # noqa: E402
from fastmlp.kernels import dense_backward_weight  # noqa: E402

# buffer sizes of the sums, KB: L1, L2, L3 (a share of it), past L3
SUM_KB = (16, 256, 4096, 65536)
# the MLPClassifier halves stage's gradient: rows, inputs, outputs
ROWS, INPUTS, OUTPUTS = 100, 784, 100


@njit(fastmath=True)
def buffer_sum(values, passes):
    total = np.float32(0.0)
    for _ in range(passes):
        for i in range(values.shape[0]):
            total += values[i]
    return total


@njit(parallel=True)
def sums(first, second, passes, threads):
    # thread p sums its own buffer; threads 1: only the first
    totals = np.zeros(2, np.float32)
    for p in prange(2):
        if p < threads:
            totals[p] = buffer_sum(first if p == 0 else second, passes)
    return totals


@njit(parallel=True)
def gradients(weights, deltas, inputs, repeats, threads):
    # thread p computes weights[p] = deltas[p].T @ inputs[p], `repeats` times
    for p in prange(2):
        if p < threads:
            for _ in range(repeats):
                dense_backward_weight(weights[p], deltas[p], inputs[p], np.int64(0),
                                      np.int64(OUTPUTS), np.int64(ROWS), np.int64(0),
                                      np.int64(INPUTS))


def fma_rates(rounds):
    """GFLOP/s of one thread of the FMA loop alone, and of each of two at
    once (ctypes calls release the GIL), medians of alternated rounds."""
    features = core_peaks.llvm.get_host_cpu_features()
    lanes = 16 if features.get("avx512f") else 8
    engine, address = core_peaks.compile_kernel(core_peaks.fma_ir(lanes))
    loop = ctypes.CFUNCTYPE(None, ctypes.c_int64)(address)
    per_trip = 2 * lanes * core_peaks.ACCUMULATORS * core_peaks.UNROLL
    trips = 2_000_000
    alone, together = [], []

    def timed(out, index):
        started = time.perf_counter()
        loop(trips)
        out[index] = trips * per_trip / (time.perf_counter() - started) / 1e9

    for _ in range(rounds):
        out = [0.0, 0.0]
        timed(out, 0)
        alone.append(out[0])
        threads = [threading.Thread(target=timed, args=(out, i)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together.append(min(out))
    del engine
    return statistics.median(alone), statistics.median(together)


def alternated(run, amount, rounds):
    """Median rate (amount per second) of run(1) and run(2), alternated;
    run(threads) does `amount` of work on each thread."""
    run(1), run(2)  # compiled, and the buffers warm
    rates = {1: [], 2: []}
    for _ in range(rounds):
        for threads in (1, 2):
            started = time.perf_counter()
            run(threads)
            rates[threads].append(amount / (time.perf_counter() - started))
    return statistics.median(rates[1]), statistics.median(rates[2])


def show(label, unit, alone, together):
    print(f"{label:44} {alone:8.1f} {together:10.1f} {unit:6} {together / alone:6.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if numba.config.NUMBA_NUM_THREADS < 2:
        parser.error("needs 2 threads (NUMBA_NUM_THREADS)")
    numba.set_num_threads(2)
    print(f"LLVM CPU name: {core_peaks.llvm.get_host_cpu_name()}; {args.rounds} rounds, "
          f"medians; rates per thread")
    print(f"{'':44} {'alone':>8} {'together':>10} {'':6} {'ratio':>6}")
    show("float32 FMA loop, registers only", "GF/s", *fma_rates(args.rounds))
    rng = np.random.default_rng(0)
    for kb in SUM_KB:
        values = [np.ones(kb * 256, np.float32) for _ in range(2)]
        passes = max(1, (256 << 20) // (kb << 10))  # 256 MB a run

        def run(threads):
            sums(values[0], values[1], passes, threads)

        show(f"sum of a {kb:,} KB buffer", "GB/s",
             *(rate / 1e9 for rate in alternated(run, passes * (kb << 10), args.rounds)))
    weights = np.zeros((2, OUTPUTS, INPUTS), np.float32)
    deltas = rng.standard_normal((2, ROWS, OUTPUTS)).astype(np.float32)
    inputs = rng.random((2, ROWS, INPUTS), dtype=np.float32)
    repeats = 20

    def run(threads):
        gradients(weights, deltas, inputs, repeats, threads)

    flops = 2.0 * ROWS * INPUTS * OUTPUTS * repeats
    show(f"dense_backward_weight {INPUTS}x{OUTPUTS}, {ROWS} rows", "GF/s",
         *(rate / 1e9 for rate in alternated(run, flops, args.rounds)))


if __name__ == "__main__":
    main()
