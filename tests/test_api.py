"""The public API: parameter views, initialisation, prediction, and clear
ValueErrors for bad input."""
import pickle
import re

import numpy as np
import pytest

import fastmlp
from fastmlp.tasks import make_tasks

from conftest import random_problem


def test_params_is_one_flat_vector_with_writable_views():
    model = fastmlp.MLP([784, 50, 10], seed=0)
    assert model.params.ndim == 1 and model.params.flags.c_contiguous
    assert model.n_params == 39760 == model.params.size
    assert [w.shape for w in model.weights] == [(784, 50), (50, 10)]
    assert [b.shape for b in model.biases] == [(50,), (10,)]
    for view in model.weights + model.biases:
        assert np.shares_memory(view, model.params)
    model.weights[1][3, 7] = 42.0
    model.biases[0][5] = -3.0
    assert (model.params == 42.0).sum() == 1 and (model.params == -3.0).sum() == 1
    # and the kernels see the change
    X = np.zeros((1, 784), np.float32)
    before = model.predict_proba(X)
    model.biases[1][:] = [100.0] + [0.0] * 9
    assert model.predict(X)[0] == 0 and not np.allclose(before, model.predict_proba(X))


def test_predict_reuses_a_small_workspace_and_answers_as_a_new_one_would():
    model, X, y = random_problem([6, 5, 4], 50, "relu", np.float32, seed=0)
    first = model.predict_proba(X[:7])
    kept = model._idle_workspace
    assert np.array_equal(model.predict_proba(X[:7]), first) and model._idle_workspace is kept
    assert np.array_equal(model.predict_proba(X[:3]), first[:3])  # a workspace of 3 rows
    assert model._idle_workspace is not kept
    model.weights[0][:] *= 2  # in place: the next call reads the new weights
    changed = model.predict_proba(X[:7])
    assert not np.allclose(changed, first)
    state = model.__getstate__()
    assert "_idle_workspace" not in state and "_layout_views" not in state
    assert np.array_equal(pickle.loads(pickle.dumps(model)).predict_proba(X[:7]), changed)
    loss, accuracy = model.evaluate(X, y)
    assert accuracy == np.mean(model.predict(X) == y)
    wide = fastmlp.MLP([784, 512, 10], seed=0)
    wide.predict(np.zeros((1024, 784), np.float32))  # a workspace of 8 MB is not kept
    assert "_idle_workspace" not in vars(wide)


def test_lesson_initialisation():
    model = fastmlp.MLP([784, 50, 10], seed=0)
    assert model.dtype == np.float32
    assert all((b == 0).all() for b in model.biases)
    w = model.weights[0]
    assert abs(w.std() - 0.01) < 0.0005 and abs(w.mean()) < 0.0005
    same = fastmlp.MLP([784, 50, 10], seed=0)
    assert np.array_equal(model.params, same.params)
    assert not np.array_equal(model.params, fastmlp.MLP([784, 50, 10], seed=1).params)


def test_xavier_and_he_initialisation():
    xavier = fastmlp.MLP([400, 300, 10], init="xavier", seed=0, dtype="float64")
    limit = np.sqrt(6 / 700)
    assert np.abs(xavier.weights[0]).max() <= limit
    assert abs(xavier.weights[0].std() - limit / np.sqrt(3)) < 0.01 * limit
    he = fastmlp.MLP([400, 300, 10], init="he", seed=0)
    assert abs(he.weights[0].std() - np.sqrt(2 / 400)) < 0.02 * np.sqrt(2 / 400)


def test_predict_evaluate_shapes_and_consistency():
    model, X, y = random_problem([6, 5, 4], 2500, "relu", np.float32, seed=0)  # > one predict batch
    probs = model.predict_proba(X)
    assert probs.shape == (2500, 4) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(model.predict(X), probs.argmax(axis=1))
    loss, accuracy = model.evaluate(X, y)
    assert type(loss) is float and type(accuracy) is float  # as Keras's, not NumPy scalars
    assert accuracy == np.mean(model.predict(X) == y)
    assert abs(loss + np.mean(np.log(probs[np.arange(2500), y]))) < 1e-5
    assert "MLP([6, 5, 4]" in repr(model)


def test_a_model_pickled_with_another_layout_trains_as_a_new_one():
    """A pickle keeps the layout of the transposed weights, and an earlier
    one the task list too; an earlier fastmlp laid them out otherwise (it
    kept wide layers' weights transposed), so unpickling lays them out
    anew, and drops the task list (each workspace makes its own)."""
    model, X, y = random_problem([20, 300, 70, 3], 64, "relu", np.float32, seed=3)
    state = model.__getstate__()
    assert "_tasks" not in state and not hasattr(model, "_tasks")
    # as before: the 300-output layer's first 256 outputs kept transposed too
    state["_wt_off"] = np.array([0, 20 * 256, 20 * 256 + 300 * 64])
    state["_tasks"] = make_tasks(model.layer_sizes)[::-1].copy()
    old = fastmlp.MLP.__new__(fastmlp.MLP)
    old.__setstate__(state)
    fresh = pickle.loads(pickle.dumps(model))
    assert np.array_equal(old._wt_off, fresh._wt_off) and not hasattr(old, "_tasks")
    for m in (old, fresh):
        fastmlp.fit(m, X, y, epochs=2, batch_size=16, optimizer="adam", lr=0.01, seed=0)
    assert np.array_equal(old.params, fresh.params)
    assert not np.array_equal(fresh.params, model.params)


def test_inputs_of_every_accepted_kind_give_the_same_answer():
    model, X, y = random_problem([5, 4, 3], 20, "tanh", np.float64, seed=1)
    expected = model.predict_proba(X)
    for variant in (X.tolist(), np.asfortranarray(X), X[:, ::-1][:, ::-1], X.astype(">f8"),
                    np.repeat(X, 2, axis=0)[::2]):
        assert np.allclose(model.predict_proba(variant), expected, rtol=1e-12, atol=0)
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5), dtype=np.uint8)
    assert np.allclose(model.predict_proba(pixels), model.predict_proba(pixels / 255.0), rtol=1e-12)


GOOD = dict(X=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]))


@pytest.mark.parametrize("change,message", [
    (dict(X=np.zeros((4, 5))), "has 5 features but the model expects 3"),
    (dict(X=np.zeros((0, 3)), y=np.zeros(0, int)), "empty"),
    (dict(X=np.zeros(3)), "must be 2-D"),
    (dict(X=np.array([[0, 0, np.nan]] * 4)), "NaN or inf"),
    (dict(X=np.array([[0, np.inf, 0]] * 4)), "NaN or inf"),
    (dict(X=np.array([["a", "b", "c"]] * 4)), "must hold numbers"),
    (dict(y=np.array([0, 1, 2, 0])), "label 2 outside 0..1"),
    (dict(y=np.array([0, -1, 0, 0])), "label -1 outside"),
    (dict(y=np.array([0, 1.5, 0, 1])), "non-integer"),
    (dict(y=np.array(["a", "b", "a", "b"])), "integer class labels, got dtype <U1; "
     "np.unique(y, return_inverse=True) numbers text labels"),
    (dict(y=np.array([True, False, True, False])), "integer class labels, got dtype bool"),
    (dict(y=np.array([0, 1, 0])), "4 samples but y has 3 labels"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
    (dict(sampling="bootstrap"), "unknown sampling"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(momentum=1.5), "momentum must be <= 1"),
    (dict(epochs=-1), "epochs must be >= 0"),
    (dict(threads=0), "threads must be >= 1"),
    (dict(threads=10**6), "threads must be <="),
    (dict(validation_data=(np.zeros((2, 4)), [0, 1])), "validation X has 4 features"),
])
def test_fit_rejects_bad_input_with_a_clear_message(change, message):
    model = fastmlp.MLP([3, 2], seed=0)
    args = {**GOOD, **change}
    X, y = args.pop("X"), args.pop("y")
    with pytest.raises(ValueError, match=re.escape(message)):
        fastmlp.fit(model, X, y, **args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(layer_sizes=[3]), "at least an input and an output"),
    (dict(layer_sizes=[3, 0, 2]), "must be >= 1"),
    (dict(layer_sizes=[3, 1]), "at least 2 classes"),
    (dict(layer_sizes=5), "sequence of integers"),
    (dict(activation="softplus"), "unknown activation 'softplus'"),
    (dict(activation=["relu"]), r"unknown activation \['relu'\]"),
    (dict(dtype="float16"), "dtype must be 'float32', 'float64' or 'bfloat16'"),
    (dict(init="orthogonal"), "unknown init"),
])
def test_model_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastmlp.MLP(**{"layer_sizes": [3, 2], **kwargs})


def test_callbacks_without_fastmlps_methods_are_refused_by_name():
    class KerasStyle:
        def on_epoch_end(self, epoch, logs=None):
            pass

    model = fastmlp.MLP([3, 2], seed=0)
    for callback, missing in ((KerasStyle(), "on_compile_begin, on_train_begin, "
                                             "on_epoch_begin, on_steps ("),
                              (print, "on_compile_begin, on_train_begin, on_epoch_begin, "
                                      "on_steps, on_epoch_end (")):
        with pytest.raises(TypeError, match="callbacks must be fastmlp.progress.Callback") as info:
            fastmlp.fit(model, np.zeros((4, 3)), [0, 1, 0, 1], callbacks=[callback])
        assert f" has no {missing}" in str(info.value)
    assert model.training_state is None  # refused before training


def test_saving_into_a_missing_directory_names_the_file(tmp_path):
    target = tmp_path / "missing" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=f"no directory .* to write into: '{target}'"):
        fastmlp.MLP([3, 2], seed=0).save(target)
    assert not (tmp_path / "missing").exists()


def test_predict_and_gradients_validate_too():
    model = fastmlp.MLP([3, 2], seed=0)
    with pytest.raises(ValueError, match="features"):
        model.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="outside"):
        model.gradients(np.zeros((2, 3)), [0, 5])
    with pytest.raises(ValueError, match="outside"):
        model.evaluate(np.zeros((2, 3)), [0, 5])


def test_labels_as_a_column_or_one_hot_rows_train_alike():
    """Keras's lesson gives softmax targets as to_categorical's one-hot rows."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = rng.integers(0, 3, 120)
    trained = []
    for targets in (y, y[:, None], np.eye(3)[y], np.eye(3, dtype=bool)[y]):
        model = fastmlp.MLP([4, 5, 3], seed=0)
        fastmlp.fit(model, X, targets, epochs=2, batch_size=16, seed=0,
                    validation_data=(X[:10], targets[:10]))
        assert model.evaluate(X, targets) == model.evaluate(X, y)
        trained.append(model.params)
    assert all(np.array_equal(trained[0], params) for params in trained[1:])
    model = fastmlp.MLP([4, 5, 3], seed=0)
    soft = np.eye(3)[y]
    soft[5] = [0.1, 0.9, 0.0]
    with pytest.raises(ValueError, match=r"y has 3 columns, so it must be one-hot: a single 1 "
                       r"per row, the rest 0 \(soft labels are not supported\); row 5 is "
                       r"\[0.1, 0.9, 0.0\]"):
        fastmlp.fit(model, X, soft)
    with pytest.raises(ValueError, match=r"one label per sample, shape \(n,\), or one-hot "
                       r"rows, shape \(n, 3\); got shape \(120, 2\)"):
        fastmlp.fit(model, X, np.eye(2)[y % 2])


def test_the_fit_method_is_fastmlp_fit():
    X, y = np.random.default_rng(0).normal(size=(60, 3)), np.arange(60) % 2
    by_function, by_method = (fastmlp.MLP([3, 4, 2], seed=0) for _ in range(2))
    expected = fastmlp.fit(by_function, X, y, epochs=2, batch_size=8, optimizer="adam", seed=1)
    history = by_method.fit(X, y, epochs=2, batch_size=8, optimizer="adam", seed=1)
    assert np.array_equal(by_method.params, by_function.params)
    assert history.history == {**expected.history, "epoch_time": history.history["epoch_time"]}
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        by_method.fit(X, y, epoch=2)


def test_summary_lists_the_layers_as_keras_does():
    model = fastmlp.MLP([20, 64, 32, 3], activation="relu", dtype="float64")
    assert model.summary() == (
        'Model: "20-64-32-3" (float64)\n'
        "Layer (activation)      Output Shape       Param #\n"
        "input                   (None, 20)               0\n"
        "dense_1 (relu)          (None, 64)           1,344\n"
        "dense_2 (relu)          (None, 32)           2,080\n"
        "dense_3 (softmax)       (None, 3)               99\n"
        "Total params: 3,523\n")
    assert 1344 + 2080 + 99 == model.n_params
    assert "dense_1 (linear)" in fastmlp.MLP([4, 1], output="linear").summary()
