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

Then what two threads pay to exchange data, as a step's do (`exchange`):
each thread writes a buffer of its own, and after a barrier reads either
its own or the other's. Where it reads the other's, the next write finds
its lines in the other core's cache too. A step on two threads exchanges
that way its half sums and its updated weights: 84 KB each for the
float64 regression network (21,249 parameters), half that in float32.

Last, the round trip of a cache line between the process's first two CPUs
(`round_trip_ns`): what a barrier, or a value one core wrote and the other
reads, costs. A virtual machine's two CPUs may sit on cores that share a
cache or on distant ones, and the host moves them: on a 2-core AMD EPYC
(Zen 4) guest it was 50-100 ns for minutes, then 330-390 ns, with every
core's arithmetic as fast as ever. Steps on two threads exchange data and
wait at barriers: W1's two threads ran 1.72x one thread's speed at the
short round trip and 1.35x at the long one (docs/performance.md).
"""
import argparse
import ctypes
import functools
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
from fastmlp.balance import cycles  # noqa: E402
from fastmlp.kernels import dense_backward_weight, store_fence, stream_line  # noqa: E402
from fastmlp.sync import START_TIMEOUT_CYCLES, all_started, barrier, make_sync  # noqa: E402

# round_trip_ns: two threads bounce one int64 between them (pass the cache
# line back and forth): side 0 writes 2i + 1 and waits for 2i + 2, which
# side 1 writes once it has seen 2i + 1
ROUND_TRIP_IR = """
define void @kernel(ptr %flag, i64 %trips, i64 %side) {
entry:
  %is_first = icmp eq i64 %side, 0
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %trip_done]
  %base = shl i64 %i, 1
  %first = add i64 %base, 1
  %second = add i64 %base, 2
  br i1 %is_first, label %send, label %await_first
send:
  store atomic i64 %first, ptr %flag release, align 8
  br label %await_second
await_second:
  %seen_second = load atomic i64, ptr %flag acquire, align 8
  %answered = icmp eq i64 %seen_second, %second
  br i1 %answered, label %trip_done, label %await_second
await_first:
  %seen_first = load atomic i64, ptr %flag acquire, align 8
  %asked = icmp eq i64 %seen_first, %first
  br i1 %asked, label %answer, label %await_first
answer:
  store atomic i64 %second, ptr %flag release, align 8
  br label %trip_done
trip_done:
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, %trips
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""
ROUND_TRIPS = 100_000
BOUNCE_TIMEOUT_SECONDS = 60

# buffer sizes of the sums, KB: L1, L2, L3 (a share of it), past L3
SUM_KB = (16, 256, 4096, 65536)
# the MLPClassifier halves stage's gradient: rows, inputs, outputs
ROWS, INPUTS, OUTPUTS = 100, 784, 100
# the buffer each thread writes and the other reads in `exchange`, KB: a
# float64 regression step's half sums, or its updated weights (the
# MLPRegressor((128, 64)) benchmark's 21,249 parameters over two threads)
EXCHANGE_KB = 84
EXCHANGE_TRIES = 5


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


@njit(fastmath=True)
def buffer_total(values):
    # the sum of a float64 buffer (vectorised: fastmath reassociates it)
    total = 0.0
    for i in range(values.shape[0]):
        total += values[i]
    return total


# exchange's kinds: each thread reads its own buffer (OWN) or the other's
# (SHARED), or writes its own by non-temporal stores and reads the other's
# from memory (STREAMED)
OWN, SHARED, STREAMED = range(3)
EXCHANGE_LABELS = {
    OWN: "own buffer",
    SHARED: "the other's (written into lines the other read)",
    STREAMED: "the other's, written by non-temporal stores",
}


def line_aligned(n):
    """n float64 zeros from a multiple of 64 bytes (fill's streamed stores
    need whole lines)."""
    block = np.zeros(n + 8)
    first = (-block.ctypes.data % 64) // 8
    return block[first:first + n]


@njit
def fill(values, value, streamed):
    # values[:] = value, by non-temporal stores if `streamed` (values: whole
    # lines from a multiple of 64 bytes, as line_aligned gives)
    if not streamed:
        values[:] = value
        return
    line = np.full(8, value)  # copied by the kernels' stream_line
    address = values.ctypes.data
    for dst in range(address, address + values.shape[0] * 8, 64):
        # (line read in the loop: alive until its end)
        stream_line(np.uint64(dst), np.uint64(line.ctypes.data))
    store_fence()


@njit
def exchange_part(buffers, times, totals, kind, sync, part):
    # exchange's thread `part`: in each round, fills buffers[part] with the
    # round's number plus 1000 x part (the write, timed in cycles into
    # times[part, round, 0]), waits for the other thread, sums its own
    # buffer (OWN) or the other thread's (times[part, round, 1], the total
    # into totals[part]), and waits again
    if not all_started(sync, 2, START_TIMEOUT_CYCLES):
        return False
    own = buffers[part]
    source = own if kind == OWN else buffers[1 - part]
    for r in range(times.shape[1]):
        started = cycles()
        fill(own, r + 1000.0 * part, kind == STREAMED)
        written = cycles()
        barrier(sync, 2)
        began = cycles()
        totals[part] = buffer_total(source)
        times[part, r, 0] = written - started
        times[part, r, 1] = cycles() - began
        barrier(sync, 2)
    return True


@njit(parallel=True)
def exchange(buffers, times, totals, kind, sync):
    # both threads' exchange_part at once; False if the two did not run on
    # threads of their own (the region then gave up at once)
    done = np.zeros(2, np.bool_)
    for p in prange(2):
        done[p] = exchange_part(buffers, times, totals, kind, sync, np.int64(p))
    return done.all()


def exchange_cycles(kb, kind, rounds):
    """Median cycles of (the write, the read) per round and thread, of
    buffers of kb KB, as `kind` says (EXCHANGE_LABELS); the first quarter
    of the rounds left out (warm-up)."""
    buffers = line_aligned(2 * kb * 128).reshape(2, kb * 128)
    times = np.zeros((2, rounds, 2), np.int64)
    # (a thread that slept long may wake after the region gave up: again)
    if not any(exchange(buffers, times, np.zeros(2), kind, make_sync())
               for _ in range(EXCHANGE_TRIES)):
        raise RuntimeError("the two parts of the exchange did not run at once")
    kept = times[:, rounds // 4:, :].reshape(-1, 2)
    return float(np.median(kept[:, 0])), float(np.median(kept[:, 1]))


@njit
def cycle_count():
    return cycles()


def cycles_per_us():
    """The cycle counter's rate (exchange's unit), against perf_counter."""
    cycle_count()  # (compiled)
    started, first = time.perf_counter(), cycle_count()
    time.sleep(0.05)
    return (cycle_count() - first) / (time.perf_counter() - started) / 1e6


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


@functools.cache
def bounce_kernel():
    """ROUND_TRIP_IR compiled: (its engine, to keep, and the function)."""
    engine, address = core_peaks.compile_kernel(ROUND_TRIP_IR)
    return engine, ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64)(address)


def bounce(trips, cpus):
    """Bounces a cache line `trips` times between two threads pinned to
    `cpus` (two CPU numbers); returns (the seconds side 0 took, the value
    left in the line: 2 x trips when both sides ran every trip)."""
    kernel = bounce_kernel()[1]
    words = np.zeros(16, np.int64)
    line = words[(-words.ctypes.data % 64) // 8:]  # (a cache line of its own)
    seconds = [0.0, 0.0]

    def side(which):
        os.sched_setaffinity(0, {cpus[which]})  # (this thread only)
        started = time.perf_counter()
        kernel(line.ctypes.data, trips, which)  # (ctypes lets the GIL go)
        seconds[which] = time.perf_counter() - started

    # (daemons: a side that never hears back must not keep the process alive)
    threads = [threading.Thread(target=side, args=(which,), daemon=True) for which in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=BOUNCE_TIMEOUT_SECONDS)
        if thread.is_alive():
            raise RuntimeError(f"the cache line stopped bouncing between CPUs {cpus}")
    return seconds[0], int(line[0])


def first_two_cpus():
    """The first two CPUs this process may run on (fewer if it may not)."""
    return sorted(os.sched_getaffinity(0))[:2]


def round_trip_ns(rounds=5, trips=ROUND_TRIPS):
    """Median nanoseconds of a cache line's round trip between the first
    two CPUs this process may run on (bounce), or None with fewer than two."""
    cpus = first_two_cpus()
    if len(cpus) < 2:
        return None
    return statistics.median(bounce(trips, cpus)[0] / trips * 1e9 for _ in range(rounds))


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
    rate = cycles_per_us()
    print(f"exchange of {EXCHANGE_KB} KB a thread, both at once, us: {'write':>8} {'read':>8}")
    for kind in EXCHANGE_LABELS:
        write, read = exchange_cycles(EXCHANGE_KB, kind, 40 * args.rounds)
        print(f"  {EXCHANGE_LABELS[kind]:54} {write / rate:8.1f} {read / rate:8.1f}")
    trip, cpus = round_trip_ns(args.rounds), first_two_cpus()
    print("cache line round trip: fewer than two CPUs" if trip is None else
          f"cache line round trip between CPUs {cpus[0]} and {cpus[1]}: {trip:.0f} ns "
          f"(median of {args.rounds} x {ROUND_TRIPS:,})")


if __name__ == "__main__":
    main()
