"""Epochs per second of the workloads, and a single step, for fastmlp and the
NumPy oracle. Run: python -m pytest benchmarks/ --benchmark-only
(epochs/s = 1 / the reported time per round)."""
import numpy as np
import pytest

import fastmlp
from fastmlp import reference

from workloads import WORKLOADS


def fitted_model(name):
    sizes, activation, _, _ = WORKLOADS[name]
    return fastmlp.MLP(sizes, activation=activation, init="xavier", seed=0)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_fastmlp_epoch(benchmark, fashion_mnist, name):
    x_train, y_train, _, _ = fashion_mnist
    _, _, batch_size, lr = WORKLOADS[name]
    model = fitted_model(name)
    fastmlp.fit(model, x_train[:batch_size], y_train[:batch_size], lr=lr)  # compile
    benchmark.pedantic(fastmlp.fit, args=(model, x_train, y_train),
                       kwargs=dict(batch_size=batch_size, lr=lr, seed=0), rounds=5)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["epochs_per_second"] = 1 / benchmark.stats.stats.median


@pytest.mark.parametrize("name", ["W1"])
def test_fastmlp_step(benchmark, fashion_mnist, name):
    x_train, y_train, _, _ = fashion_mnist
    _, _, batch_size, lr = WORKLOADS[name]
    model = fitted_model(name)
    X, y = x_train[:batch_size], y_train[:batch_size]
    fastmlp.fit(model, X, y, lr=lr)
    # one step, plus fit's fixed cost (validation, workspace): an upper bound
    benchmark(fastmlp.fit, model, X, y, batch_size=batch_size, lr=lr, shuffle=False)


def test_reference_epoch_w1(benchmark, fashion_mnist):
    """The NumPy oracle (the lesson's code) on W1, for contrast."""
    x_train, y_train, _, _ = fashion_mnist
    sizes, activation, batch_size, lr = WORKLOADS["W1"]
    model = fitted_model("W1")
    weights = [w.copy() for w in model.weights]
    biases = [b.copy() for b in model.biases]
    batches = [np.arange(s, s + batch_size) for s in range(0, 60000, batch_size)]
    benchmark.pedantic(reference.train, args=(weights, biases, x_train, y_train, activation, batches),
                       kwargs=dict(lr=lr), rounds=2)
