"""Data-parallel training over MPI: mpiexec runs tests/mpi_worker.py (or
fastmlp-train --distributed) with 2 and 3 ranks on this machine, and the
result must be single-process training with the same global batch."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastmlp
from fastmlp import distributed
from fastmlp.step import shard

from conftest import relative_error
from mpi_worker import fit_kwargs, problem

WORKER = Path(__file__).with_name("mpi_worker.py")


def mpiexec():
    here = Path(sys.executable).with_name("mpiexec")
    found = str(here) if here.exists() else shutil.which("mpiexec")
    assert found, "mpiexec not found: pip install -e '.[test]' installs mpich"
    return found


def run_mpi(ranks, argv, timeout=240, **kwargs):
    return subprocess.run([mpiexec(), "-n", str(ranks)] + argv, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


class SharedNode:
    """A stand-in for an MPI communicator whose ranks on this machine all
    report the same cores (rank_threads' allgather)."""

    def __init__(self, ranks):
        self.ranks = ranks

    def Split_type(self, kind):
        return self

    def allgather(self, value):
        return [value] * self.ranks

    def Free(self):
        pass


@pytest.mark.parametrize("quota, threads", [(None, 4), (4, 2), (3, 1), (1, 1)])
def test_mpi_ranks_share_the_cores_and_the_cpu_quota(monkeypatch, quota, threads):
    """Two ranks on 8 cores get 4 threads each; under a CPU quota, half of
    it (at least 1)."""
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(distributed, "cpu_quota", lambda: quota)
    assert distributed.rank_threads(SharedNode(2)) == threads


def run_worker(ranks, config, tmp_path):
    out = tmp_path / f"result-{ranks}.npz"
    proc = run_mpi(ranks, [sys.executable, str(WORKER), json.dumps(config), str(out)])
    assert proc.returncode == 0, proc.stderr
    data = np.load(out)
    return data["params"], json.loads(str(data["results"]))


CONFIGS = {
    # 371 rows in batches of 37: the last batch has 1 row, so with 3 ranks
    # two shards of it are empty
    "sgd": dict(rows=371, sizes=[20, 16, 5], activation="sigmoid", optimizer="sgd", lr=0.5,
                batch_size=37, epochs=2),
    "nesterov-decay-weighted": dict(rows=300, sizes=[20, 24, 12, 4], activation="tanh",
                                    optimizer="momentum", nesterov=True, weight_decay=1e-3,
                                    weighted=True, batch_size=32, epochs=2),
    "adam-relu": dict(rows=257, sizes=[20, 30, 3], activation="relu", optimizer="adam",
                      batch_size=50, epochs=3),
    "adam-plateau": dict(rows=257, sizes=[20, 30, 3], activation="relu", optimizer="adam",
                         batch_size=50, epochs=3, plateau=True),
    "linear-head": dict(rows=203, sizes=[20, 16, 3], activation="tanh", optimizer="momentum",
                        lr=0.05, weighted=True, batch_size=40, epochs=2, output="linear"),
    "sigmoid-head": dict(rows=203, sizes=[20, 16, 4], activation="relu", optimizer="adam",
                         batch_size=40, epochs=2, output="sigmoid"),
    # shards of more than 128 rows (2 ranks) are summed by halves
    # (gradients.part_halves), as is the single process's batch of 300
    "halves": dict(rows=900, sizes=[40, 128, 2], activation="relu", optimizer="adam",
                   weight_decay=1e-3, batch_size=300, epochs=2, output="linear"),
}


def config_for(name, **changes):
    config = dict(CONFIGS[name], dtype="float64", data_seed=1, model_seed=2, shuffle_seed=3)
    config.update(changes)
    return config


def single_process(config):
    model, X, y, weights = problem(config)
    history = fastmlp.fit(model, X, y, sample_weight=weights, **fit_kwargs(config))
    return model.params, history


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mpi_training_equals_one_process(name, ranks, tmp_path):
    config = config_for(name)
    params, results = run_worker(ranks, config, tmp_path)
    expected, history = single_process(config)
    assert all("error" not in r for r in results), results
    # every rank ends with the very same parameters (rank 0's start was broadcast)
    for rank in range(1, ranks):
        assert np.array_equal(params[rank], params[0])
    assert relative_error(params[0], expected) < 1e-6
    assert not np.array_equal(params[0], problem(config)[0].params)  # it trained
    np.testing.assert_allclose(results[0]["loss"], history.history["loss"], rtol=1e-9)
    metric = "r2" if config.get("output") == "linear" else "accuracy"
    np.testing.assert_allclose(results[0]["score"], history.history[metric],
                               rtol=1e-9 if metric == "r2" else 0)
    if config.get("plateau"):
        assert history.history["lr"] == [0.001, 0.001, 0.0005]


def test_float32_ranks_agree_and_stay_close(tmp_path):
    config = config_for("adam-relu", dtype="float32")
    params, results = run_worker(2, config, tmp_path)
    assert np.array_equal(params[0], params[1])
    assert relative_error(params[0], single_process(config)[0]) < 1e-4


def test_ranks_on_one_machine_share_the_first_compile(tmp_path):
    # from an empty cache: rank 0 compiles forward_backward's region and the
    # transposes, rank 1 the gradients, and each loads the other's from the cache
    config = config_for("adam-relu")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    out = tmp_path / "result.npz"
    proc = run_mpi(2, [sys.executable, str(WORKER), json.dumps(config), str(out)], env=env,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = np.load(out)
    results = json.loads(str(data["results"]))
    assert [r["kernels"] for r in results] == [
        {"region": [1, 0], "gradients_region": [0, 1], "transpose_weights": [1, 0]},
        {"region": [0, 1], "gradients_region": [1, 0], "transpose_weights": [0, 1]}]
    assert np.array_equal(data["params"][0], data["params"][1])
    assert relative_error(data["params"][0], single_process(config)[0]) < 1e-6


def test_ranks_share_the_cores(tmp_path):
    _, results = run_worker(2, config_for("sgd", epochs=1), tmp_path)
    cores = len(os.sched_getaffinity(0))
    assert [r["threads"] for r in results] == [max(1, cores // 2)] * 2


def test_ranks_with_other_settings_all_fail_with_the_same_error(tmp_path):
    _, results = run_worker(2, config_for("sgd", mismatch=True), tmp_path)
    errors = {r.get("error") for r in results}
    assert len(errors) == 1
    error = errors.pop()
    assert error.startswith("ValueError: MPI ranks disagree on batch_size: rank 0 has 37, rank 1 "
                            "has 38")


@pytest.mark.parametrize("changes", [
    dict(lr=1e4),  # the loss overflows
    dict(lr=1.0, weight_decay=3.0, parameter_blowup=True),  # a parameter does: replayed
])
def test_divergence_stops_every_rank_at_the_same_step(changes, tmp_path):
    config = config_for("sgd", dtype="float32", activation="relu", **changes)
    params, results = run_worker(2, config, tmp_path)
    assert all(r.get("error", "").startswith("TrainingDiverged") for r in results), results
    assert results[0]["step"] == results[1]["step"]
    model, X, y, _ = problem(config)
    with pytest.raises(fastmlp.TrainingDiverged) as single:
        fastmlp.fit(model, X, y, **fit_kwargs(config))
    assert results[0]["step"] == single.value.step
    assert np.array_equal(params[0], params[1]) and np.isfinite(params[0]).all()
    assert relative_error(params[0], model.params) < 1e-4


# ---------------------------------------------------------------------------
# fastmlp-train --distributed

def train_command(*flags, resume=None):
    """fastmlp-train on digits: a new float64 64-32-10 tanh model trained with
    Adam, or the model resumed from a file."""
    command = [sys.executable, "-m", "fastmlp.cli", "--dataset", "digits", "--batch-size", "64"]
    if resume is None:
        command += ["--dtype", "float64", "--hidden", "32", "--activation", "tanh",
                    "--optimizer", "adam"]
    else:
        command += ["--resume", str(resume)]
    return command + list(flags)


def test_cli_distributed_equals_one_process_and_resumes(tmp_path):
    alone, split, resumed = (tmp_path / name for name in ("alone.fmlp", "split.fmlp", "r.fmlp"))
    single = subprocess.run(train_command("--epochs", "4", "--quiet", "--save", str(alone)),
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    two = run_mpi(2, train_command("--distributed", "--epochs", "4", "--save", str(split),
                                   "--history", str(tmp_path / "h.csv")))
    assert two.returncode == 0, two.stderr
    # rank 0 alone prints and writes
    assert two.stdout.count("Epoch 1/4") == 1 and two.stdout.count("Saved ") == 1
    assert "Distributed over 2 MPI ranks: 64 rows per step in all" in two.stdout
    assert len((tmp_path / "h.csv").read_text().splitlines()) == 5
    expected = fastmlp.load(alone).params
    assert relative_error(fastmlp.load(split).params, expected) < 1e-6
    # 2 epochs on 3 ranks, then resumed to 4 on 2 ranks
    first = run_mpi(3, train_command("--distributed", "--epochs", "2", "--quiet",
                                     "--save", str(resumed)))
    assert first.returncode == 0, first.stderr
    second = run_mpi(2, train_command("--distributed", "--epochs", "4", "--quiet",
                                      "--save", str(resumed), resume=resumed))
    assert second.returncode == 0, second.stderr
    model = fastmlp.load(resumed)
    assert model.training_state.epoch == 4
    assert relative_error(model.params, expected) < 1e-6


def test_cli_distributed_error_ends_every_rank(tmp_path):
    proc = run_mpi(2, train_command("--distributed", resume=tmp_path / "missing.fmlp"),
                   timeout=120)
    assert proc.returncode == 2
    assert "fastmlp-train: error: rank 0: [Errno 2] No such file or directory" in proc.stderr


def test_cli_distributed_interrupt_saves_once_and_resumes(tmp_path):
    path = tmp_path / "i.fmlp"
    flags = ["--distributed", "--epochs", "100000", "--quiet", "--save", str(path)]
    proc = subprocess.Popen([mpiexec(), "-n", "2"] + train_command(*flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "Distributed over" not in (proc.stdout.readline() or "") and time.monotonic() < deadline:
        pass
    time.sleep(3)  # well into training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("Interrupted; saved") == 1
    model = fastmlp.load(path)
    progress = model.training_state
    # stopped somewhere after the first step (even if the signal came while compiling)
    assert (progress.epoch, progress.step) > (0, 0) and progress.epoch < 100000
    assert model.optimizer_state.updates == progress.epoch * 23 + progress.step  # 23 steps an epoch


def test_distributed_without_mpi4py_says_what_to_install():
    code = ("import sys; sys.modules['mpi4py'] = None; from fastmlp.cli import main; "
            "sys.exit(main(['--dataset', 'digits', '--distributed']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--distributed: distributed training needs mpi4py" in proc.stderr
    assert "pip install 'fastmlp[mpi]'" in proc.stderr


def test_shards_cover_every_row_once():
    for nrows in (0, 1, 2, 5, 37, 128):
        for size in (1, 2, 3, 7):
            bounds = [shard(nrows, rank, size) for rank in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == nrows
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(size - 1))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def fake_allreduce(calls, error=0):
    """A C function with MPI_Allreduce's signature (handles 64 bits wide, as
    Open MPI's pointers; an int handle arrives in the low half): records its
    arguments and doubles the float64 values into the receive buffer."""
    import ctypes
    prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)

    def allreduce(send, receive, count, datatype, op, comm):
        calls.append((count, datatype & 0xFFFFFFFF, op & 0xFFFFFFFF, comm & 0xFFFFFFFF))
        values = (ctypes.c_double * count).from_address(send)
        out = (ctypes.c_double * count).from_address(receive)
        for i in range(count):
            out[i] = 2 * values[i]
        return error

    function = prototype(allreduce)
    return function, ctypes.cast(function, ctypes.c_void_p).value


@pytest.mark.parametrize("handle", [np.uint32, np.uint64])
def test_allreduce_reaches_the_library_with_its_handles(handle):
    import numba
    from fastmlp.collective import allreduce

    @numba.njit
    def call(address, send, receive, datatype, op, comm):
        return allreduce(address, send, receive, datatype, op, comm)

    calls = []
    function, address = fake_allreduce(calls)
    send, receive = np.arange(5, dtype=np.float64), np.zeros(5)
    assert call(address, send, receive, handle(7), handle(0x58000003), handle(0x44000000)) == 0
    assert calls == [(5, 7, 0x58000003, 0x44000000)]
    assert np.array_equal(receive, 2 * send)


def test_a_failed_allreduce_stops_training_with_its_error_code():
    # fit with a one-rank communicator whose MPI_Allreduce (a fake) fails
    from fastmlp import training
    from fastmlp.buffers import Batches
    calls = []
    function, address = fake_allreduce(calls, error=15)
    model = fastmlp.MLP([4, 3, 2], dtype="float64", seed=0)
    X, y = np.random.default_rng(0).standard_normal((40, 4)), np.arange(40) % 2

    def fake_batches(comm, batch_size, dtype, n_params):
        none = np.uint32(0)
        return Batches(batch_size, 0, 1, address, WTIME_ADDRESS, none, none, none,
                       np.empty(n_params + 3, dtype), np.zeros(3))

    class OneRank:  # what fit asks of a communicator
        rank, size = 0, 1

        def allgather(self, value):
            return [value]

        def bcast(self, value, root=0):
            return value

        def Bcast(self, array, root=0):
            pass

    original = training.distributed.mpi_batches, training.distributed.rank_threads
    training.distributed.mpi_batches = fake_batches
    training.distributed.rank_threads = lambda comm: 1
    try:
        with pytest.raises(RuntimeError, match="MPI_Allreduce failed at step 1 with MPI error "
                                               "code 15"):
            fastmlp.fit(model, X, y, batch_size=10, comm=OneRank())
    finally:
        training.distributed.mpi_batches, training.distributed.rank_threads = original
    assert calls and calls[0][0] == model.n_params + 3


def _wtime():
    import ctypes
    import time
    prototype = ctypes.CFUNCTYPE(ctypes.c_double)
    function = prototype(time.perf_counter)
    return function, ctypes.cast(function, ctypes.c_void_p).value


_WTIME, WTIME_ADDRESS = _wtime()
