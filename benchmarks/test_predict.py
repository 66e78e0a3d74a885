"""Latency of predicting a few rows at a time, as a service or a loop over
incoming rows does: fastmlp's model and estimator, and scikit-learn's
estimator on the same network. Run: python -m pytest benchmarks/ --benchmark-only"""
import numpy as np
import pytest

import fastmlp

from workloads import WORKLOADS


@pytest.mark.parametrize("rows", [1, 100])
def test_model_predict(benchmark, fashion_mnist, rows):
    x_train = fashion_mnist[0]
    sizes, activation, _, _ = WORKLOADS["W1"]
    model = fastmlp.MLP(sizes, activation=activation, seed=0)
    x = x_train[:rows]
    model.predict(x)  # compiled or loaded
    benchmark.group = f"predict, {rows} row(s)"
    labels = benchmark(model.predict, x)
    assert labels.shape == (rows,)


@pytest.mark.parametrize("library", ["fastmlp", "sklearn"])
@pytest.mark.parametrize("rows", [1, 100])
def test_estimator_predict(benchmark, fashion_mnist, library, rows):
    """MLPClassifier((100,)) fitted on 2,000 rows, predicting float32 rows."""
    if library == "sklearn":
        from sklearn.neural_network import MLPClassifier
    else:
        from fastmlp import MLPClassifier
    x_train, y_train = fashion_mnist[0][:2000] / np.float32(255), fashion_mnist[1][:2000]
    clf = MLPClassifier(hidden_layer_sizes=(100,), max_iter=2, random_state=0)
    with pytest.warns(Warning):  # not converged in 2 epochs
        clf.fit(x_train.astype(np.float32), y_train)
    x = x_train[:rows].astype(np.float32)
    benchmark.group = f"MLPClassifier.predict, {rows} row(s)"
    labels = benchmark(clf.predict, x)
    assert labels.shape == (rows,)
