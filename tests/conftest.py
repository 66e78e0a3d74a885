import importlib.util
import os

import numpy as np
import pytest

import fastmlp


def load_script(name):
    """scripts/<name>.py, imported as a module of that name."""
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(actual, expected):
    """max |actual - expected| / max(|expected|), the scale of the whole array"""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(actual - expected).max() / scale)


def random_problem(layer_sizes, n, activation, dtype, seed, x_dtype=None, init="xavier"):
    """A model with non-trivial weights and biases, and a batch X, y."""
    rng = np.random.default_rng(seed)
    model = fastmlp.MLP(layer_sizes, activation=activation, dtype=dtype, init=init, seed=seed)
    for b in model.biases:
        b[...] = 0.1 * rng.standard_normal(b.shape)
    if x_dtype == np.uint8:
        X = rng.integers(0, 256, (n, layer_sizes[0]), dtype=np.uint8)
        X[rng.random(X.shape) < 0.3] = 0
    else:
        X = rng.standard_normal((n, layer_sizes[0])).astype(x_dtype or dtype)
    y = rng.integers(0, layer_sizes[-1], n)
    return model, X, y


def finite_differences(model, X, y, eps=1e-6):
    """Central differences of model.evaluate's loss for every parameter, in
    the order of model.weights + model.biases."""
    numeric = []
    for p in model.weights + model.biases:
        for pos in np.ndindex(p.shape):
            saved = p[pos]
            p[pos] = saved + eps
            up = model.evaluate(X, y)[0]
            p[pos] = saved - eps
            down = model.evaluate(X, y)[0]
            p[pos] = saved
            numeric.append((up - down) / (2 * eps))
    return np.array(numeric)


def reference_copy(model):
    """The model's weights and biases as fresh arrays, for the oracle."""
    return [w.copy() for w in model.weights], [b.copy() for b in model.biases]


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
