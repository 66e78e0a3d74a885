"""The kernels' gradients against central finite differences (float64)."""
import numpy as np
import pytest

from conftest import finite_differences, random_problem


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("sizes", [[3, 4], [4, 5, 3], [3, 4, 5, 3]])
def test_gradients_match_finite_differences(activation, sizes):
    model, X, y = random_problem(sizes, 6, activation, np.float64, seed=len(sizes))
    _, dweights, dbiases = model.gradients(X, y)
    analytic = np.concatenate([d.ravel() for d in dweights + dbiases])
    numeric = finite_differences(model, X, y)
    assert numeric.size == model.n_params
    scale = np.abs(numeric).max()
    assert scale > 1e-3  # the check is not vacuous
    assert np.abs(analytic - numeric).max() < 1e-6 * max(1.0, scale)
