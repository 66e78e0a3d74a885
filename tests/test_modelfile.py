"""Model files: round trips, resume equality, atomic writes, refusal of
every malformed file, in the safetensors format and in the first format,
which still loads."""
import copy
import hashlib
import json
import os
import pickle
import struct

import numpy as np
import pytest

import fastmlp
from fastmlp import legacy_modelfile, modelfile
from safetensors.numpy import load as safetensors_arrays
from safetensors.numpy import save as safetensors_bytes

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


def test_adams_constants_are_saved_and_resumed(tmp_path):
    model, X, y = random_problem([9, 7, 4], 120, "tanh", np.float32, seed=3)
    straight = copy.deepcopy(model)
    adam = dict(optimizer="adam", lr=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-4)
    fastmlp.fit(straight, X, y, epochs=4, batch_size=16, seed=1, **adam)
    fastmlp.fit(model, X, y, epochs=2, batch_size=16, seed=1, **adam)
    model.save(tmp_path / "m")
    loaded = fastmlp.load(tmp_path / "m")
    assert loaded.optimizer_state.settings == (0.01, 0.9, False, 0.0, 0.8, 0.99, 1e-4)
    fastmlp.fit(loaded, X, y, epochs=2, batch_size=16, **adam)
    assert np.array_equal(loaded.params, straight.params)
    # a file written before the constants were saved has Keras's
    arrays, metadata = tensors_and_metadata((tmp_path / "m").read_bytes())
    optimizer = json.loads(metadata["optimizer"])
    for key in ("beta_1", "beta_2", "epsilon"):
        del optimizer[key]
    metadata["optimizer"] = json.dumps(optimizer)
    (tmp_path / "old").write_bytes(resigned(arrays, metadata))
    assert fastmlp.load(tmp_path / "old").optimizer_state.settings[4:] == (0.9, 0.999, 1e-7)


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


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_gives(tmp_path, umask, mode):
    """Not mkstemp's 0o600: a model, history or plot others may read; a file
    replaced keeps its own mode."""
    model, X, y = trained()
    history = fastmlp.fit(model, X, y, epochs=1, seed=0)
    previous = os.umask(umask)
    try:
        model.save(tmp_path / "m.safetensors")
        history.save(tmp_path / "h.csv")
        (tmp_path / "kept.safetensors").write_bytes(b"old")
        os.chmod(tmp_path / "kept.safetensors", 0o640)
        model.save(tmp_path / "kept.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == mode
    assert (tmp_path / "h.csv").stat().st_mode & 0o777 == mode
    assert (tmp_path / "kept.safetensors").stat().st_mode & 0o777 == 0o640
    assert fastmlp.load(tmp_path / "kept.safetensors").params.tobytes() == model.params.tobytes()
    assert sorted(os.listdir(tmp_path)) == ["h.csv", "kept.safetensors", "m.safetensors"]


def rebuild(data, header_change=None, body=None):
    """A file with a modified header (digest recomputed), for cases a digest
    alone would catch."""
    _, version, hlen = legacy_modelfile.PREFIX.unpack_from(data)
    header = json.loads(data[16:16 + hlen])
    if header_change:
        header_change(header)
    hbytes = json.dumps(header).encode()
    rest = data[16 + hlen:-32] if body is None else body
    out = legacy_modelfile.PREFIX.pack(legacy_modelfile.MAGIC, version, len(hbytes)) + hbytes + rest
    return out + hashlib.sha256(out).digest()


def set_key(key, value):
    def change(header):
        header[key] = value
    return change


@pytest.mark.parametrize("make_bad,message", [
    (lambda d: b"", "too short"),
    (lambda d: b"NOTMLP\0\0" + d[8:], "not a safetensors file"),
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
def test_malformed_legacy_files_raise_a_clear_value_error(tmp_path, make_bad, message):
    model, _, _ = trained()
    good = tmp_path / "good.fmlp"
    good.write_bytes(legacy_modelfile.dumps(model))
    bad = tmp_path / "bad.fmlp"
    bad.write_bytes(make_bad(good.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        fastmlp.load(bad)
    assert "bad.fmlp" in str(info.value)


def test_non_finite_values_are_refused(tmp_path):
    model, _, _ = trained()
    model.params[5] = np.nan
    model.save(tmp_path / "nan.fmlp")
    with pytest.raises(ValueError, match="0.weight holds NaN or inf"):
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


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_legacy_files_still_load_and_convert(tmp_path, optimizer, capsys):
    from fastmlp.cli import main
    model, X, y = trained(optimizer)
    old = tmp_path / "old.fmlp"
    old.write_bytes(legacy_modelfile.dumps(model))
    for loaded in (fastmlp.load(old), None):
        if loaded is None:
            assert main(["--convert", str(old), str(tmp_path / "new.safetensors")]) == 0
            loaded = fastmlp.load(tmp_path / "new.safetensors")
            assert (tmp_path / "new.safetensors").read_bytes()[8:9] == b"{"  # safetensors
        assert np.array_equal(loaded.params, model.params)
        a, b = model.optimizer_state, loaded.optimizer_state
        assert (b.name, b.settings, b.updates) == (a.name, a.settings, a.updates)
        assert np.array_equal(a.state1, b.state1) and np.array_equal(a.state2, b.state2)
        assert loaded.training_state.rng_state == model.training_state.rng_state


def tensors_and_metadata(data):
    length = int.from_bytes(data[:8], "little")
    return safetensors_arrays(data), json.loads(data[8:8 + length])["__metadata__"]


def resigned(arrays, metadata):
    """A safetensors file of these tensors and metadata with a correct digest,
    for cases the digest alone would catch."""
    metadata = dict(metadata)
    metadata["sha256"] = modelfile.digest(arrays, metadata)
    return safetensors_bytes(arrays, metadata=metadata)


def change_setting(key, field, value):
    def change(data):
        arrays, metadata = tensors_and_metadata(data)
        setting = json.loads(metadata[key])
        setting[field] = value
        metadata[key] = json.dumps(setting)
        return resigned(arrays, metadata)
    return change


def change_tensor(name, value):
    def change(data):
        arrays, metadata = tensors_and_metadata(data)
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays[name])
        return resigned(arrays, metadata)
    return change


@pytest.mark.parametrize("make_bad,message", [
    (lambda d: b"", "too short"),
    (lambda d: d[:len(d) // 2], "not a safetensors file"),
    (lambda d: (10**15).to_bytes(8, "little") + d[8:], "not a safetensors file"),
    (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], "checksum"),
    (lambda d: d.replace(b'\\"tanh\\"', b'\\"relu\\"'), "checksum"),
    (lambda d: safetensors_bytes(safetensors_arrays(d)), "no fastmlp metadata"),
    (change_setting("model", "layer_sizes", [9, 10**12, 4]), "should be|should have shape"),
    (change_setting("model", "layer_sizes", [9, 7, 1]), "2 classes"),
    (change_setting("model", "activation", "os.system"), "unknown activation"),
    (change_setting("model", "dtype", "float64"), "should hold float64"),
    (change_setting("training", "rng", "x"), "generator"),
    (change_setting("optimizer", "lr", -1), "lr"),
    (change_setting("optimizer", "beta_2", 1.0), "bad Adam betas or epsilon"),
    (change_setting("optimizer", "epsilon", 0), "bad Adam betas or epsilon"),
    (change_setting("optimizer", "name", "sgd"), "tensors should be"),
    (change_tensor("2.weight", lambda w: w[:, :3].copy()), "should have shape"),
    (change_tensor("2.bias", None), "tensors should be"),
    (change_tensor("0.bias", lambda b: b.astype(np.float64)), "should hold float32"),
    (change_tensor("0.weight", lambda w: np.full_like(w, np.inf)), "NaN or inf"),
])
def test_malformed_files_raise_a_clear_value_error(tmp_path, make_bad, message):
    model, _, _ = trained()
    good = tmp_path / "good.safetensors"
    model.save(good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(make_bad(good.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        fastmlp.load(bad)
    assert "bad.safetensors" in str(info.value)


def test_five_thousand_mutated_files_raise_only_value_error(tmp_path):
    model, _, _ = trained()
    model.save(tmp_path / "good.safetensors")
    original = (tmp_path / "good.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(5000):
        data = bytearray(original)
        kind = rng.integers(3)
        if kind == 0:
            data = data[:rng.integers(len(data))]
        for _ in range(rng.integers(1, 6) if kind else 0):
            data[rng.integers(len(data))] = rng.integers(256)
        try:
            loaded = modelfile.loads(bytes(data), "m.safetensors")
        except ValueError as exc:
            assert "m.safetensors" in str(exc)
            refused += 1
            continue
        # what loads is the model itself (a mutation of JSON whitespace, say)
        assert np.array_equal(loaded.params, model.params)
        assert modelfile.header(loaded) == modelfile.header(model)
    assert refused > 4500


def test_the_tensors_load_into_a_pytorch_sequential(tmp_path):
    import torch  # scripts/setup.sh installs it
    from safetensors.torch import load_file
    model, X, _ = trained()  # 9-7-4 tanh, trained with Adam
    model.save(tmp_path / "m.safetensors")
    sequential = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(),
                                     torch.nn.Linear(7, 4), torch.nn.Softmax(dim=1))
    tensors = load_file(tmp_path / "m.safetensors")
    names = sequential.state_dict().keys()
    sequential.load_state_dict({name: tensors[name] for name in names})
    with torch.no_grad():
        torch_proba = sequential(torch.from_numpy(np.asarray(X, np.float32))).numpy()
    assert np.abs(torch_proba - model.predict_proba(X)).max() < 1e-6
    assert np.abs(torch_proba - 0.25).max() > 0.05  # a model that has learnt something
