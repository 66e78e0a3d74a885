"""Learning-rate schedules: each one's rates against its formula, training
trajectories against the oracle fed the same rates, and bit-identical
resumption through model files."""
import math

import numpy as np
import pytest

import fastmlp
from fastmlp import reference
from fastmlp.schedules import Cosine, Step

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


@pytest.mark.parametrize("schedule", [Step(factor=0.3, every=1), Cosine(min_lr=0.0)])
def test_resuming_from_a_file_is_bit_identical(tmp_path, schedule):
    settings = dict(batch_size=BATCH, optimizer="adam", lr=0.01, seed=2)
    straight, X, y = problem(np.float32)
    fastmlp.fit(straight, X, y, epochs=4, lr_schedule=schedule, **settings)
    half, _, _ = problem(np.float32)
    fresh = Step(0.3, 1) if isinstance(schedule, Step) else Cosine(epochs=4)
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
