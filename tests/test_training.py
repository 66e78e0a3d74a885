"""Training trajectories against the oracle, determinism, and the promise that
nothing is allocated inside an epoch."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from copy import deepcopy

import joblib
import numba
import numpy as np
import pytest
from numba.core.runtime import _nrt_python, rtsys

import fastmlp
from fastmlp import cores, kernels, reference, training
from fastmlp.buffers import PLAIN, STREAMED, Optimizer, make_data
from fastmlp.distributed import local_batches
from fastmlp.kernels import wide_layer
from fastmlp.model import Workspace
from fastmlp.optimizers import ADAM_ALPHA, OPTIMIZERS, adam_betas, make_hyper
from fastmlp.progress import Callback
from fastmlp.forward_backward import forward_backward, region, region_plan
from fastmlp.gradients import gradients_region, gradients_update
from fastmlp.step import RESULT_WORDS, fused_steps, train_steps
from fastmlp.tasks import (BIAS_TASK, NO_TASK, TASK_GROUPS, WEIGHT_TASK, WIDE_TASK_ROWS,
                           make_tasks, sums_at_once, task_block_values, task_cost, task_first)
from fastmlp.sync import ABORTED, START, SYNC_WORDS

from conftest import random_problem, reference_copy, relative_error

OPTIMIZER_CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "weight_decay": 0.01}),
    ("momentum", {"lr": 0.05, "momentum": 0.9}),
    ("momentum", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.001}),
    ("adam", {"lr": 0.003}),
    ("adam", {"lr": 0.001, "weight_decay": 0.01}),
    ("adam", {"lr": 0.002, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-3}),
]


def batches_in_order(n, batch_size):
    return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@pytest.mark.parametrize("optimizer,options", OPTIMIZER_CASES)
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "identity"])
def test_fifty_steps_follow_the_oracle(optimizer, options, activation):
    # 50 steps of 16 rows, then the last of them partial: 49 full + 1 of 9
    n, batch_size = 49 * 16 + 9, 16
    model, X, y = random_problem([12, 10, 7, 4], n, activation, np.float64, seed=7)
    weights, biases = reference_copy(model)
    history = fastmlp.fit(model, X, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                          shuffle=False, **options)
    losses = reference.train(weights, biases, X, y, activation, batches_in_order(n, batch_size),
                             optimizer=optimizer, **options)
    assert len(losses) == 50
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9
    # the epoch's loss is the mean over rows of the per-step losses
    sizes = [len(b) for b in batches_in_order(n, batch_size)]
    expected_loss = np.dot(losses, sizes) / n
    assert abs(history.history["loss"][0] - expected_loss) < 1e-9 * expected_loss
    # and training did something
    assert relative_error(model.weights[0], reference_copy(
        fastmlp.MLP([12, 10, 7, 4], activation=activation, dtype="float64", init="xavier", seed=7))[0][0]) > 1e-3


@pytest.mark.parametrize("optimizer,options", [OPTIMIZER_CASES[3], OPTIMIZER_CASES[5]])
def test_wide_layers_follow_the_oracle(optimizer, options):
    # layers of 64 outputs or more run forward from transposed weights that
    # each update task rewrites: a stale block would leave the oracle's path
    # from the second step on (fit's calls run up to 10 steps here). Two
    # fits of 500 steps, the second resuming.
    n, batch_size = 500 * 2, 2
    model, X, y = random_problem([20, 130, 64, 5], n, "relu", np.float64, seed=3)
    weights, biases = reference_copy(model)
    for _ in range(2):
        fastmlp.fit(model, X, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                    shuffle=False, **options)
    reference.train(weights, biases, X, y, "relu", batches_in_order(n, batch_size) * 2,
                    optimizer=optimizer, **options)
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9
    assert relative_error(model.weights[1], reference_copy(
        fastmlp.MLP([20, 130, 64, 5], activation="relu", dtype="float64", init="xavier",
                    seed=3))[0][1]) > 1e-3


def test_float32_trajectory_stays_close_to_the_oracle():
    model, X, y = random_problem([20, 16, 5], 400, "tanh", np.float32, seed=1, x_dtype=np.uint8)
    weights, biases = reference_copy(model)
    fastmlp.fit(model, X, y, epochs=2, batch_size=40, optimizer="adam", lr=0.01, shuffle=False)
    reference.train(weights, biases, X, y, "tanh", batches_in_order(400, 40) * 2,
                    optimizer="adam", lr=np.float32(0.01))
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("sampling,shuffle", [("epoch", True), ("replacement", True)])
def test_shuffled_and_replacement_batches_are_the_seeded_draws(sampling, shuffle):
    n, batch_size, seed = 300, 32, 99
    model, X, y = random_problem([8, 6, 3], n, "sigmoid", np.float64, seed=2)
    weights, biases = reference_copy(model)
    fastmlp.fit(model, X, y, epochs=2, batch_size=batch_size, lr=0.5, shuffle=shuffle,
                sampling=sampling, seed=seed)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(2):
        if sampling == "replacement":
            idx = rng.integers(0, n, size=n)
        else:
            idx = rng.permutation(n)
        batches += [idx[rows] for rows in batches_in_order(n, batch_size)]
    reference.train(weights, biases, X, y, "sigmoid", batches, optimizer="sgd", lr=0.5)
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9


def test_second_fit_continues_the_optimizer():
    model_a, X, y = random_problem([10, 8, 3], 200, "relu", np.float64, seed=5)
    model_b, _, _ = random_problem([10, 8, 3], 200, "relu", np.float64, seed=5)
    options = dict(batch_size=25, optimizer="adam", lr=0.01, shuffle=False)
    fastmlp.fit(model_a, X, y, epochs=4, **options)
    fastmlp.fit(model_b, X, y, epochs=2, **options)
    fastmlp.fit(model_b, X, y, epochs=2, **options)
    assert np.array_equal(model_a.params, model_b.params)


def test_second_fit_continues_the_shuffling():
    model_a, X, y = random_problem([10, 8, 3], 200, "sigmoid", np.float64, seed=5)
    model_b, _, _ = random_problem([10, 8, 3], 200, "sigmoid", np.float64, seed=5)
    fastmlp.fit(model_a, X, y, epochs=3, batch_size=16, seed=3)
    fastmlp.fit(model_b, X, y, epochs=1, batch_size=16, seed=3)
    fastmlp.fit(model_b, X, y, epochs=2, batch_size=16)
    assert np.array_equal(model_a.params, model_b.params)
    assert model_b.training_state.epoch == 3 and model_b.training_state.step == 0


def one_step_chunks(monkeypatch):
    """fit's calls into compiled code run one step each (in epochs of up to
    100 steps), so that InterruptAt stops at a known step."""
    monkeypatch.setattr(fastmlp.training, "CHUNKS_PER_EPOCH", 100)
    monkeypatch.setattr(fastmlp.training, "CHUNK_SECONDS", 0.0)


class InterruptAt(Callback):
    """Sends this process SIGINT after a given chunk."""

    def __init__(self, calls):
        self.calls = calls

    def on_steps(self, step, n_steps, logs):
        self.calls -= 1
        if self.calls == 0:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ctrl_c_stops_cleanly_and_training_resumes_bit_for_bit(optimizer, monkeypatch):
    model_a, X, y = random_problem([10, 8, 3], 500, "relu", np.float32, seed=8)
    model_b, _, _ = random_problem([10, 8, 3], 500, "relu", np.float32, seed=8)
    one_step_chunks(monkeypatch)
    options = dict(batch_size=10, optimizer=optimizer, lr=0.01)  # 50 steps an epoch
    fastmlp.fit(model_a, X, y, epochs=3, seed=1, **options)
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background
    with pytest.raises(KeyboardInterrupt) as stop:
        fastmlp.fit(model_b, X, y, epochs=3, seed=1, callbacks=[InterruptAt(70)], **options)
    assert (model_b.training_state.epoch, model_b.training_state.step) == (1, 20)
    assert stop.value.history.epoch == [0] and stop.value.best_params is None
    assert model_b.optimizer_state.updates == 70
    assert not np.array_equal(model_a.params, model_b.params)
    fastmlp.fit(model_b, X, y, epochs=2, **options)  # finishes epoch 2, then epoch 3
    assert np.array_equal(model_a.params, model_b.params)
    # the SIGINT handler from before is back
    assert signal.getsignal(signal.SIGINT) == handler


def train_lesson_epoch(threads, seed=0, sizes=(784, 50, 10), batch_size=100, rows=np.uint8):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (2000, 784), dtype=np.uint8).astype(rows)
    y = rng.integers(0, 10, 2000)
    model = fastmlp.MLP(list(sizes), seed=0)
    fastmlp.fit(model, X, y, epochs=1, batch_size=batch_size, optimizer="momentum", lr=0.1,
                seed=seed, threads=threads)
    return model.params.copy()


# the lesson's network and one of 100 hidden units (on 2 threads narrow
# first column layers: their weights outweigh 100 uint8 rows; the second
# cut within its transposed block), one with a wide layer
# (kernels.wide_forward: one thread's 100 rows in blocks of 64 and 48; on 2
# threads a column layer, each thread its outputs for all rows), and two
# wide layers with outputs past whole blocks (column layers whose input
# deltas are split by columns too)
# Batches of more than 128 rows are summed in two halves (gradients.gradient_cut):
# on 2 threads, the shared tasks' halves apart (gradients.part_halves), first
# layers in column pieces (784-100 on float32 rows) or split by rows (on
# uint8 rows: no narrow column layer for such batches); 192 rows leave a
# last batch of 80, summed at once.
@pytest.mark.parametrize("sizes, batch_size, rows", [
    ((784, 50, 10), 100, np.uint8), ((784, 100, 10), 100, np.uint8),
    ((784, 256, 10), 100, np.uint8), ((784, 300, 260, 10), 100, np.uint8),
    ((784, 100, 10), 200, np.float32), ((784, 100, 10), 200, np.uint8),
    ((784, 64, 32, 10), 192, np.float32), ((784, 300, 260, 10), 200, np.uint8)])
def test_parameters_are_bit_identical_across_thread_counts_and_runs(sizes, batch_size, rows):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    options = dict(sizes=sizes, batch_size=batch_size, rows=rows)
    one = train_lesson_epoch(threads=1, **options)
    two = train_lesson_epoch(threads=2, **options)
    again = train_lesson_epoch(threads=2, **options)
    assert np.array_equal(one, two)
    assert np.array_equal(two, again)
    # a different seed is a different run: the comparison can fail
    assert not np.array_equal(two, train_lesson_epoch(threads=2, seed=1, **options))


@pytest.mark.parametrize("one_thread", [True, False])
def test_fit_without_threads_trains_on_the_count_its_probe_picks(monkeypatch, one_thread):
    """fit without `threads` times a few steps on every count of its ladder
    (all of Numba's threads, the powers of two below) and trains on the
    count the probe picks (fastest_count: here made to pick one thread, or
    every; it picks again after the first epoch, from the epoch's time and
    the probe's: ThreadChoice). The probe leaves no trace: the parameters
    are a fit's on a fixed thread count, and Numba's thread count is
    restored. Given threads, or data of fewer steps than a probe, there is
    no probe."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    monkeypatch.setattr(training, "cpu_quota", lambda: None)  # (whatever this host's)
    probed = []

    def pick(times):
        probed.append(sorted(times))
        return min(times) if one_thread else max(times)
    monkeypatch.setattr(training, "fastest_count", pick)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((640, 20)).astype(np.float32)
    y = rng.integers(0, 3, 640)
    previous = numba.get_num_threads()
    every = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(every)
    try:
        fits = {}
        for threads in (None, 2):
            model = fastmlp.MLP([20, 30, 3], seed=0)
            history = fastmlp.fit(model, X, y, epochs=2, batch_size=32, optimizer="adam",
                                  seed=3, threads=threads)
            assert numba.get_num_threads() == every
            fits[threads] = (history.threads, model.params.copy())
        assert fits[None][0] == (1 if one_thread else every)
        # the probe, then the pick for the second epoch
        assert probed == [training.thread_ladder(every)[::-1]] * 2
        assert fits[2][0] == 2  # given: no probe
        assert np.array_equal(fits[None][1], fits[2][1])
        small = fastmlp.fit(fastmlp.MLP([20, 30, 3], seed=0), X[:64], y[:64], batch_size=32)
        assert small.threads == every  # 2 steps an epoch: no probe
    finally:
        numba.set_num_threads(previous)


def test_each_epoch_runs_on_the_count_whose_last_epoch_was_fastest():
    """ThreadChoice: an epoch's seconds a step replace its count's time (the
    probe's until then), and the next epoch runs on the fastest count
    (fastest_count: all threads unless fewer are 5% faster)."""
    choice = training.ThreadChoice({2: 1.0e-4, 1: 1.8e-4}, 2)
    assert choice.after_epoch(100, 0.011) == 2  # 1.1e-4 a step: still fastest
    assert choice.after_epoch(100, 0.05) == 1  # another process took a core: 5e-4
    assert choice.after_epoch(100, 0.019) == 1  # 1.9e-4 on one thread, 5e-4 on two
    assert choice.times == {2: pytest.approx(5.0e-4), 1: pytest.approx(1.9e-4)}
    choice = training.ThreadChoice({2: 1.0e-4, 1: 1.8e-4}, 2)
    assert choice.after_epoch(100, 0.0185) == 2  # 1.85e-4: not 5% slower than one
    assert choice.after_epoch(0, 0.0) == 2  # no steps: nothing learnt


def test_a_count_above_the_current_one_is_tried_again_after_a_while():
    """A count more than the current one, not run for RETRY_SECONDS of
    training, gets an epoch again (its time may date from a process that
    has left); counts below it are not retried."""
    def epoch(seconds_a_step):  # an epoch of a quarter of RETRY_SECONDS
        seconds = training.RETRY_SECONDS / 4
        return choice.after_epoch(round(seconds / seconds_a_step), seconds)

    choice = training.ThreadChoice({2: 5.0e-4, 1: 2.0e-4}, 1)
    assert [epoch(2.0e-4) for _ in range(4)] == [1, 1, 1, 2]  # two again, after 4 quarters
    assert epoch(1.0e-4) == 2  # the other process has left: two threads are faster
    for _ in range(8):
        assert epoch(1.0e-4) == 2  # fewer threads are not retried
    choice = training.ThreadChoice({2: 5.0e-4, 1: 2.0e-4}, 1)
    assert [epoch(2.0e-4) for _ in range(4)] == [1, 1, 1, 2]
    assert epoch(5.0e-4) == 1  # still slower on two: back to one


def test_a_count_a_little_slower_is_tried_again_sooner():
    """A count above the current one that was a tenth slower gets an epoch
    again once that epoch's extra cost (a tenth of an epoch) is
    RETRY_SHARE of the training since it ran: after 0.1 / 0.03 = 3.3
    epochs, not RETRY_SECONDS."""
    assert training.RETRY_SHARE == 0.03
    choice = training.ThreadChoice({2: 2.2e-4, 1: 2.0e-4}, 1)
    assert [choice.after_epoch(5000, 1.0) for _ in range(4)] == [1, 1, 1, 2]
    assert choice.after_epoch(5000, 0.55) == 2  # the host is back: 1.1e-4 a step on two
    choice = training.ThreadChoice({2: 2.2e-4, 1: 2.0e-4}, 1)
    assert [choice.after_epoch(5000, 1.0) for _ in range(4)] == [1, 1, 1, 2]
    assert choice.after_epoch(5000, 1.1) == 1  # still a tenth slower: back to one
    assert [choice.after_epoch(5000, 1.0) for _ in range(4)] == [1, 1, 1, 2]
    # an epoch of no steps tells nothing: no retry before RETRY_SECONDS
    choice = training.ThreadChoice({2: 2.2e-4, 1: 2.0e-4}, 1)
    assert choice.after_epoch(0, 5.0) == 1
    assert choice.retry_wait(2, 0) == training.RETRY_SECONDS
    # nor a count that was faster (fastest_count's to pick; here it would)
    choice = training.ThreadChoice({2: 1.0e-4, 1: 2.0e-4}, 1)
    assert choice.retry_wait(2, 5000) == training.RETRY_SECONDS


def test_a_fit_that_changes_its_thread_count_between_epochs_changes_no_value(monkeypatch):
    """Whatever counts ThreadChoice picks, epoch by epoch, the parameters
    are a fixed count's; History.threads is the last epoch's count and
    Numba's count is restored."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    monkeypatch.setattr(training, "cpu_quota", lambda: None)
    monkeypatch.setattr(training, "fastest_count", min)  # the probe picks one thread
    picks = []

    def alternate(self, steps, seconds):
        picks.append(2 if len(picks) % 2 == 0 else 1)
        return picks[-1]
    monkeypatch.setattr(training.ThreadChoice, "after_epoch", alternate)

    class Counts(fastmlp.progress.Callback):
        def __init__(self):
            self.counts = []

        def on_epoch_begin(self, epoch, total_epochs, n_steps):
            self.counts.append(numba.get_num_threads())
    rng = np.random.default_rng(0)
    X = rng.standard_normal((640, 20)).astype(np.float32)
    y = rng.integers(0, 3, 640)
    previous = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        fits = {}
        for threads in (None, 2):
            model = fastmlp.MLP([20, 30, 3], seed=0)
            counts = Counts()
            history = fastmlp.fit(model, X, y, epochs=4, batch_size=32, optimizer="adam",
                                  seed=3, threads=threads, callbacks=[counts])
            assert numba.get_num_threads() == 2
            fits[threads] = (history.threads, counts.counts, model.params.copy())
        assert picks == [2, 1, 2]  # after epochs 1-3; none after the last
        assert fits[None][:2] == (2, [1, 2, 1, 2])
        assert fits[2][:2] == (2, [2, 2, 2, 2])
        assert np.array_equal(fits[None][2], fits[2][2])
    finally:
        numba.set_num_threads(previous)


def test_the_probe_times_every_count_and_then_the_powers_of_two_below_it():
    assert training.thread_ladder(1) == [1]
    assert training.thread_ladder(2) == [2, 1]
    assert training.thread_ladder(3) == [3, 2, 1]
    assert training.thread_ladder(6) == [6, 4, 2, 1]
    assert training.thread_ladder(16) == [16, 8, 4, 2, 1]


def test_the_probe_keeps_every_thread_unless_fewer_are_faster_by_its_gain():
    times = {8: [3.0, 2.9, 9.0], 4: [1.5, 1.4, 1.6], 2: [1.0, 5.0, 1.1], 1: [2.0, 2.0, 2.0]}
    assert training.fastest_count(times, 1.05) == 2  # medians 3.0, 1.5, 1.1, 2.0
    assert training.fastest_count(times, 3.0) == 8  # 1.1 * 3 is not below 3.0
    assert training.fastest_count({2: [1.0, 1.0], 1: [0.97, 0.97]}, 1.05) == 2
    assert training.fastest_count({2: [1.0, 1.0], 1: [0.9, 0.9]}, 1.05) == 1
    assert training.fastest_count({2: [1.0], 1: [1.0]}, 1e-6) == 2  # a tie: the most threads


@pytest.mark.parametrize("proc, files, quota", [
    ("0::/\n", {"cpu.max": "200000 100000"}, 2),  # a container's own namespace
    ("0::/\n", {"cpu.max": "150000 100000"}, 2),  # 1.5 CPUs' time: 2 threads
    ("0::/\n", {"cpu.max": "max 100000"}, None),
    ("0::/\n", {"cpu.max": "\n"}, None),
    ("0::/a/b\n", {"a/b/cpu.max": "max 100000", "a/cpu.max": "300000 100000"}, 3),
    ("0::/a/b\n", {"a/b/cpu.max": "100000 100000", "a/cpu.max": "300000 100000"}, 1),
    ("0::/a/b\n", {"cpu.max": "400000 100000"}, 4),  # a/b not visible here: the root's
    ("4:cpu,cpuacct:/docker/x\n", {"cpu/cpu.cfs_quota_us": "300000",
                                    "cpu/cpu.cfs_period_us": "100000"}, 3),  # cgroup v1
    ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
     None),
    ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "300000"}, None),  # no period
    ("3:cpuset:/\n", {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"},
     None),  # not the cpu controller
    (None, {"cpu.max": "200000 100000"}, 2),  # no /proc/self/cgroup: the mount points
    ("0::/\n", {}, None),
])
def test_the_cpu_quota_is_read_from_the_cgroups(monkeypatch, tmp_path, proc, files, quota):
    """The smallest quota on this process's cgroup path, v2 or v1."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if proc is not None:
        (tmp_path / "proc-cgroup").write_text(proc)
    monkeypatch.setattr(cores, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(cores, "PROC_CGROUP", str(tmp_path / "proc-cgroup"))
    assert cores.cpu_quota() == quota


# Fits on 4 Numba threads (more than the cores of most test machines) with
# the probe's clock faked: each step costs STEP_COST[thread count] seconds;
# a CPU quota (argv[2], "none" for none) caps the threads.
LADDER_FIT = textwrap.dedent("""
    import json, sys, types
    import numba, numpy as np
    import fastmlp
    from fastmlp import training
    training.cpu_quota = lambda: None if sys.argv[2] == "none" else int(sys.argv[2])
    STEP_COST = {4: 3.0, 3: 2.5, 2: 1.0, 1: 2.0}
    clock = [0.0]
    seen = set()
    real_train_steps = training.train_steps
    def train_steps(work, net, opt, data, batches, step0, step1, *rest):
        if step1 > step0:  # (a compile runs no step)
            seen.add(numba.get_num_threads())
            clock[0] += STEP_COST[numba.get_num_threads()] * (step1 - step0)
        return real_train_steps(work, net, opt, data, batches, step0, step1, *rest)
    training.train_steps = train_steps
    training.time = types.SimpleNamespace(perf_counter=lambda: clock[0])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((640, 20)).astype(np.float32)
    y = rng.integers(0, 3, 640)
    out = {}
    for threads in (None, 2):
        model = fastmlp.MLP([20, 30, 3], seed=0)
        history = fastmlp.fit(model, X, y, epochs=2, batch_size=32, seed=3, threads=threads)
        out[str(threads)] = [history.threads, model.params.tolist(), numba.get_num_threads()]
    out["seen"] = sorted(seen)
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.parametrize("quota, probed, picked", [("none", [1, 2, 4], 2), ("3", [1, 2, 3], 2),
                                                  ("1", [], 1)])
def test_the_probe_picks_the_fastest_count_of_its_ladder(tmp_path, quota, probed, picked):
    """On 4 Numba threads whose steps cost 3, 1 and 2 (faked seconds) on 4,
    2 and 1 threads, fit without `threads` probes all three and trains on
    2: the same parameters as a fit given 2, and Numba keeps 4. Under a CPU
    quota of 3, it probes 3, 2 and 1; of 1, it trains on 1 without a probe."""
    result = tmp_path / "ladder.json"
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    proc = subprocess.run([sys.executable, "-c", LADDER_FIT, str(result), quota], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(result.read_text())
    # (the fits' own steps add the count each trained on)
    assert out["seen"] == sorted(set(probed) | {picked, 2})
    assert out["None"][0] == picked and out["2"][0] == 2
    assert out["None"][2] == 4
    if picked == 2:
        assert out["None"][1] == out["2"][1]


@pytest.mark.parametrize("sizes, batch", [([784, 256, 10], 100), ([784, 50, 10], 32),
                                          ([784, 100, 10], 100)])
def test_a_first_column_layer_reads_each_threads_own_copy_of_the_inputs(sizes, batch):
    """On 2 threads a first column layer (wide, or narrow with weights that
    outweigh the batch's uint8 rows: W2's) has each thread gather every row
    of the batch into its own copy of the inputs; on one thread, or with
    float32 rows that outweigh a narrow layer's weights, the rows go to the
    one shared block. The forward pass gives the same outputs either way."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (300, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 300)
    idx = rng.permutation(300)
    expected = (X[idx[40:40 + batch]] * np.float32(1 / 255)).astype(np.float32)
    assert Workspace([784, 50, 10], 100, np.float32).work.inputs.shape == (0, 0, 784)
    assert Workspace([784, 50, 10], 32, np.float32, input_bytes=4).work.inputs.shape == (
        numba.config.NUMBA_NUM_THREADS, 32, 784)
    model = fastmlp.MLP(sizes, seed=0)
    data = make_data(X, y.astype(np.int32), np.ones(300, np.float32), idx, model.dtype)
    previous = numba.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            ws = Workspace(model.layer_sizes, batch, model.dtype, input_bytes=1)
            assert ws.work.inputs.shape == (numba.config.NUMBA_NUM_THREADS, batch, 784)
            model._transpose(ws, model.network())
            model._forward(data, ws, 40, batch, False, model.network())
            shared = ws.acts[:batch * 784].reshape(batch, 784)
            if threads == 1:
                assert np.array_equal(shared, expected)
                assert not ws.work.inputs.any()
            else:
                assert not shared.any()  # the shared block is not written
                for copy in ws.work.inputs[:2]:
                    assert np.array_equal(copy, expected)
            outputs[threads] = ws.output[:batch].copy()
    finally:
        numba.set_num_threads(previous)
    assert np.array_equal(outputs[1], outputs[2])


@pytest.mark.parametrize("sizes", [[784, 50, 10], [784, 100, 10], [784, 512, 512, 10],
                                   [130, 300, 20], [100, 128, 64, 1], [3, 1, 7, 2]])
def test_gradient_tasks_cover_every_parameter_once(sizes):
    covered = [np.zeros((fan_out, fan_in), int) for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]
    biases = np.zeros(len(sizes) - 1, int)
    for layer, kind, j0, j1, k0, k1 in make_tasks(sizes):
        if kind == WEIGHT_TASK:
            covered[layer][j0:j1, k0:k1] += 1
        elif kind == BIAS_TASK:
            biases[layer] += 1
        else:
            assert kind == NO_TASK
    assert all((c == 1).all() for c in covered) and (biases == 1).all()


def column_pieces(tasks):
    # {layer: the (k0, k1) column ranges of its weight tasks}
    pieces = {}
    for layer, kind, _, _, k0, k1 in tasks:
        if kind == WEIGHT_TASK:
            pieces.setdefault(int(layer), set()).add((int(k0), int(k1)))
    return pieces


@pytest.mark.parametrize("sizes", [[784, 50, 10], [784, 100, 10], [256, 200, 10]])
def test_a_first_layer_in_column_pieces_deals_its_tasks_into_balanced_bins(sizes):
    tasks = make_tasks(sizes)
    assert len(column_pieces(tasks)[0]) == 2
    assert all(len(cuts) == 1 for layer, cuts in column_pieces(tasks).items() if layer > 0)
    assert len(tasks) % TASK_GROUPS == 0
    # contiguous quarters and halves carry similar work
    per_bin = len(tasks) // TASK_GROUPS
    loads = [sum(task_cost(tuple(t)) for t in tasks[g * per_bin:(g + 1) * per_bin])
             for g in range(TASK_GROUPS)]
    total = sum(loads)
    assert abs(loads[0] + loads[1] - total / 2) <= 0.05 * total
    assert max(loads) <= 1.2 * min(loads)
    # each half of the list holds one piece of the first layer
    halves = [{(t[4], t[5]) for t in tasks[h * 2 * per_bin:(h + 1) * 2 * per_bin]
               if t[1] == WEIGHT_TASK and t[0] == 0} for h in range(2)]
    cuts = sorted(column_pieces(tasks)[0])
    assert halves == [{cuts[0]}, {cuts[1]}]


@pytest.mark.parametrize("sizes", [[784, 100, 10], [784, 128, 64, 10], [256, 200, 10]])
def test_a_first_layer_of_96_outputs_summed_at_once_takes_whole_rows_in_tasks_of_16(sizes):
    """Where a batch's gradients are summed at once (128 rows or fewer, or
    any batch on packed bfloat16 products), a first layer of
    WHOLE_ROWS_MIN_OUTPUTS outputs or more has no column pieces: tasks of
    16 whole rows (the last one what is left), in the parameters' order.
    Narrower ones, and batches summed in halves, keep their pieces. Each
    workspace takes the list of its batches, and keeps a second half's
    gradients only where it sums them in halves."""
    assert len(column_pieces(make_tasks(sizes))[0]) == 2
    tasks = make_tasks(sizes, whole_rows=True)
    assert all(len(cuts) == 1 for cuts in column_pieces(tasks).values())
    rows = [(j0, j1) for layer, kind, j0, j1, k0, k1 in tasks if layer == 0 and kind == WEIGHT_TASK]
    assert rows == [(j, min(j + 16, sizes[1])) for j in range(0, sizes[1], 16)]
    assert NO_TASK not in tasks[:, 1]
    assert task_block_values(sizes, whole_rows=True) == 16 * sizes[0]
    assert len(column_pieces(make_tasks([784, 50, 10], whole_rows=True))[0]) == 2
    for batch, amx, whole_rows in ((128, False, True), (129, False, False), (200, True, True)):
        assert sums_at_once(batch, amx) == whole_rows
        work = Workspace(sizes, batch, np.float32, amx=amx).work
        assert np.array_equal(work.tasks, make_tasks(sizes, whole_rows))
        assert work.task_checks.shape == (len(work.tasks),)
        assert work.task_grads.shape[2] == task_block_values(sizes, whole_rows)
        # the second half's gradients only where batches are summed in halves
        assert (work.second_half.size > 0) == (not whole_rows)


@pytest.mark.parametrize("batch", [100, 128, 200])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_row_tasks_train_exactly_as_column_pieces(batch, dtype):
    """Which tasks a workspace cuts its gradients into changes no value: a
    fit on whole-row tasks gives the parameters a fit on column pieces
    gives, bit for bit, on 1 and 2 threads."""
    model, X, y = random_problem([256, 100, 10], 400, "relu", dtype, seed=6)
    results = {}
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for whole_rows in (False, True):
                trained = deepcopy(model)
                asked = []

                def forced(batch_size, amx):
                    asked.append(batch_size)
                    return whole_rows
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(fastmlp.model, "sums_at_once", forced)
                    fastmlp.fit(trained, X, y, epochs=2, batch_size=batch, optimizer="adam",
                                lr=0.01, seed=0)
                assert batch in asked  # the fit's workspace took the list forced
                results[threads, whole_rows] = trained.params
    finally:
        numba.set_num_threads(previous)
    first = results[1, False]
    assert not np.array_equal(first, model.params)
    for params in results.values():
        assert np.array_equal(params, first)


@pytest.mark.parametrize("sizes", [[784, 512, 512, 10], [130, 300, 20], [64, 1024, 10]])
def test_wide_layers_take_their_weight_rows_in_tasks_of_32_whole_rows(sizes):
    # wide layers (kernels.wide_layer: 256 outputs or more) get tasks of
    # WIDE_TASK_ROWS whole rows, a first one too (no column pieces); the
    # others keep smaller ones
    for layer, kind, j0, j1, k0, k1 in make_tasks(sizes):
        if kind != WEIGHT_TASK:
            continue
        assert (k0, k1) == (0, sizes[layer])
        if wide_layer(sizes[layer + 1]):
            # (the layer's last rows: what is left)
            assert j1 - j0 == WIDE_TASK_ROWS == 32 or 0 < j1 - j0 < 32 and j1 == sizes[layer + 1]
        else:
            assert j1 - j0 <= 16


@pytest.mark.parametrize("sizes", [[100, 128, 64, 1], [64, 128, 128, 10], [784, 512, 512, 10],
                                   [3, 1, 7, 2]])
def test_tasks_without_column_pieces_follow_the_parameters_order(sizes):
    """Each task's parameters start where the previous task's end, so that
    a thread's contiguous share of the list is one stretch of the parameter
    vector (hidden layers of 128 inputs are not cut in column pieces)."""
    model = fastmlp.MLP(sizes, output="linear", seed=0)
    net = model.network()
    for whole_rows in (False, True):
        tasks = make_tasks(sizes, whole_rows)
        assert all(len(cuts) == 1 for cuts in column_pieces(tasks).values())
        end = 0
        for layer, kind, j0, j1, k0, k1 in tasks:
            assert kind != NO_TASK
            first = task_first(net, np.array([layer, kind, j0, j1, k0, k1]))
            assert first == end
            end = first + ((j1 - j0) * sizes[layer] if kind == WEIGHT_TASK else sizes[layer + 1])
        assert end == model.params.size


def test_update_tasks_keep_the_transposed_weights_current():
    """train_steps transposes the weights of layers with 64 outputs or more
    once per call; then each update task rewrites its part."""
    model, X, y = random_problem([30, 200, 64, 10], 300, "tanh", np.float32, seed=4)
    ws = Workspace(model.layer_sizes, 10, model.dtype)
    grads, m, v = (np.zeros_like(model.params) for _ in range(3))
    optimizer = Optimizer(grads, m, v, make_hyper(model.dtype, 0.01, 0.9, 0.0),
                          OPTIMIZERS["adam"], False, np.zeros(5), adam_betas())
    data = make_data(X, y.astype(np.int32), np.ones(300, model.dtype), np.arange(300),
                     model.dtype)
    status = train_steps(ws.work, model.network(), optimizer, data,
                         local_batches(10, model.dtype), 0, 30, 0, 2)[3]
    assert status == 0
    weights_t, wt_off = ws.work.weights_t, model.network().wt_off
    for l, (fan_in, fan_out) in enumerate([(30, 200), (200, 64)]):
        # in panels of 64 outputs (kernels.weight_panels): 3 and 1
        block = weights_t[wt_off[l]:wt_off[l] + fan_in * (fan_out // 64 * 64)]
        for p, panel in enumerate(block.reshape(-1, fan_in, 64)):
            assert np.array_equal(panel, model.weights[l][:, p * 64:(p + 1) * 64])
    assert wt_off[2] == weights_t.size  # 10 outputs: no transposed block
    assert relative_error(model.weights[0], random_problem([30, 200, 64, 10], 300, "tanh",
                                                           np.float32, seed=4)[0].weights[0]) > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_transposed_weights_train_the_same_parameters(dtype, threads):
    """With work.exchange STREAMED, each update task of whole weight rows
    copies its transposed block into the panels by non-temporal stores
    (kernels.transposed_panels_streamed): the same parameters and panels
    as plain stores, bit for bit."""
    runs = []
    for form in (PLAIN, STREAMED):
        model, X, y = random_problem([30, 200, 64, 10], 600, "relu", dtype, seed=4)
        ws = Workspace(model.layer_sizes, 200, model.dtype)  # (summed in halves)
        ws.work.exchange[0] = form
        grads, m, v = (np.zeros_like(model.params) for _ in range(3))
        optimizer = Optimizer(grads, m, v, make_hyper(model.dtype, 0.01, 0.9, 0.0),
                              OPTIMIZERS["adam"], False, np.zeros(5), adam_betas())
        data = make_data(X, y.astype(np.int32), np.ones(600, model.dtype), np.arange(600),
                         model.dtype)
        with training.thread_count(threads):
            status = train_steps(ws.work, model.network(), optimizer, data,
                                 local_batches(200, model.dtype), 0, 3, 0, threads)[3]
        assert status == 0
        runs.append((model.params.copy(), ws.work.weights_t.copy()))
        net = model.network()
        # the streamed copy ran: the tasks of the 200- and 64-output layers
        # are whole rows in blocks of 16, and their panels start on a line
        streamed = 0
        for layer, kind, j0, j1, k0, k1 in ws.work.tasks:
            if kind == WEIGHT_TASK and layer < 2:
                C, OC = model.layer_sizes[layer], model.layer_sizes[layer + 1]
                OCT = kernels.kept_transposed(OC)
                panels = kernels.weight_panels(ws.work.weights_t, net.wt_off[layer], C, OCT)
                streamed += j0 < OCT and kernels.streamable(panels, j0, min(j1, OCT), 0, C,
                                                             ws.work.task_grads[0, 1])
        assert streamed >= 4
        for l, fan_in in enumerate([30, 200]):
            panels = ws.work.weights_t[net.wt_off[l]:net.wt_off[l + 1]].reshape(-1, fan_in, 64)
            for p, panel in enumerate(panels):
                assert np.array_equal(panel, model.weights[l][:, p * 64:(p + 1) * 64])
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_exchange_choice_keeps_the_faster_form():
    """fit's ExchangeChoice: plain first; the other form as soon as plain has
    a time, then every EXCHANGE_TRY_EVERY-th call; the faster kept (the
    other only when EXCHANGE_GAIN faster); one thread, short calls and a
    disabled choice: plain, untimed."""
    choice = training.ExchangeChoice()
    steps = training.EXCHANGE_MIN_STEPS
    assert choice.next_form(1, steps) == PLAIN
    choice.record(1, STREAMED, steps, 0.001)
    assert choice.times == {}
    assert choice.next_form(2, steps - 1) == PLAIN and choice.calls == 0
    assert choice.next_form(2, steps) == PLAIN
    choice.record(2, PLAIN, steps, 1.0)
    assert choice.next_form(2, steps) == STREAMED
    choice.record(2, STREAMED, steps, 1.0 / training.EXCHANGE_GAIN)  # not faster enough
    forms = [choice.next_form(2, steps) for _ in range(2 * training.EXCHANGE_TRY_EVERY)]
    assert forms.count(STREAMED) == 2 and forms.count(PLAIN) == len(forms) - 2
    choice.record(2, STREAMED, steps, 0.9)
    assert choice.current[2] == STREAMED
    assert choice.next_form(2, steps) in (STREAMED, PLAIN)
    choice.record(2, PLAIN, steps, 0.5)  # plain faster again
    assert choice.current[2] == PLAIN
    off = training.ExchangeChoice(enabled=False)
    assert [off.next_form(2, steps) for _ in range(20)] == [PLAIN] * 20


@pytest.mark.parametrize("optimizer,options", OPTIMIZER_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [64, 200])
def test_fused_update_equals_gradients_then_update(optimizer, options, dtype, batch):
    """Alone, each task computes its gradient into its thread's scratch
    block and updates from there; MPI ranks compute every gradient into the
    flat vector first and update from it. Both give the same parameters,
    optimizer state and transposed weights bit for bit, and the fused pass
    of a batch summed at once leaves the flat vector as it was (a batch of
    200 has its halves summed there and in work.second_half first). The
    layers cover every kind of task: rows of a wide layer (transposed),
    column pieces of a narrow one (50 outputs of 784 inputs), biases."""
    sizes = [784, 50, 130, 10]
    model, X, y = random_problem(sizes, batch, "relu", dtype, seed=5)
    net = model.network()
    ws = Workspace(sizes, batch, model.dtype)
    data = make_data(X, y.astype(np.int32), np.ones(batch, model.dtype), np.arange(batch),
                     model.dtype)
    model._transpose(ws, net)
    forward_backward(ws.work, net, data, 0, batch, model.dtype.type(1 / batch), True, 0, 2)
    hyper = make_hyper(model.dtype, options["lr"], options.get("momentum", 0.0),
                       options.get("weight_decay", 0.0))
    hyper[ADAM_ALPHA] = 0.001  # Adam's bias-corrected step size
    rng = np.random.default_rng(0)
    state = [rng.random(model.params.size).astype(dtype) for _ in range(2)]
    start = [model.params.copy(), ws.work.weights_t.copy()]
    results = []
    for fused in (True, False):
        model.params[:] = start[0]
        ws.work.weights_t[:] = start[1]
        grads = np.full(model.params.size, np.nan, dtype)
        m, v = (s.copy() for s in state)
        opt = Optimizer(grads, m, v, hyper, OPTIMIZERS[optimizer], options.get("nesterov", False),
                        np.zeros(5), adam_betas())
        if fused:
            gradients_update(ws.work, net, opt, batch, True, True, 2)
            # a batch summed at once never touches the flat gradient vector
            assert np.isnan(grads).all() == (batch == 64)
        else:
            gradients_update(ws.work, net, opt, batch, True, False, 2)
            gradients_update(ws.work, net, opt, batch, False, True, 2)
            assert not np.isnan(grads).any()
        assert not ws.work.task_checks.any()  # every new value finite
        results.append([model.params.copy(), m, v, ws.work.weights_t.copy()])
    for fused, split in zip(*results):
        assert np.array_equal(fused, split)
    assert not np.array_equal(results[0][0], start[0])  # the update did something


def test_an_epoch_allocates_nothing():
    """Numba's allocation counters: a call running 100 steps allocates exactly
    what a call running 1 step does (the boxing of its arguments), so the
    steps themselves allocate nothing."""
    model, X, y = random_problem([64, 80, 16, 10], 1000, "relu", np.float32, seed=0,
                                 x_dtype=np.uint8)
    y = y.astype(np.int32)
    ws = Workspace(model.layer_sizes, 10, model.dtype)
    grads = np.zeros_like(model.params)
    m, v = np.zeros_like(model.params), np.zeros_like(model.params)
    optimizer = Optimizer(grads, m, v, make_hyper(model.dtype, 0.001, 0.9, 0.0),
                          OPTIMIZERS["adam"], False, np.zeros(5), adam_betas())
    data = make_data(X, y, np.ones(1000, model.dtype), np.arange(1000), model.dtype)
    net = model.network()
    batches = local_batches(10, model.dtype)

    def run(steps):
        before = rtsys.get_allocation_stats()
        train_steps(ws.work, net, optimizer, data, batches, 0, steps, 0, 2)
        after = rtsys.get_allocation_stats()
        return after.alloc - before.alloc, after.free - before.free

    _nrt_python.memsys_enable_stats()
    try:
        run(1)  # compile
        one_step = run(1)
        many_steps = run(100)
    finally:
        _nrt_python.memsys_disable_stats()
    assert many_steps == one_step
    # the counters do count: a kernel that allocates per step is seen
    _nrt_python.memsys_enable_stats()
    try:
        before = rtsys.get_allocation_stats().alloc
        _allocate_per_step(100)
        assert rtsys.get_allocation_stats().alloc - before >= 100
    finally:
        _nrt_python.memsys_disable_stats()


@numba.njit
def _allocate_per_step(steps):
    total = 0.0
    for s in range(steps):
        total += np.ones(s + 1).sum()
    return total


def _unreleased(call):
    """How many of the arrays Numba took hold of during call() it still
    holds afterwards (its counters of memory blocks made and freed)."""
    _nrt_python.memsys_enable_stats()
    try:
        before = rtsys.get_allocation_stats()
        call()
        after = rtsys.get_allocation_stats()
    finally:
        _nrt_python.memsys_disable_stats()
    return (after.mi_alloc - before.mi_alloc) - (after.mi_free - before.mi_free)


@pytest.mark.parametrize("output", ["softmax", "linear"])
def test_kernels_without_reference_counts_release_every_array(output):
    """The kernels count no references (jit.py), and Numba refuses to
    compile one that would take a reference it cannot drop (a view returned
    by a counted function). Every array that a fit, an evaluation and a
    prediction hand to compiled code is released by the time they return,
    for 1 and 2 threads, with sample weights and without (buffers.row_weight)."""
    model, X, y = random_problem([12, 16, 8, 3], 300, "relu", np.float32, seed=1)
    if output == "linear":
        model = fastmlp.MLP([12, 16, 8, 2], activation="relu", output="linear",
                            dtype="float32", seed=1)
        y = np.random.default_rng(1).normal(size=(300, 2)).astype(np.float32)
    weights = np.random.default_rng(2).uniform(0.5, 2.0, 300)

    def work():
        for threads in (1, 2):
            for sample_weight in (None, weights):
                fastmlp.fit(model, X, y, epochs=1, batch_size=32, optimizer="adam",
                            threads=threads, sample_weight=sample_weight, seed=0)
        model.evaluate(X, y)
        model.predict(X)

    work()  # (compiles)
    assert _unreleased(work) == 0
    # the count sees an array that is still held
    held = []
    assert _unreleased(lambda: held.append(_ones(3))) == 1


@numba.njit
def _ones(n):
    return np.ones(n)


def test_history_records_every_epoch_and_validation():
    model, X, y = random_problem([10, 8, 3], 150, "tanh", np.float64, seed=4)
    Xv, yv = X[:50], y[:50]
    history = fastmlp.fit(model, X, y, epochs=3, batch_size=32, validation_data=(Xv, yv), seed=0)
    assert history.epoch == [0, 1, 2]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "epoch_time",
                                    "lr"}
    assert all(len(v) == 3 for v in history.history.values())
    assert (history.history["val_loss"][-1], history.history["val_accuracy"][-1]) == model.evaluate(Xv, yv)
    assert 0 <= history.history["accuracy"][0] <= 1


def diverging_problem(kind):
    model, X, y = random_problem([10, 8, 3], 300, "relu", np.float32, seed=2)
    if kind == "parameter":
        # a weight fed by an always-zero input: the forward pass never sees
        # it, while weight decay (w <- w - 3w) doubles it until it overflows
        X[:, 0] = 0
        model.weights[0][0, :] = 1e37
    return model, X, y


@pytest.mark.parametrize("optimizer,options,kind", [
    ("sgd", dict(lr=1e4), "loss"),
    ("momentum", dict(lr=1e4), "loss"),
    ("adam", dict(lr=1e30), "loss"),
    ("sgd", dict(lr=1.0, weight_decay=3.0), "parameter"),
])
def test_divergence_stops_at_the_step_and_keeps_the_last_finite_parameters(optimizer, options, kind,
                                                                           monkeypatch):
    one_step_chunks(monkeypatch)
    model, X, y = diverging_problem(kind)
    settings = dict(batch_size=10, optimizer=optimizer, seed=0, **options)  # 30 steps an epoch
    message = "the loss became NaN or inf" if kind == "loss" else "a parameter became NaN or inf"
    with pytest.raises(fastmlp.TrainingDiverged,
                       match=rf"diverged at epoch 1, step \d+ of 30: {message}.*smaller learning rate"):
        fastmlp.fit(model, X, y, epochs=3, **settings)
    assert np.isfinite(model.params).all()
    steps = model.training_state.step
    assert model.optimizer_state.updates == steps and steps > 0
    # exactly the parameters before the diverging step: the same run stopped
    # after that many steps (one step per chunk here) has them bit for bit
    probe, _, _ = diverging_problem(kind)
    with pytest.raises(KeyboardInterrupt):
        fastmlp.fit(probe, X, y, epochs=3, callbacks=[InterruptAt(steps)], **settings)
    assert np.array_equal(probe.params, model.params)
    assert np.array_equal(probe.optimizer_state.state1, model.optimizer_state.state1)


def test_a_nan_parameter_is_caught_even_when_relu_hides_it():
    model, X, y = random_problem([6, 5, 3], 40, "relu", np.float32, seed=1)
    model.weights[0][:, 0] = -1e30  # unit 0 always inactive
    model.weights[0][0, 0] = np.nan  # relu(NaN) gives 0 here: the loss stays finite
    assert np.isfinite(model.evaluate(X, y)[0])
    with pytest.raises(fastmlp.TrainingDiverged, match="a parameter became NaN or inf"):
        fastmlp.fit(model, X, y, epochs=1, batch_size=8, lr=0.1)


def test_sample_weights_follow_the_oracle():
    model, X, y = random_problem([8, 6, 3], 200, "sigmoid", np.float64, seed=9)
    weights, biases = reference_copy(model)
    sample_weight = np.random.default_rng(1).uniform(0, 3, 200)
    sample_weight[:20] = 0  # rows that must not count at all
    loss, dweights, dbiases = model.gradients(X, y, sample_weight)
    ref_loss, ref_dweights, ref_dbiases = reference.loss_and_gradients(
        weights, biases, X, y, "sigmoid", sample_weight)
    assert abs(loss - ref_loss) < 1e-12 * ref_loss
    for got, want in zip(dweights + dbiases, ref_dweights + ref_dbiases):
        assert relative_error(got, want) < 1e-12
    history = fastmlp.fit(model, X, y, epochs=1, batch_size=16, lr=0.3, shuffle=False,
                          sample_weight=sample_weight)
    losses = reference.train(weights, biases, X, y, "sigmoid", batches_in_order(200, 16),
                             lr=0.3, sample_weight=sample_weight)
    for got, want in zip(model.weights + model.biases, weights + biases):
        assert relative_error(got, want) < 1e-9
    batch_weights = [sample_weight[b].sum() for b in batches_in_order(200, 16)]
    assert abs(history.history["loss"][0] - np.dot(losses, batch_weights) / sum(batch_weights)) < 1e-9


def test_integer_weights_equal_repeated_rows():
    model, X, y = random_problem([5, 4, 3], 30, "tanh", np.float64, seed=3)
    counts = np.random.default_rng(0).integers(0, 4, 30)
    counts[0] = 1
    weighted = model.gradients(X, y, counts)
    repeated = model.gradients(np.repeat(X, counts, axis=0), np.repeat(y, counts))
    assert abs(weighted[0] - repeated[0]) < 1e-12
    for got, want in zip(weighted[1] + weighted[2], repeated[1] + repeated[2]):
        assert relative_error(got, want) < 1e-12


@pytest.mark.parametrize("bad,message", [
    (np.ones(5), "one weight per sample"),
    (-np.ones(10), "non-negative"),
    (np.full(10, np.nan), "finite"),
    (np.zeros(10), "sums to zero"),
    (np.array(["a"] * 10), "real numbers"),
])
def test_bad_sample_weights_are_refused(bad, message):
    model, X, y = random_problem([5, 4, 3], 10, "tanh", np.float64, seed=3)
    with pytest.raises(ValueError, match=message):
        fastmlp.fit(model, X, y, sample_weight=bad)


def test_early_stopping_stops_and_restores_the_best_epoch():
    model, X, y = random_problem([8, 32, 3], 120, "relu", np.float64, seed=4)
    Xv, yv = random_problem([8, 32, 3], 60, "relu", np.float64, seed=5)[1:]  # unrelated labels
    history = fastmlp.fit(model, X, y, epochs=200, batch_size=8, optimizer="adam", lr=0.01,
                          validation_data=(Xv, yv), patience=3, seed=0)
    val = history.history["val_loss"]
    assert history.stopped_epoch is not None and len(val) < 200
    best = int(np.argmin(val))
    assert history.best_epoch == best and len(val) == best + 4  # 3 epochs without improvement
    assert model.evaluate(Xv, yv)[0] == val[best]  # the best epoch's parameters are back


def test_early_stopping_on_training_loss_without_restoring():
    model, X, y = random_problem([8, 6, 3], 100, "tanh", np.float64, seed=4)
    history = fastmlp.fit(model, X, y, epochs=500, batch_size=100, lr=1e-4, patience=2,
                          min_delta=1e-3, restore_best_weights=False, seed=0)
    losses = history.history["loss"]
    # lr is tiny: the loss falls by less than min_delta per epoch
    assert history.stopped_epoch == 2 and len(losses) == 3
    with pytest.raises(ValueError, match="needs validation_data"):
        fastmlp.fit(model, X, y, patience=2, monitor="val_accuracy")


def test_the_step_compiles_once_per_model_dtype_for_any_input_and_head(tmp_path):
    """Input dtypes, read-only inputs (a memory-mapped dataset), heads and a
    model that joblib maps from a file share one compiled step per model
    dtype (each compile of it takes about a minute)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 6), dtype=np.uint8)
    mapped = pixels.copy()
    mapped.flags.writeable = False
    for X in (pixels, mapped, pixels.astype(np.float32), pixels.astype(np.float64)):
        targets = rng.standard_normal(40)
        targets.flags.writeable = False
        for output, y in (("softmax", rng.integers(0, 3, 40)),
                          ("linear", targets),
                          ("sigmoid", rng.integers(0, 2, (40, 3)))):
            model = fastmlp.MLP([6, 5, 1 if output == "linear" else 3], output=output, seed=0)
            fastmlp.fit(model, X, y, epochs=1, batch_size=8)
            model.evaluate(X, y)
    joblib.dump(model, tmp_path / "model.joblib")
    mapped_model = joblib.load(tmp_path / "model.joblib", mmap_mode="r")
    assert not mapped_model.w_off.flags.writeable
    fastmlp.fit(mapped_model, X, y, epochs=1, batch_size=8)

    def model_kind(signature):
        # of the Work tuple, the first argument: the model dtype, and whether
        # it runs on AMX tiles (bfloat16 there, which tests elsewhere in
        # this session may have trained: its own compile, amx_layers.on_tiles)
        fields = dict(zip(signature[0].fields, signature[0].types))
        return fields["acts"].dtype, fields["packed"].dtype

    for function in (train_steps, region, gradients_region):
        kinds = [model_kind(signature) for signature in function.signatures]
        assert len(kinds) == len(set(kinds)), (function.__name__, function.signatures)
    assert (numba.float32, numba.uint8) in [model_kind(signature)
                                            for signature in train_steps.signatures]


def _step_buffers(threads_in_workspace=2):
    model, X, y = random_problem([64, 80, 16, 10], 1000, "relu", np.float32, seed=0,
                                 x_dtype=np.uint8)
    ws = Workspace(model.layer_sizes, 50, model.dtype)
    grads = np.zeros_like(model.params)
    m, v = np.zeros_like(model.params), np.zeros_like(model.params)
    optimizer = Optimizer(grads, m, v, make_hyper(model.dtype, 0.001, 0.9, 0.0),
                          OPTIMIZERS["adam"], False, np.zeros(5), adam_betas())
    data = make_data(X, y.astype(np.int32), np.ones(1000, model.dtype),
                     np.random.default_rng(1).permutation(1000), model.dtype)
    return model, (ws.work, model.network(), optimizer, data, local_batches(50, model.dtype))


def test_parts_on_one_thread_give_the_fused_region_up_and_train_alike():
    """train_steps runs its steps in one parallel region whose parts wait for
    each other at barriers (sync.py). Where Numba runs two parts on one
    thread (here: 2 parts, 1 thread), the region gives up before any work,
    and the steps run in regions of their own: the same parameters, bit for
    bit, as the fused region on 2 threads."""
    threads = numba.get_num_threads()
    if threads < 2:
        pytest.skip("needs 2 threads")
    fused_model, fused = _step_buffers()
    fused_result = train_steps(*fused, 0, 12, 0, 2)
    model, buffers = _step_buffers()
    plan = region_plan(buffers[0], buffers[1], 2, np.bool_(True))
    sync = np.zeros(SYNC_WORDS, np.int64)
    results = np.zeros(RESULT_WORDS)
    start = model.params.copy()
    numba.set_num_threads(1)
    try:
        fused_steps(*buffers, 0, 12, 0, 2, plan, sync, results)
        assert sync[START] == ABORTED
        assert np.array_equal(model.params, start)  # nothing done
        assert not results.any()
        result = train_steps(*buffers, 0, 12, 0, 2)  # aborted, then regions
    finally:
        numba.set_num_threads(threads)
    assert result == fused_result
    assert result[3] == 0 and result[4] == 12  # all steps done
    assert np.array_equal(model.params, fused_model.params)
    assert not np.array_equal(model.params, start)
