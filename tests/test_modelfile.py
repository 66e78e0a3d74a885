"""Model files: round trips, resume equality, atomic writes, and refusal of
every malformed file."""
import hashlib
import json
import os
import pickle
import struct

import numpy as np
import pytest

import fastmlp
from fastmlp import modelfile

from conftest import random_problem


def trained(optimizer="adam", epochs=1, seed=3):
    model, X, y = random_problem([9, 7, 4], 120, "tanh", np.float32, seed=seed)
    fastmlp.fit(model, X, y, epochs=epochs, batch_size=16, optimizer=optimizer, lr=0.01, seed=1)
    return model, X, y


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_round_trip_keeps_everything(tmp_path, optimizer):
    model, _, _ = trained(optimizer)
    path = tmp_path / "m.fmlp"
    model.save(path)
    loaded = fastmlp.load(path)
    assert loaded.layer_sizes == model.layer_sizes and loaded.activation == "tanh"
    assert loaded.dtype == model.dtype
    assert np.array_equal(loaded.params, model.params)
    a, b = model.optimizer_state, loaded.optimizer_state
    assert (b.name, b.settings, b.updates) == (a.name, a.settings, a.updates)
    assert np.array_equal(a.state1, b.state1) and np.array_equal(a.state2, b.state2)
    assert loaded.training_state.epoch == 1
    assert loaded.training_state.rng_state == model.training_state.rng_state


def test_an_untrained_model_round_trips(tmp_path):
    model = fastmlp.MLP([3, 2], dtype="float64", seed=0)
    model.save(tmp_path / "m")
    loaded = fastmlp.load(tmp_path / "m")
    assert np.array_equal(loaded.params, model.params)
    assert loaded.optimizer_state is None and loaded.training_state is None


def test_ten_epochs_equal_five_saved_loaded_and_five_more(tmp_path):
    straight, X, y = trained(epochs=10)
    first, _, _ = trained(epochs=5)
    first.save(tmp_path / "half")
    second = fastmlp.load(tmp_path / "half")
    fastmlp.fit(second, X, y, epochs=5, batch_size=16, optimizer="adam", lr=0.01)
    assert np.array_equal(straight.params, second.params)
    assert np.array_equal(straight.optimizer_state.state2, second.optimizer_state.state2)


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path, monkeypatch):
    model, _, _ = trained()
    path = tmp_path / "m.fmlp"
    model.save(path)
    before = path.read_bytes()
    model.params[0] += 1

    def crash(*args):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        model.save(path)
    assert path.read_bytes() == before  # the good file is untouched
    assert os.listdir(tmp_path) == ["m.fmlp"]


def rebuild(data, header_change=None, body=None):
    """A file with a modified header (digest recomputed), for cases a digest
    alone would catch."""
    _, version, hlen = modelfile.PREFIX.unpack_from(data)
    header = json.loads(data[16:16 + hlen])
    if header_change:
        header_change(header)
    hbytes = json.dumps(header).encode()
    rest = data[16 + hlen:-32] if body is None else body
    out = modelfile.PREFIX.pack(modelfile.MAGIC, version, len(hbytes)) + hbytes + rest
    return out + hashlib.sha256(out).digest()


def set_key(key, value):
    def change(header):
        header[key] = value
    return change


@pytest.mark.parametrize("make_bad,message", [
    (lambda d: b"", "too short"),
    (lambda d: b"NOTMLP\0\0" + d[8:], "wrong magic"),
    (lambda d: d[:8] + struct.pack("<I", 99) + d[12:], "format version 99"),
    (lambda d: d[:12] + struct.pack("<I", 2**31) + d[16:], "header length"),
    (lambda d: d[:12] + struct.pack("<I", len(d)) + d[16:], "truncated header"),
    (lambda d: d[:-1], "checksum|describes"),
    (lambda d: d[:len(d) - 100], "describes"),
    (lambda d: d + b"\0" * 8, "describes"),
    (lambda d: d[:-40] + bytes([d[-40] ^ 1]) + d[-39:], "checksum"),
    (lambda d: rebuild(d, set_key("layer_sizes", [9, 10**12, 4])), "should hold"),
    (lambda d: rebuild(d, set_key("layer_sizes", [9, -7, 4])), "layer size"),
    (lambda d: rebuild(d, set_key("layer_sizes", [9, 7, 1])), "2 classes"),
    (lambda d: rebuild(d, set_key("activation", "os.system")), "unknown activation"),
    (lambda d: rebuild(d, set_key("dtype", "object")), "unknown dtype"),
    (lambda d: rebuild(d, set_key("buffers", [{"name": "params", "count": 10**15}])), "buffer"),
    (lambda d: rebuild(d, set_key("training", {"epoch": 1, "step": 0, "rng": "x"})), "generator"),
    (lambda d: rebuild(d, set_key("optimizer", {
        "name": "adam", "lr": float("inf"), "momentum": 0.9, "nesterov": False,
        "weight_decay": 0.0, "updates": 1})), "lr"),
])
def test_malformed_files_raise_a_clear_value_error(tmp_path, make_bad, message):
    model, _, _ = trained()
    good = tmp_path / "good.fmlp"
    model.save(good)
    bad = tmp_path / "bad.fmlp"
    bad.write_bytes(make_bad(good.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        fastmlp.load(bad)
    assert "bad.fmlp" in str(info.value)


def test_non_finite_values_are_refused(tmp_path):
    model, _, _ = trained()
    model.params[5] = np.nan
    model.save(tmp_path / "nan.fmlp")
    with pytest.raises(ValueError, match="params holds NaN or inf"):
        fastmlp.load(tmp_path / "nan.fmlp")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


def test_a_pickle_is_refused_without_running_it(tmp_path):
    Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.fmlp"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match="evil.fmlp"):
        fastmlp.load(path)
    assert not Exploit.marker.exists()
    pickle.loads(path.read_bytes())  # the payload is real: unpickling runs it
    assert Exploit.marker.exists()
