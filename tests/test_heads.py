"""The output heads beyond softmax (regression, multi-label, Poisson): gradients
against finite differences and the oracle, training trajectories, targets,
scores, predictions and model files."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, mean_poisson_deviance, r2_score

import fastmlp
from fastmlp import reference

from conftest import finite_differences, reference_copy, relative_error
from test_training import OPTIMIZER_CASES, batches_in_order


def head_problem(output, sizes, n, activation, dtype, seed, flat=False):
    """A model with non-trivial parameters and fitting targets for its head."""
    rng = np.random.default_rng(seed)
    model = fastmlp.MLP(sizes, activation=activation, dtype=dtype, init="xavier", seed=seed,
                        output=output)
    for b in model.biases:
        b[...] = 0.1 * rng.standard_normal(b.shape)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    K = sizes[-1]
    if output == "linear":
        y = X[:, :1] * np.arange(1, K + 1) + 0.5 * rng.standard_normal((n, K))
    elif output == "poisson":  # counts of mean exp(x0 / 2 + k / 4), zeros among them
        y = rng.poisson(np.exp(X[:, :1] / 2 + np.arange(K) / 4)).astype(np.float64)
    else:
        y = (X[:, :1] + rng.standard_normal((n, K)) > 0).astype(np.int64)
    return model, X, (y[:, 0] if flat else y)


@pytest.mark.parametrize("output", ["linear", "sigmoid", "poisson"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("sizes", [[3, 2], [4, 5, 3], [3, 4, 5, 1]])
def test_gradients_match_finite_differences(output, activation, sizes):
    model, X, y = head_problem(output, sizes, 7, activation, np.float64, seed=len(sizes))
    _, dweights, dbiases = model.gradients(X, y)
    analytic = np.concatenate([d.ravel() for d in dweights + dbiases])
    numeric = finite_differences(model, X, y)
    scale = np.abs(numeric).max()
    assert scale > 1e-3  # the check is not vacuous
    assert np.abs(analytic - numeric).max() < 1e-6 * max(1.0, scale)


@pytest.mark.parametrize("output", ["softmax", "linear", "sigmoid", "poisson"])
def test_gradients_equal_the_oracle(output):
    model, X, y = head_problem("linear" if output == "softmax" else output, [6, 9, 4], 30,
                               "tanh", np.float64, seed=5)
    if output == "softmax":
        model = fastmlp.MLP([6, 9, 4], activation="tanh", dtype="float64", init="xavier", seed=5)
        y = np.random.default_rng(0).integers(0, 4, 30)
    weights = np.random.default_rng(1).uniform(0.1, 2, 30)
    loss, dweights, dbiases = model.gradients(X, y, sample_weight=weights)
    w, b = reference_copy(model)
    want_loss, want_dw, want_db = reference.loss_and_gradients(w, b, X, y, "tanh", weights, output)
    assert abs(loss - want_loss) < 1e-12 * abs(want_loss)
    for got, want in zip(dweights + dbiases, want_dw + want_db):
        assert relative_error(got, want) < 1e-12


@pytest.mark.parametrize("output", ["linear", "sigmoid", "poisson"])
@pytest.mark.parametrize("optimizer,options", [OPTIMIZER_CASES[1], OPTIMIZER_CASES[3],
                                               OPTIMIZER_CASES[4]])
def test_fifty_steps_follow_the_oracle(output, optimizer, options):
    n, batch_size = 49 * 16 + 9, 16
    model, X, y = head_problem(output, [12, 10, 7, 3], n, "relu", np.float64, seed=7)
    start = reference_copy(model)
    weights, biases = reference_copy(model)
    history = fastmlp.fit(model, X, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                          shuffle=False, **options)
    losses = reference.train(weights, biases, X, y, "relu", batches_in_order(n, batch_size),
                             optimizer=optimizer, output=output, **options)
    assert len(losses) == 50
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9
    sizes = [len(b) for b in batches_in_order(n, batch_size)]
    expected_loss = np.dot(losses, sizes) / n
    assert abs(history.history["loss"][0] - expected_loss) < 1e-9 * expected_loss
    assert relative_error(model.weights[0], start[0][0]) > 1e-3  # it trained


# A batch of more than 128 rows is summed in two halves (gradients.gradient_cut):
# apart, in a region of their own, for a network of 16 KB of parameters or
# more (64-40-30-5 and 64-41-1 in float64), else by each task. Layers of 1,
# 5, 30 and 41 outputs, not whole 4-row groups; the last batch, 150 rows,
# is cut too.
@pytest.mark.parametrize("sizes", [[64, 40, 30, 5], [64, 41, 1], [12, 10, 7, 3]])
@pytest.mark.parametrize("output", ["sigmoid", "linear"])
def test_batches_summed_in_halves_follow_the_oracle(sizes, output):
    n, batch_size = 19 * 200 + 150, 200
    model, X, y = head_problem(output, sizes, n, "relu", np.float64, seed=3)
    weights, biases = reference_copy(model)
    fastmlp.fit(model, X, y, epochs=1, batch_size=batch_size, optimizer="adam", lr=0.003,
                shuffle=False)
    losses = reference.train(weights, biases, X, y, "relu", batches_in_order(n, batch_size),
                             optimizer="adam", output=output, lr=0.003)
    assert len(losses) == 20
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9


def test_scores_are_sklearns():
    model, X, y = head_problem("linear", [5, 8, 3], 200, "tanh", np.float64, seed=1)
    fastmlp.fit(model, X, y, epochs=5, batch_size=20, optimizer="adam", lr=0.01)
    loss, r2 = model.evaluate(X, y)
    prediction = model.predict(X)
    assert prediction.shape == (200, 3)
    assert abs(r2 - r2_score(y, prediction)) < 1e-12
    assert abs(loss - np.mean((prediction - y) ** 2)) < 1e-12
    model, X, y = head_problem("sigmoid", [5, 8, 3], 200, "tanh", np.float64, seed=1)
    fastmlp.fit(model, X, y, epochs=5, batch_size=20, optimizer="adam", lr=0.01)
    loss, subset_accuracy = model.evaluate(X, y)
    assert set(np.unique(model.predict(X))) <= {0, 1}
    assert subset_accuracy == accuracy_score(y, model.predict(X)) > 0.3
    proba = model.predict_proba(X)
    expected = -np.mean(y * np.log(proba) + (1 - y) * np.log(1 - proba))
    assert abs(loss - expected) < 1e-9
    model, X, y = head_problem("poisson", [5, 8, 2], 200, "tanh", np.float64, seed=1)
    fastmlp.fit(model, X, y, epochs=5, batch_size=20, optimizer="adam", lr=0.01)
    loss, r2 = model.evaluate(X, y)
    mean = model.predict(X)
    assert mean.shape == (200, 2) and mean.min() > 0
    assert abs(r2 - r2_score(y, mean)) < 1e-12 and r2 > 0.1
    # half the Poisson deviance, averaged over outputs
    assert abs(loss - mean_poisson_deviance(y.ravel(), mean.ravel()) / 2) < 1e-12


def test_history_and_early_stopping_use_the_heads_metric():
    model, X, y = head_problem("linear", [5, 8, 1], 200, "relu", np.float64, seed=2, flat=True)
    history = fastmlp.fit(model, X, y, epochs=4, batch_size=20, optimizer="adam", lr=0.01,
                          validation_data=(X[:50], y[:50]), patience=2, monitor="val_r2",
                          restore_best_weights=False, seed=0)
    assert set(history.history) == {"loss", "r2", "val_loss", "val_r2", "epoch_time", "lr"}
    assert history.history["val_r2"][-1] == pytest.approx(model.evaluate(X[:50], y[:50])[1])
    assert model.predict(X).shape == (200,)  # as y came
    with pytest.raises(ValueError, match="unknown monitor 'val_accuracy'"):
        fastmlp.fit(model, X, y, validation_data=(X, y), patience=1, monitor="val_accuracy")


@pytest.mark.parametrize("output,y,message", [
    ("linear", np.full((10, 2), np.nan), "y contains NaN or inf"),
    ("linear", np.ones((10, 3)), r"shape \(10, 2\)"),
    ("linear", np.array(["a"] * 10), "real numbers"),
    ("linear", np.ones(9), r"shape \(10, 2\)"),
    ("sigmoid", np.full((10, 2), 0.5), "0/1 indicator matrix for the sigmoid output; it holds 0.5$"),
    ("sigmoid", np.full((10, 2), np.inf), "NaN or inf"),
    ("poisson", np.full((10, 2), -1.0), "must be >= 0 for the poisson output .* holds -1.0$"),
])
def test_bad_targets_are_named(output, y, message):
    model = fastmlp.MLP([3, 2], output=output)
    with pytest.raises(ValueError, match=message):
        fastmlp.fit(model, np.zeros((10, 3)), y)


def test_linear_has_no_probabilities_and_one_output_is_allowed():
    with pytest.raises(ValueError, match="no probabilities"):
        fastmlp.MLP([3, 1], output="linear").predict_proba(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fastmlp.MLP([3, 1])
    with pytest.raises(ValueError, match="no probabilities"):
        fastmlp.MLP([3, 1], output="poisson").predict_proba(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown output"):
        fastmlp.MLP([3, 2], output="gamma")


@pytest.mark.parametrize("output", ["linear", "sigmoid", "poisson"])
def test_model_files_keep_the_head(tmp_path, output):
    sizes = [5, 6, 2 if output == "sigmoid" else 1]
    model, X, y = head_problem(output, sizes, 50, "tanh", np.float32, seed=3,
                               flat=output != "sigmoid")
    fastmlp.fit(model, X, y, epochs=1, batch_size=10, optimizer="adam")
    model.save(tmp_path / "m.safetensors")
    loaded = fastmlp.load(tmp_path / "m.safetensors")
    assert loaded.output == output and loaded.flat_targets == model.flat_targets
    assert np.array_equal(loaded.predict(X), model.predict(X))
