"""Flush-to-zero in the compute threads, and IEEE semantics everywhere else."""
import platform

import numpy as np
import pytest
from numba import njit

import fastmlp
from fastmlp import reference
from fastmlp.fpenv import DENORMALS_ARE_ZERO, FLUSH_TO_ZERO, read_fp_control
from conftest import reference_copy

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="FTZ/DAZ are x86 control bits")


@njit
def fp_control():
    return read_fp_control()


def tiny_problem(dtype):
    # relu pre-activations of 2 * 1e-20 * tiny: subnormal, so flushed to 0
    # by the kernels, where the oracle keeps them positive
    tiny = {np.float32: 1e-20, np.float64: 1e-290}[dtype]
    model = fastmlp.MLP([2, 4, 3], activation="relu", dtype=dtype.__name__, seed=0)
    model.weights[0][...] = tiny
    X = np.full((8, 2), 1e-20, dtype)
    y = np.arange(8) % 3
    return model, X, y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_flush_subnormal_results_to_zero(dtype):
    model, X, y = tiny_problem(dtype)
    weights, biases = reference_copy(model)
    # the oracle (IEEE): relu'(z) = 1 for z subnormal but positive, so the
    # first layer's weights get a non-zero gradient
    _, expected_dweights, _ = reference.loss_and_gradients(weights, biases, X, y, "relu")
    assert np.all(expected_dweights[0] != 0)
    # the kernels: z flushed to 0, relu'(0) = 0, no gradient reaches W1
    _, dweights, _ = model.gradients(X, y)
    np.testing.assert_array_equal(dweights[0], 0)
    # the rest is the oracle's, to rounding
    np.testing.assert_allclose(dweights[1], expected_dweights[1], rtol=1e-5, atol=1e-30)


def test_the_calling_thread_keeps_ieee_subnormals():
    model, X, y = tiny_problem(np.float32)
    before = fp_control()
    model.gradients(X, y)
    fastmlp.fit(model, X, y, epochs=2, batch_size=4, lr=0.1, seed=0)
    model.predict_proba(X)
    assert fp_control() == before
    assert not fp_control() & (FLUSH_TO_ZERO | DENORMALS_ARE_ZERO)
    tiny = np.float32(1e-20)
    assert tiny * tiny > 0  # NumPy on this thread still makes subnormals
