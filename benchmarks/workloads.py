"""The performance workloads, shared by benchmarks/ and scripts/compare.py.
One epoch = one pass over the 60,000 Fashion-MNIST training rows."""
import numpy as np

WORKLOADS = {
    # name: (layer sizes, hidden activation, batch size, SGD learning rate)
    "W1": ([784, 50, 10], "sigmoid", 100, 0.1),
    "W2": ([784, 50, 10], "sigmoid", 32, 0.1),
    "W3": ([784, 512, 512, 10], "relu", 128, 0.01),
}


def flops_per_epoch(layer_sizes, n_rows=60000):
    """Multiply-adds x 2 of an SGD epoch: forward and weight gradient for
    every layer, input gradient for every layer but the first."""
    total = 0
    for l, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
        total += (3 if l > 0 else 2) * 2 * fan_in * fan_out
    return total * n_rows


def sgemm_gflops(size=1024, repeats=10):
    """float32 matrix product rate of NumPy's BLAS on this machine, median."""
    import time
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.dot(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.dot(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / np.median(times) / 1e9
