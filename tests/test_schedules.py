"""Learning-rate schedules: each one's rates against its formula, training
trajectories against the oracle fed the same rates, and bit-identical
resumption through model files."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest

import fastmlp
from fastmlp import reference
from fastmlp.schedules import Cosine, Plateau, Step

from conftest import random_problem, reference_copy, relative_error
from test_training import batches_in_order

N, BATCH = 200, 20  # 10 steps an epoch


def problem(dtype=np.float64):
    return random_problem([8, 9, 3], N, "tanh", dtype, seed=4)


def test_step_rates_and_trajectory_follow_the_formula():
    model, X, y = problem()
    weights, biases = reference_copy(model)
    history = fastmlp.fit(model, X, y, epochs=5, batch_size=BATCH, optimizer="sgd", lr=0.2,
                          shuffle=False, lr_schedule=Step(factor=0.5, every=2))
    rates = [0.2 * 0.5 ** (epoch // 2) for epoch in range(5)]
    assert history.history["lr"] == rates
    per_step = [rate for rate in rates for _ in range(10)]
    reference.train(weights, biases, X, y, "tanh", batches_in_order(N, BATCH) * 5,
                    optimizer="sgd", lr=per_step)
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_cosine_rates_per_step_and_trajectory(optimizer):
    model, X, y = problem()
    weights, biases = reference_copy(model)
    schedule = Cosine(epochs=3, min_lr=0.001)
    history = fastmlp.fit(model, X, y, epochs=4, batch_size=BATCH, optimizer=optimizer, lr=0.05,
                          shuffle=False, lr_schedule=schedule)
    T = 30  # 3 epochs of 10 steps; then min_lr
    per_step = [0.001 + (0.05 - 0.001) * 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
                for t in range(40)]
    reference.train(weights, biases, X, y, "tanh", batches_in_order(N, BATCH) * 4,
                    optimizer=optimizer, lr=per_step)
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9
    assert model.optimizer_state.hyper[0] == pytest.approx(0.001)  # the last step's rate
    assert history.history["lr"][0] == 0.05


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_callable_returning_zero_after_the_first_epoch_stops_learning(optimizer):
    one, X, y = problem()
    fastmlp.fit(one, X, y, epochs=1, batch_size=BATCH, optimizer=optimizer, lr=0.05, seed=1)
    three, _, _ = problem()
    history = fastmlp.fit(three, X, y, epochs=3, batch_size=BATCH, optimizer=optimizer,
                          lr=0.05, seed=1, lr_schedule=lambda epoch: 0.05 if epoch == 0 else 0)
    assert history.history["lr"] == [0.05, 0.0, 0.0]
    assert np.array_equal(one.params, three.params)


@pytest.mark.parametrize("make_schedule,whole_run", [
    (lambda: Step(factor=0.3, every=1), False),
    (lambda: Cosine(min_lr=0.0), True),
    # every epoch but the first counts as no improvement: the rate halves each epoch
    (lambda: Plateau(factor=0.5, patience=1, min_delta=10.0), False),
])
def test_resuming_from_a_file_is_bit_identical(tmp_path, make_schedule, whole_run):
    settings = dict(batch_size=BATCH, optimizer="adam", lr=0.01, seed=2)
    straight, X, y = problem(np.float32)
    history = fastmlp.fit(straight, X, y, epochs=4, lr_schedule=make_schedule(), **settings)
    assert len(set(history.history["lr"])) > 1 or whole_run
    half, _, _ = problem(np.float32)
    fresh = Cosine(epochs=4) if whole_run else make_schedule()
    fastmlp.fit(half, X, y, epochs=2, lr_schedule=fresh, **settings)
    half.save(tmp_path / "half.safetensors")
    resumed = fastmlp.load(tmp_path / "half.safetensors")
    settings.pop("seed")  # continue the shuffling
    fastmlp.fit(resumed, X, y, epochs=2, **settings)  # the schedule comes from the file
    assert np.array_equal(resumed.params, straight.params)


def test_a_callable_must_be_passed_again_after_loading(tmp_path):
    model, X, y = problem()
    fastmlp.fit(model, X, y, epochs=1, batch_size=BATCH, lr_schedule=lambda e: 0.1)
    model.save(tmp_path / "m.safetensors")
    loaded = fastmlp.load(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="callable lr_schedule.*pass it again"):
        fastmlp.fit(loaded, X, y, epochs=1, batch_size=BATCH)
    fastmlp.fit(loaded, X, y, epochs=1, batch_size=BATCH, lr_schedule=lambda e: 0.1)


@pytest.mark.parametrize("spec,message", [
    ("linear", "unknown lr_schedule"),
    (lambda epoch: -1.0, "finite learning rate >= 0"),
    (lambda epoch: float("nan"), "finite learning rate >= 0"),
])
def test_bad_schedules_are_refused(spec, message):
    model, X, y = problem()
    with pytest.raises(ValueError, match=message):
        fastmlp.fit(model, X, y, epochs=1, batch_size=BATCH, lr_schedule=spec)
    with pytest.raises(ValueError, match="factor"):
        Step(factor=0)
    with pytest.raises(ValueError, match="epochs"):
        Cosine(epochs=0)


def test_plateau_lowers_the_rate_as_keras_does():
    # losses by epoch, patience 2: epochs 2 and 3 fail to beat 0.9, so epoch
    # 4 runs at half the rate; 6 and 7 fail to beat 0.5, so epoch 8 at a quarter
    schedule = Plateau(factor=0.5, patience=2, monitor="loss")
    rates = []
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.91, 0.92, 0.5, 0.6, 0.7, 0.8]):
        rates.append(schedule.epoch_lr(1.0, epoch))
        schedule.end_epoch(1.0, {"loss": loss})
    assert rates == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]
    # a rising metric, min_delta, min_lr and cooldown
    schedule = Plateau(factor=0.1, patience=1, monitor="val_accuracy", min_delta=0.05,
                       cooldown=1, min_lr=0.005)
    rates = []
    for accuracy in [0.5, 0.52, 0.6, 0.6, 0.6, 0.6, 0.6]:
        rates.append(schedule.epoch_lr(0.1, None))
        schedule.end_epoch(0.1, {"val_accuracy": accuracy})
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.005, 0.005, 0.005])


def monitored_values(seed, n=40):
    """A noisy, mostly falling loss curve with flat stretches."""
    rng = np.random.default_rng(seed)
    return list(np.round(np.cumsum(rng.choice([-0.1, 0.0, 0.0, 0.02], size=n)) + 5, 2))


def plateau_rates(values, **settings):
    schedule = Plateau(monitor="val_loss", **settings)
    rates = []
    for value in values:
        rates.append(schedule.epoch_lr(1.0, None))
        schedule.end_epoch(1.0, {"val_loss": value})
    return rates


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("settings", [
    dict(factor=0.5, patience=2),
    dict(factor=0.1, patience=1, min_delta=0.05, cooldown=2, min_lr=0.001),
    dict(factor=0.3, patience=3, cooldown=1),
])
def test_plateau_equals_keras_reduce_lr_on_plateau(seed, settings):
    if importlib.util.find_spec("jax") is not None:
        os.environ.setdefault("KERAS_BACKEND", "jax")  # its default, TensorFlow, may be absent
    keras = pytest.importorskip("keras")

    class Optimizer:
        learning_rate = 1.0

    class Model:
        optimizer = Optimizer()

    callback = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", verbose=0, **settings)
    callback.set_model(Model())
    callback.on_train_begin()
    values = monitored_values(seed)
    expected = []
    for epoch, value in enumerate(values):
        expected.append(float(Model.optimizer.learning_rate))
        callback.on_epoch_end(epoch, {"val_loss": value})
    assert len(set(expected)) > 1
    assert plateau_rates(values, **settings) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("patience,min_delta", [(1, 0.0), (2, 0.05), (3, 0.0)])
def test_plateau_equals_pytorchs_without_cooldown(seed, patience, min_delta):
    # PyTorch lowers the rate after more than `patience` bad epochs, Keras
    # after `patience`
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=patience - 1, threshold=min_delta,
        threshold_mode="abs", eps=0.0)
    values = monitored_values(seed)
    expected = []
    for value in values:
        expected.append(optimizer.param_groups[0]["lr"])
        scheduler.step(value)
    assert len(set(expected)) > 1
    assert plateau_rates(values, factor=0.5, patience=patience, min_delta=min_delta) == expected


def test_plateau_in_fit_watches_validation_and_sets_the_rates_it_reports():
    model, X, y = problem()
    history = fastmlp.fit(model, X, y, epochs=12, batch_size=BATCH, optimizer="sgd", lr=0.3,
                          validation_data=(X[:60], y[:60]), seed=0,
                          lr_schedule=Plateau(factor=0.5, patience=1, min_delta=0.01))
    schedule = model.optimizer_state.schedule
    assert schedule.monitor == "val_loss"  # the default with validation data
    scales = plateau_rates(history.history["val_loss"], factor=0.5, patience=1, min_delta=0.01)
    rates = history.history["lr"]
    assert rates == [0.3 * scale for scale in scales] and len(set(rates)) > 1
    again, _, _ = problem()
    fastmlp.fit(again, X, y, epochs=12, batch_size=BATCH, optimizer="sgd", lr=0.3, seed=0,
                lr_schedule=lambda epoch: rates[epoch])
    assert np.array_equal(model.params, again.params)


@pytest.mark.parametrize("schedule,validation,message", [
    (Plateau(monitor="val_loss"), False, "watches 'val_loss', which needs validation_data"),
    (Plateau(monitor="r2"), True, "unknown Plateau monitor 'r2'"),
])
def test_plateau_monitors_are_checked(schedule, validation, message):
    model, X, y = problem()
    with pytest.raises(ValueError, match=message):
        fastmlp.fit(model, X, y, epochs=1, batch_size=BATCH, lr_schedule=schedule,
                    validation_data=(X, y) if validation else None)


@pytest.mark.parametrize("kwargs,message", [
    (dict(factor=1.0), "factor must be a number > 0 and < 1"),
    (dict(patience=0), "patience must be an integer >= 1"),
    (dict(cooldown=-1), "cooldown must be an integer >= 0"),
    (dict(min_lr=float("inf")), "min_lr must be a finite number >= 0"),
])
def test_bad_plateaus_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Plateau(**kwargs)


@pytest.mark.parametrize("field,value", [("scale", 2.0), ("scale", 0), ("best", "x"),
                                         ("wait", -1), ("factor", 1.0), ("cooling", 0.5)])
def test_a_plateau_with_a_bad_state_in_a_file_is_refused(tmp_path, field, value):
    from test_modelfile import resigned, tensors_and_metadata
    model, X, y = problem(np.float32)
    fastmlp.fit(model, X, y, epochs=2, batch_size=BATCH, optimizer="adam",
                lr_schedule=Plateau(patience=1, min_delta=10.0))
    model.save(tmp_path / "good.safetensors")
    assert fastmlp.load(tmp_path / "good.safetensors").optimizer_state.schedule.scale == 0.1
    arrays, metadata = tensors_and_metadata((tmp_path / "good.safetensors").read_bytes())
    optimizer = json.loads(metadata["optimizer"])
    optimizer["schedule"][field] = value
    metadata["optimizer"] = json.dumps(optimizer)
    (tmp_path / "bad.safetensors").write_bytes(resigned(arrays, metadata))
    with pytest.raises(ValueError, match="bad.safetensors.*bad schedule"):
        fastmlp.load(tmp_path / "bad.safetensors")
