"""fit's Keras arguments for rows: validation_split and class_weight, each
equal to the spelled-out form it stands for."""
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_sample_weight

import fastmlp

from conftest import random_problem

SETTINGS = dict(epochs=3, batch_size=16, optimizer="adam", lr=0.01, seed=0)


def problem(dtype=np.float32):
    return random_problem([6, 8, 3], 103, "tanh", dtype, seed=5)


def test_validation_split_holds_out_the_last_rows_as_keras_does():
    model, X, y = problem()
    history = fastmlp.fit(model, X, y, validation_split=0.25, **SETTINGS)
    spelled, _, _ = problem()
    cut = 77  # floor(103 * 0.75), Keras's split
    expected = fastmlp.fit(spelled, X[:cut], y[:cut], validation_data=(X[cut:], y[cut:]),
                           **SETTINGS)
    assert np.array_equal(model.params, spelled.params)
    assert history.history == {**expected.history, "epoch_time": history.history["epoch_time"]}


@pytest.mark.parametrize("class_weight", [{0: 2.0, 2: 0.5}, "balanced"])
def test_class_weight_is_a_weight_per_row(class_weight):
    model, X, y = problem(np.float64)
    given = np.linspace(0.5, 1.5, len(y))
    fastmlp.fit(model, X, y, sample_weight=given, class_weight=class_weight, **SETTINGS)
    if class_weight == "balanced":
        per_row = compute_sample_weight("balanced", y)
    else:
        per_row = np.array([class_weight.get(label, 1.0) for label in y])
    spelled, _, _ = problem(np.float64)
    fastmlp.fit(spelled, X, y, sample_weight=given * per_row, **SETTINGS)
    assert np.array_equal(model.params, spelled.params)
    unweighted, _, _ = problem(np.float64)
    fastmlp.fit(unweighted, X, y, sample_weight=given, **SETTINGS)
    assert not np.array_equal(model.params, unweighted.params)


@pytest.mark.parametrize("kwargs,message", [
    (dict(validation_split=1.0), "validation_split must be < 1"),
    (dict(validation_split=-0.1), "validation_split must be >= 0"),
    (dict(validation_split=0.2, validation_data="x"), "validation_data or validation_split"),
    (dict(validation_split=0.995), "leaves no rows to train on"),
    (dict(class_weight={3: 1.0}), r"class_weight has label 3; the model's labels are 0..2"),
    (dict(class_weight={0: -1.0}), r"class_weight\[0\] must be >= 0"),
    (dict(class_weight=[1.0, 2.0, 3.0]), "must be a dict {label: weight} or 'balanced'"),
    (dict(class_weight="even"), "unknown class_weight 'even'"),
    (dict(class_weight={0: 0, 1: 0, 2: 0}), "the training rows' weights sum to zero"),
])
def test_bad_row_arguments_are_named(kwargs, message):
    model, X, y = problem()
    with pytest.raises(ValueError, match=message):
        fastmlp.fit(model, X, y, epochs=1, **kwargs)


def test_class_weight_needs_classes():
    model = fastmlp.MLP([3, 1], output="linear")
    with pytest.raises(ValueError, match="class_weight weighs classes: this model's output is "
                                         "linear"):
        fastmlp.fit(model, np.zeros((4, 3)), np.zeros(4), class_weight={0: 1.0})


def test_balanced_weights_come_from_the_rows_trained_on():
    model, X, y = problem(np.float64)
    y = np.where(np.arange(len(y)) < 80, y, 0)  # the held-out rows are all class 0
    fastmlp.fit(model, X, y, validation_split=0.2, class_weight="balanced", **SETTINGS)
    spelled, _, _ = problem(np.float64)
    cut = 82  # floor(103 * 0.8)
    fastmlp.fit(spelled, X[:cut], y[:cut], validation_data=(X[cut:], y[cut:]),
                sample_weight=compute_sample_weight("balanced", y[:cut]), **SETTINGS)
    assert np.array_equal(model.params, spelled.params)
