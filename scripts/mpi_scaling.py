"""What distributing over MPI gives: W1 and W3 of the performance workloads
on Fashion-MNIST as 1 rank x 1 thread, 1 rank x 2 threads and 2 ranks x 1
thread, back to back, then a model of the step time on N machines.

    python scripts/mpi_scaling.py [--workloads W1,W3] [--epochs 2] [--rounds 3]
        [--bandwidth-gbit 10] [--latency-us 25]

Each configuration is one `fastmlp-train` process (under mpiexec for 2
ranks) that reports epochs/s of its training loop and, with MPI, the time
per step spent in Allreduce (which includes waiting for the slower rank).
Rounds alternate the configurations, and the table gives medians.

The model: with N machines, a step costs the compute of one machine on a
1/N shard of the batch plus a ring Allreduce of the float32 gradient
(each rank sends and receives 2 (N-1)/N of its bytes, in 2 (N-1) messages):
    step(N) = step(1) / N + 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency
with step(1) measured here with both cores. It is optimistic about compute
(a shard of B/N rows runs less efficiently than B rows) and ignores overlap.
Compute grows with the batch and the Allreduce does not, so the table also
gives the global batch from which N machines beat one.
"""
import argparse
import math
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from workloads import WORKLOADS  # noqa: E402

CONFIGS = [("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2),
           ("2 ranks x 1 thread", 2, 1)]
N_TRAIN = 60000


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else "mpiexec"


def command(workload, ranks, threads, epochs):
    sizes, activation, batch_size, lr = WORKLOADS[workload]
    argv = [sys.executable, "-m", "fastmlp.cli", "--dataset", "fashion-mnist", "--quiet",
            "--hidden", ",".join(map(str, sizes[1:-1])), "--activation", activation,
            "--init", "xavier", "--batch-size", str(batch_size), "--lr", str(lr),
            "--epochs", str(epochs), "--threads", str(threads)]
    if ranks > 1:
        argv = [mpiexec(), "-n", str(ranks)] + argv + ["--distributed"]
    return argv


def measure(workload, ranks, threads, epochs):
    proc = subprocess.run(command(workload, ranks, threads, epochs), capture_output=True,
                          text=True, check=True)
    rate = float(re.search(r"\(([\d.]+) epochs/s in the training loop\)", proc.stdout)[1])
    reduce = re.search(r"Allreduce: (\d+)us per step", proc.stdout)
    return rate, int(reduce[1]) if reduce else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W3")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bandwidth-gbit", type=float, default=10.0)
    parser.add_argument("--latency-us", type=float, default=25.0)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.epochs} epochs a run, medians of {args.rounds} rounds")
    for workload in args.workloads.split(","):
        sizes, _, batch_size, _ = WORKLOADS[workload]
        steps = -(-N_TRAIN // batch_size)
        runs = {name: [] for name, _, _ in CONFIGS}
        for _ in range(args.rounds):
            for name, ranks, threads in CONFIGS:
                runs[name].append(measure(workload, ranks, threads, args.epochs))
        print(f"\n{workload} {'-'.join(map(str, sizes))}, batch {batch_size} ({steps} steps "
              f"an epoch)")
        print(f"{'':<22}{'epochs/s':>10}{'vs 1x1':>8}{'Allreduce/step':>16}")
        base = statistics.median(r for r, _ in runs[CONFIGS[0][0]])
        for name, _, _ in CONFIGS:
            rate = statistics.median(r for r, _ in runs[name])
            reduces = [t for _, t in runs[name] if t is not None]
            reduce = f"{statistics.median(reduces):.0f} us" if reduces else "-"
            print(f"{name:<22}{rate:>10.2f}{rate / base:>7.2f}x{reduce:>16}")
        n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
        grad_bytes = 4 * n_params
        step_one = 1.0 / (statistics.median(r for r, _ in runs[CONFIGS[1][0]]) * steps)
        bandwidth = args.bandwidth_gbit * 1e9 / 8
        print(f"model for N machines ({args.bandwidth_gbit:g} Gbit/s, {args.latency_us:g} us "
              f"a message; {grad_bytes / 1e6:.2f} MB of gradient, one machine "
              f"{step_one * 1e3:.2f} ms a step):")
        print(f"{'N':>4}{'step ms':>10}{'Allreduce ms':>14}{'speed-up':>10}"
              f"{'pays from batch':>17}")
        per_row = step_one / batch_size
        for n in (1, 2, 4, 8, 16, 32):
            reduce = 0.0 if n == 1 else (2 * (n - 1) / n * grad_bytes / bandwidth
                                         + 2 * (n - 1) * args.latency_us * 1e-6)
            step = step_one / n + reduce
            # N machines beat one when the compute they save exceeds the Allreduce
            pays = "-" if n == 1 else f"{math.ceil(reduce / (per_row * (1 - 1 / n))):,}"
            print(f"{n:>4}{step * 1e3:>10.2f}{reduce * 1e3:>14.2f}{step_one / step:>9.2f}x"
                  f"{pays:>17}")


if __name__ == "__main__":
    main()
