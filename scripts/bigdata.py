"""Training from data larger than memory: a memory-mapped uint8 dataset.

    python scripts/bigdata.py [--gigabytes 4.3] [--dir /tmp/fastmlp-big] [--epochs 1]

Writes Fashion-MNIST's training rows tiled with noise (each copy of a row
gets its own pixel noise, labels kept) to a .npy file of the given size, in
blocks so that writing needs little memory, then trains the lesson's network
on it through numpy's memory map in a child process and reports the data
size, that process's peak RSS, the epoch time and the test accuracy.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from fastmlp import datasets

ROW_BYTES = 784
BLOCK_ROWS = 60000


def write(directory, gigabytes, seed=0):
    x_train, y_train, x_test, y_test = datasets.load("fashion-mnist", download=False)
    n = int(gigabytes * 1e9) // ROW_BYTES
    os.makedirs(directory, exist_ok=True)
    x = np.lib.format.open_memmap(os.path.join(directory, "x_train.npy"), mode="w+",
                                  dtype=np.uint8, shape=(n, ROW_BYTES))
    y = np.lib.format.open_memmap(os.path.join(directory, "y_train.npy"), mode="w+",
                                  dtype=np.uint8, shape=(n,))
    rng = np.random.default_rng(seed)
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        rows = np.arange(start, stop) % len(x_train)
        noise = rng.integers(-8, 9, (stop - start, ROW_BYTES), dtype=np.int16)
        x[start:stop] = np.clip(x_train[rows].astype(np.int16) + noise, 0, 255).astype(np.uint8)
        y[start:stop] = y_train[rows]
        x.flush()
    del x, y
    np.save(os.path.join(directory, "x_test.npy"), x_test)
    np.save(os.path.join(directory, "y_test.npy"), y_test)
    # data larger than memory is not in the page cache when training starts
    datasets.drop_cached(os.path.join(directory, "x_train.npy"))


def train(directory, epochs):
    import fastmlp
    x_train, y_train, x_test, y_test = datasets.load_npy(directory)
    model = fastmlp.MLP([784, 50, 10], seed=0)
    history = fastmlp.fit(model, x_train, y_train, epochs=epochs, batch_size=100,
                          lr=0.1, seed=0)
    loss, accuracy = model.evaluate(x_test, y_test)
    print(json.dumps({"rows": int(x_train.shape[0]), "data_bytes": int(x_train.nbytes),
                      "peak_rss_bytes": peak_rss(), "epoch_seconds": history.history["epoch_time"],
                      "test_accuracy": accuracy}))


def peak_rss():
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss:
    a child process inherits its parent's peak there, and the parent that
    wrote the data had all of it resident."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=4.3)
    parser.add_argument("--dir", default="/tmp/fastmlp-big")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_only:
        train(args.dir, args.epochs)
        return 0
    started = time.perf_counter()
    write(args.dir, args.gigabytes)
    print(f"wrote {args.gigabytes} GB to {args.dir} in {time.perf_counter() - started:.0f}s", flush=True)
    out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--epochs", str(args.epochs),
                          "--train-only"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"rows {result['rows']:,}, data {result['data_bytes'] / 1e9:.2f} GB, peak RSS of the "
          f"training process {result['peak_rss_bytes'] / 1e6:.0f} MB, epoch "
          f"{result['epoch_seconds'][0]:.1f}s, test accuracy {result['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
