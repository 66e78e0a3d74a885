"""Every kind of input trains to the same answer as a contiguous array (or is
refused clearly); predict is safe from several threads; memory-mapped data
trains without being read into memory."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sparse

import fastmlp
from fastmlp import datasets

from conftest import random_problem


def fit_params(X, y, dtype=np.float64):
    model = fastmlp.MLP([6, 5, 3], activation="tanh", dtype=dtype, seed=0)
    fastmlp.fit(model, X, y, epochs=2, batch_size=16, seed=0)
    return model.params


@pytest.fixture(scope="module")
def problem():
    _, X, y = random_problem([6, 5, 3], 100, "tanh", np.float64, seed=1)
    return X, y


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


VARIANTS = {
    "read-only": lambda X: read_only(X),
    "non-contiguous": lambda X: np.repeat(X, 2, axis=0)[::2],
    "column slice": lambda X: np.hstack([X, X])[:, :6],
    "Fortran order": np.asfortranarray,
    "big-endian": lambda X: X.astype(">f8"),
    "list": lambda X: X.tolist(),
    "pandas": pd.DataFrame,
    "SciPy CSR matrix": sparse.csr_matrix,
    "SciPy CSC array": sparse.csc_array,
    "SciPy COO matrix": sparse.coo_matrix,
}


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_every_input_kind_trains_like_the_contiguous_array(problem, kind):
    X, y = problem
    expected = fit_params(X, y)
    assert np.array_equal(fit_params(VARIANTS[kind](X), y), expected)
    for label_kind in (read_only, list, pd.Series, lambda v: v.astype(">i8")):
        assert np.array_equal(fit_params(X, label_kind(y)), expected)


def test_read_only_uint8_pixels(problem):
    _, y = problem
    pixels = np.random.default_rng(3).integers(0, 256, (100, 6), dtype=np.uint8)
    assert np.array_equal(fit_params(read_only(pixels), y), fit_params(pixels, y))


@pytest.mark.parametrize("bad,message", [
    (lambda X: X.astype(complex), "must be real"),
    (lambda X: X.astype(object), "must hold numbers"),
    (lambda X: pd.DataFrame(X).assign(extra="a"), "must hold numbers|features"),
])
def test_unusable_inputs_are_refused(problem, bad, message):
    X, y = problem
    with pytest.raises(ValueError, match=message):
        fit_params(bad(X), y)


def test_sparse_rows_predict_like_dense_ones(problem):
    X, y = problem
    X = np.where(np.abs(X) < 1, 0, X)  # a third nonzero
    model = fastmlp.MLP([6, 5, 3], activation="tanh", dtype=np.float64, seed=0)
    fastmlp.fit(model, sparse.csr_matrix(X), y, epochs=2, batch_size=16, seed=0)
    assert np.array_equal(model.params, fit_params(X, y))
    for make in (sparse.csr_matrix, sparse.csc_array, sparse.coo_matrix):
        assert np.array_equal(model.predict_proba(make(X)), model.predict_proba(X))
        assert model.evaluate(make(X), y) == model.evaluate(X, y)
    with pytest.raises(ValueError, match="has 4 features but the model expects 6"):
        model.predict(sparse.csr_matrix(X[:, :4]))


def test_sparse_rows_too_big_to_make_dense_are_refused(problem, monkeypatch):
    X, y = problem
    monkeypatch.setattr(fastmlp.validation, "available_memory", lambda: 2 * X.nbytes - 8)
    with pytest.raises(ValueError, match=r"sparse 100 x 6 matrix; fastmlp trains on dense rows"):
        fit_params(sparse.csr_matrix(X), y)
    monkeypatch.setattr(fastmlp.validation, "available_memory", lambda: 2 * X.nbytes)
    assert np.array_equal(fit_params(sparse.csr_matrix(X), y), fit_params(X, y))


def test_predict_from_many_threads_at_once():
    model, X, y = random_problem([30, 40, 5], 3000, "relu", np.float32, seed=2)
    inputs = [X[i::4] for i in range(4)]
    expected = [model.predict_proba(x) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            for repeat in range(15):
                results[(i, repeat)] = model.predict_proba(inputs[i])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 60
    for (i, _), got in results.items():
        assert np.array_equal(got, expected[i])


def test_memory_mapped_data_trains_like_memory_and_stays_on_disk(tmp_path):
    """In a child process (its own peak RSS): a 157 MB memory-mapped uint8
    dataset trains for an epoch with the peak RSS growing by a small part of
    that, and to the same parameters as the array read into memory."""
    rows = 200_000
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(tmp_path / "x_train.npy", mode="w+", dtype=np.uint8,
                                  shape=(rows, 784))
    for start in range(0, rows, 50_000):
        x[start:start + 50_000] = rng.integers(0, 256, (min(50_000, rows - start), 784),
                                               dtype=np.uint8)
    x.flush()
    del x
    datasets.drop_cached(tmp_path / "x_train.npy")  # as data larger than memory would be
    np.save(tmp_path / "y_train.npy", rng.integers(0, 10, rows).astype(np.uint8))
    np.save(tmp_path / "x_test.npy", np.zeros((10, 784), np.uint8))
    np.save(tmp_path / "y_test.npy", np.zeros(10, np.uint8))
    # peak RSS from VmHWM: getrusage's ru_maxrss would include the peak
    # inherited from this (large) parent process
    script = textwrap.dedent(f"""
        import numpy as np, fastmlp
        from fastmlp import datasets

        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

        x, y, _, _ = datasets.load_npy({str(tmp_path)!r})
        assert isinstance(x, np.memmap) and not x.flags.writeable
        model = fastmlp.MLP([784, 50, 10], seed=0)
        fastmlp.fit(model, x[:200], y[:200], epochs=1, seed=0)   # compile first
        before = peak()
        fastmlp.fit(model, x, y, epochs=1, batch_size=100, seed=0)
        after = peak()
        np.save({str(tmp_path / "params.npy")!r}, model.params)
        print(after - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.split()[-1])
    print(f"peak RSS growth {growth / 1e6:.1f} MB")
    data_bytes = rows * 784
    assert growth < data_bytes / 4, f"peak RSS grew by {growth / 1e6:.0f} MB for {data_bytes / 1e6:.0f} MB"
    # the same training from memory
    x, y, _, _ = datasets.load_npy(tmp_path)
    model = fastmlp.MLP([784, 50, 10], seed=0)
    fastmlp.fit(model, np.array(x[:200]), np.array(y[:200]), epochs=1, seed=0)
    fastmlp.fit(model, np.array(x), np.array(y), epochs=1, batch_size=100, seed=0)
    assert np.array_equal(np.load(tmp_path / "params.npy"), model.params)


def test_save_npy_round_trip(tmp_path):
    arrays = datasets.load("digits")
    paths = datasets.save_npy(arrays, tmp_path)
    assert [os.path.basename(p) for p in paths] == ["x_train.npy", "y_train.npy",
                                                     "x_test.npy", "y_test.npy"]
    for original, mapped in zip(arrays, datasets.load_npy(tmp_path)):
        assert isinstance(mapped, np.memmap) and np.array_equal(original, mapped)


def test_a_copy_on_write_map_keeps_its_changes(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (3000, 20), dtype=np.uint8))
    x = np.load(tmp_path / "x.npy", mmap_mode="c")
    x[::7] = 255  # changed in memory only
    changed = np.array(x)
    y = rng.integers(0, 3, 3000)
    model = fastmlp.MLP([20, 8, 3], seed=0)
    fastmlp.fit(model, x, y, epochs=2, batch_size=10, seed=0)
    assert np.array_equal(np.asarray(x), changed)
    reference = fastmlp.MLP([20, 8, 3], seed=0)
    fastmlp.fit(reference, changed, y, epochs=2, batch_size=10, seed=0)
    assert np.array_equal(model.params, reference.params)
