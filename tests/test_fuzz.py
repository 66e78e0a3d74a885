"""Random mutations and truncations of valid IDX and model files: each one
loads to the same data or raises ValueError; nothing crashes, hangs or
allocates from an unchecked size. Bounded to seconds here; for a longer run:
FASTMLP_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py"""
import gzip
import os
import resource

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlp
from fastmlp import legacy_modelfile, modelfile
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
counts = {"idx": 0, "idx_refused": 0, "model": 0, "model_refused": 0}


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


def test_the_fuzzers_ran_and_refused():
    """Runs after the two fuzz tests (file order): they did try inputs and
    most mutations were refused."""
    assert counts["idx"] >= min(EXAMPLES, 100) and counts["model"] >= min(EXAMPLES, 100)
    assert counts["idx_refused"] > counts["idx"] // 2
    assert counts["model_refused"] > counts["model"] * 0.9
    print(f"fuzzed {counts}")
