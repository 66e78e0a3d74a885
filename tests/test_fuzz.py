"""Random mutations and truncations of valid IDX and model files: each one
loads to the same data or raises ValueError; nothing crashes, hangs or
allocates from an unchecked size. Random CSV files read to the same table
(or error) with pyarrow's reader and without. Bounded to seconds here; for
a longer run: FASTMLP_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py"""
import gzip
import os
import resource

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlp
from fastmlp import legacy_modelfile, modelfile, tabular
from fastmlp.datasets import load_idx

from conftest import random_problem
from test_datasets import idx_bytes

EXAMPLES = int(os.environ.get("FASTMLP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# A loader that believed a mutated size would ask for far more than this.
MEMORY_LIMIT = 4 << 30


def mutated(data, draw):
    """A random truncation, byte overwrites, or both."""
    data = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "overwrite", "both", "insert"]))
    if kind in ("truncate", "both"):
        data = data[:draw(st.integers(0, len(data)))]
    if kind in ("overwrite", "both") and data:
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    if kind == "insert":
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.fixture(scope="module", autouse=True)
def limited_memory():
    """An allocation from an unchecked header size would fail loudly here
    (MemoryError, not a ValueError) instead of swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _address_space()
    resource.setrlimit(resource.RLIMIT_AS, (current + MEMORY_LIMIT, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


IDX_ARRAY = np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7)
IDX_PLAIN = idx_bytes(IDX_ARRAY)
IDX_GZ = gzip.compress(IDX_PLAIN)
counts = {"idx": 0, "idx_refused": 0, "model": 0, "model_refused": 0, "csv": 0,
          "csv_arrays": 0}


@FUZZ
@given(data=st.data(), compressed=st.booleans())
def test_mutated_idx_files(tmp_path_factory, data, compressed):
    original = IDX_GZ if compressed else IDX_PLAIN
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if compressed else "f.idx")
    content = mutated(original, data.draw)
    path.write_bytes(content)
    counts["idx"] += 1
    try:
        loaded = load_idx(path)
    except ValueError:
        counts["idx_refused"] += 1
        return
    # accepted: it must be a well-formed IDX file describing what it holds
    raw = gzip.decompress(content) if compressed else content
    assert raw[:2] == b"\0\0" and loaded.size * loaded.itemsize == len(raw) - 4 - 4 * raw[3]
    if raw == IDX_PLAIN:
        assert np.array_equal(loaded, IDX_ARRAY)


MODEL, _, _ = random_problem([6, 5, 3], 40, "tanh", np.float32, seed=0)
fastmlp.fit(MODEL, *random_problem([6, 5, 3], 40, "tanh", np.float32, seed=0)[1:],
            epochs=1, batch_size=8, optimizer="adam", seed=0)


@FUZZ
@given(data=st.data())
def test_mutated_model_files(tmp_path_factory, data):
    """Both formats: safetensors, and the first one, which still loads."""
    directory = tmp_path_factory.mktemp("model")
    legacy = data.draw(st.booleans())
    original = legacy_modelfile.dumps(MODEL) if legacy else modelfile.dumps(MODEL)
    content = mutated(original, data.draw)
    path = directory / "m.model"
    path.write_bytes(content)
    counts["model"] += 1
    try:
        loaded = fastmlp.load(path)
    except ValueError as exc:
        assert "m.model" in str(exc)
        counts["model_refused"] += 1
        return
    # the digests cover every value: what loads is the model itself (the
    # first format's covers every byte)
    assert content == original or not legacy
    assert np.array_equal(loaded.params, MODEL.params)
    assert modelfile.header(loaded) == modelfile.header(MODEL)


# cells that Python's int()/float(), NumPy and pyarrow could read apart
CELLS = ["1", "2.5", "-3", "+4", ".5", "5.", "1e3", "1E-2", "-0.0", "nan", "NaN", "inf",
         "-Infinity", "", "NA", "?", " 1", "1 ", "1_0", "0x1", "\u0661", "99999999999999999999",
         "cat", "true", "2020-01-01", '"1"', '"a,b"', "\t2", "0X1F", "nan(1)", "1e400", "1e-400",
         "INF", "+nan", "0b1", "1.5.2", "1e", "e1", "1d3", "01", "-0"]
NUMBERS = ["0", "1", "7", "-12", "+4", "2.5", ".5", "5.", "-0.0", "1e3", "1E-2", "3.25e-5",
           "inf", "123456789012345678"]


def read_or_error(path):
    try:
        table = tabular.read_table(path, "y")
    except tabular.DataError as exc:
        return str(exc)
    return table.names, table.features, table.target


@FUZZ
@given(data=st.data())
def test_csv_reads_alike_with_and_without_pyarrow(tmp_path_factory, data):
    # per column: numbers (which pyarrow parses), or anything
    columns = [st.sampled_from(NUMBERS) if data.draw(st.booleans()) else
               st.one_of(st.sampled_from(CELLS), st.text("0123456789.-+eE", max_size=4))
               for _ in range(3)]
    n_rows = data.draw(st.integers(0, 6))
    rows = [[data.draw(column) for column in columns] for _ in range(n_rows)]
    if rows and data.draw(st.integers(0, 4)) == 0:  # a row of another width
        rows[data.draw(st.integers(0, n_rows - 1))].pop()
    end = data.draw(st.sampled_from(["\n", "\r\n"]))
    text = end.join(["a,b,y"] + [",".join(row) for row in rows]) + end
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_text(text, newline="")
    counts["csv"] += 1
    fast = tabular.read_csv_arrow(path)
    if fast is not None and any(isinstance(c, np.ndarray) for c in fast[1]):
        counts["csv_arrays"] += 1
    answer = read_or_error(path)
    original = tabular.read_csv_arrow
    tabular.read_csv_arrow = lambda path: None
    try:
        careful = read_or_error(path)
    finally:
        tabular.read_csv_arrow = original
    if isinstance(careful, str) or isinstance(answer, str):
        assert answer == careful, text
        return
    assert answer[0] == careful[0], text
    np.testing.assert_array_equal(answer[1], careful[1], err_msg=text)
    assert answer[2].dtype == careful[2].dtype and answer[2].tolist() == careful[2].tolist(), text


def test_the_fuzzers_ran_and_refused():
    """Runs after the two fuzz tests (file order): they did try inputs and
    most mutations were refused."""
    assert counts["idx"] >= min(EXAMPLES, 100) and counts["model"] >= min(EXAMPLES, 100)
    assert counts["idx_refused"] > counts["idx"] // 2
    assert counts["model_refused"] > counts["model"] * 0.9
    # some random CSV files had columns that pyarrow's reader parsed
    assert counts["csv"] == 0 or counts["csv_arrays"] >= counts["csv"] // 20
    print(f"fuzzed {counts}")
