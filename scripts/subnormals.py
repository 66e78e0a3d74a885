"""Step time at learning rates that make subnormal floats, against the default.

    python scripts/subnormals.py [--rounds 3] [--lrs 0.1,10,100] [--threads 1,2]

Trains the lesson's network (784-50-10 sigmoid, SGD, batch 100) on
Fashion-MNIST for one epoch at each learning rate, float32 and float64, the
rates interleaved in each round so that a noisy minute hits them all. A
large rate saturates the sigmoids and drives deltas towards zero: without
flush-to-zero, many of them become subnormal and cost a microcode assist
each on most x86 cores. Prints the median time per step and its ratio to
the first rate's.
"""
import argparse
import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastmlp  # noqa: E402
from fastmlp.datasets import DEBIAN_FASHION_MNIST, load_directory  # noqa: E402


def step_time(x, y, dtype, lr):
    model = fastmlp.MLP([784, 50, 10], activation="sigmoid", dtype=dtype, seed=0)
    history = fastmlp.fit(model, x, y, epochs=1, batch_size=100, lr=lr, seed=0)
    steps = -(-len(x) // 100)
    return history.history["epoch_time"][0] / steps, history.history["loss"][0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lrs", default="0.1,10,100", help="the first is the baseline")
    parser.add_argument("--threads", default=str(numba.get_num_threads()),
                        help="comma-separated thread counts")
    args = parser.parse_args(argv)
    lrs = [float(v) for v in args.lrs.split(",")]
    x, y, _, _ = load_directory(DEBIAN_FASHION_MNIST)
    for threads in (int(t) for t in args.threads.split(",")):
        numba.set_num_threads(threads)
        for dtype in ("float32", "float64"):
            step_time(x[:200], y[:200], dtype, lrs[0])  # compile, or load the cache
            times = {lr: [] for lr in lrs}
            losses = {}
            for _ in range(args.rounds):
                for lr in lrs:
                    seconds, losses[lr] = step_time(x, y, dtype, lr)
                    times[lr].append(seconds)
            base = np.median(times[lrs[0]])
            for lr in lrs:
                median = np.median(times[lr])
                print(f"{threads} thread(s) {dtype} lr {lr:<6g} {median * 1e6:8.1f} us/step "
                      f"{median / base:5.2f}x  (epoch loss {losses[lr]:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
