"""Model files: a pickle-free format that loading can check completely.

Layout (all integers little-endian):

    bytes 0-7     magic b"FASTMLP\\0"
    bytes 8-11    format version (uint32), 1
    bytes 12-15   header length H (uint32), at most MAX_HEADER
    H bytes       header, UTF-8 JSON: layer_sizes, activation, dtype, init,
                  init_scale, optimizer (name, lr, momentum, nesterov,
                  weight_decay, updates) or null, training (epoch, step, rng:
                  NumPy PCG64 state) or null, source (the training data: a
                  dataset's name, or the user's files with their SHA-256) or
                  null, preprocessing (for the user's files: feature columns,
                  their mean and scale, the missing-cell policy, the classes)
                  or null, and buffers: [{"name", "count"}]
    buffers       raw little-endian values of the model's dtype, in header
                  order: params, then the optimizer's state vectors
    32 bytes      SHA-256 of everything before it

Loading reads the file, checks the magic, version and header, computes the
expected size from the header with Python integers and compares it with the
real size before anything is allocated from the header, checks the digest,
the parameter count against the layer sizes, and that every value is finite.
Any failure is a ValueError naming the file. Writing is atomic: a temporary
file in the same directory, fsync, then os.replace.
"""
import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile

import numpy as np

MAGIC = b"FASTMLP\0"
VERSION = 1
MAX_HEADER = 1 << 24  # room for the scaling of ~400,000 features
DIGEST = 32
PREFIX = struct.Struct("<8sII")
MAX_LAYERS = 1000


def save(model, path):
    """Writes model (parameters, optimizer and training state) to path, atomically."""
    dtype = model.dtype.newbyteorder("<")
    buffers = [("params", model.params)]
    opt = model.optimizer_state
    if opt is not None:
        buffers += [("state1", opt.state1), ("state2", opt.state2)]
    header = {
        "layer_sizes": list(model.layer_sizes),
        "activation": model.activation,
        "dtype": model.dtype.name,
        "init": model.init,
        "init_scale": model.init_scale,
        "optimizer": None if opt is None else {
            "name": opt.name, "lr": opt.settings[0], "momentum": opt.settings[1],
            "nesterov": opt.settings[2], "weight_decay": opt.settings[3],
            "updates": opt.updates},
        "training": None if model.training_state is None else {
            "epoch": model.training_state.epoch, "step": model.training_state.step,
            "rng": model.training_state.rng_state},
        "source": model.source,
        "preprocessing": model.preprocessing,
        "buffers": [{"name": name, "count": int(array.size)} for name, array in buffers],
    }
    header_bytes = json.dumps(header, allow_nan=False).encode()
    if len(header_bytes) > MAX_HEADER:
        raise ValueError(f"{path}: the model's header needs {len(header_bytes)} bytes, more "
                         f"than the format's {MAX_HEADER}")
    body = [PREFIX.pack(MAGIC, VERSION, len(header_bytes)), header_bytes]
    body += [np.ascontiguousarray(array, dtype=dtype).tobytes() for _, array in buffers]
    digest = hashlib.sha256()
    for part in body:
        digest.update(part)
    atomic_write(path, body + [digest.digest()])


def atomic_write(path, parts):
    """Writes the byte strings `parts` to path so that a crash at any moment
    leaves either the old file or the new one, never a mix."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastmlp-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load(path):
    """Reads a model file written by save; returns an MLP with its optimizer
    and training state."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return loads(data, path)


def loads(data, name="<bytes>"):
    """The model held by the bytes of a model file (`name` for messages)."""
    try:
        return _parse(data)
    except _Malformed as exc:
        raise ValueError(f"{name}: not a valid fastmlp model file: {exc}") from None


class _Malformed(Exception):
    pass


def _require(condition, message):
    if not condition:
        raise _Malformed(message)


def _int(value, name, minimum=0):
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
             f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value, name):
    _require(isinstance(value, (int, float)) and not isinstance(value, bool)
             and math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0")
    return float(value)


def _parse(data):
    from .model import MLP
    from .training import OptimizerState, TrainingState
    from .optimizers import OPTIMIZERS
    from .kernels import ACTIVATIONS

    _require(len(data) >= PREFIX.size + DIGEST, f"too short ({len(data)} bytes)")
    magic, version, header_len = PREFIX.unpack_from(data)
    _require(magic == MAGIC, "wrong magic number")
    _require(version == VERSION, f"format version {version}, this fastmlp reads {VERSION}")
    _require(header_len <= MAX_HEADER, f"header length {header_len} is absurd")
    _require(PREFIX.size + header_len + DIGEST <= len(data), "truncated header")
    try:
        header = json.loads(data[PREFIX.size:PREFIX.size + header_len].decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Malformed("header is not valid JSON") from None
    _require(isinstance(header, dict), "header is not a JSON object")

    sizes = header.get("layer_sizes")
    _require(isinstance(sizes, list) and 2 <= len(sizes) <= MAX_LAYERS, "bad layer_sizes")
    for size in sizes:
        _int(size, "a layer size", minimum=1)
    _require(sizes[-1] >= 2, "the output layer needs at least 2 classes")
    _require(header.get("activation") in ACTIVATIONS, "unknown activation")
    _require(header.get("dtype") in ("float32", "float64"), "unknown dtype")
    _require(header.get("init") in ("normal", "xavier", "he"), "unknown init")
    init_scale = _number(header.get("init_scale"), "init_scale")
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))  # Python ints: no overflow

    opt = header.get("optimizer")
    expected = [("params", n_params)]
    if opt is not None:
        _require(isinstance(opt, dict) and opt.get("name") in OPTIMIZERS, "bad optimizer")
        _require(isinstance(opt.get("nesterov"), bool), "bad optimizer nesterov flag")
        lr, momentum, decay = (_number(opt.get(key), key) for key in ("lr", "momentum", "weight_decay"))
        _require(momentum <= 1, "momentum must be <= 1")
        updates = _int(opt.get("updates"), "optimizer updates")
        n_state = {"sgd": (0, 0), "momentum": (n_params, 0), "adam": (n_params, n_params)}[opt["name"]]
        expected += [("state1", n_state[0]), ("state2", n_state[1])]
    buffers = header.get("buffers")
    _require(isinstance(buffers, list) and len(buffers) == len(expected), "bad buffer list")
    for entry, (name, count) in zip(buffers, expected):
        _require(isinstance(entry, dict) and entry.get("name") == name and entry.get("count") == count,
                 f"buffer {name} should hold {count} values")

    body = PREFIX.size + header_len
    size = body + sum(count for _, count in expected) * dtype.itemsize + DIGEST
    _require(len(data) == size, f"the header describes {size} bytes, the file has {len(data)}")
    _require(hashlib.sha256(data[:-DIGEST]).digest() == data[-DIGEST:],
             "checksum mismatch (the file is damaged)")

    arrays, offset = {}, body
    for name, count in expected:
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += count * dtype.itemsize
        _require(np.isfinite(arrays[name]).all(), f"{name} holds NaN or inf")

    training = header.get("training")
    if training is not None:
        _require(isinstance(training, dict), "bad training state")
        progress = TrainingState()
        progress.epoch = _int(training.get("epoch"), "training epoch")
        progress.step = _int(training.get("step"), "training step")
        try:
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = training.get("rng")
            progress.rng_state = rng.bit_generator.state
        except (TypeError, ValueError, KeyError, OverflowError):
            raise _Malformed("bad random generator state") from None

    model = MLP(sizes, activation=header["activation"], dtype=header["dtype"],
                init=header["init"], init_scale=init_scale, seed=0)
    model.params[:] = arrays["params"]
    if opt is not None:
        state = OptimizerState(opt["name"], model.dtype, n_params, lr, momentum, opt["nesterov"], decay)
        state.state1[:] = arrays["state1"]
        state.state2[:] = arrays["state2"]
        state.updates = updates
        model.optimizer_state = state
    if training is not None:
        model.training_state = progress
    model.source = _source(header.get("source"))
    model.preprocessing = _preprocessing(header.get("preprocessing"), sizes)
    return model


SOURCE_KEYS = {"dataset", "data_dir", "data", "data_sha256", "target", "test", "test_sha256",
               "validation_split", "seed", "missing"}


def _source(source):
    if source is None:
        return None
    _require(isinstance(source, dict) and set(source) <= SOURCE_KEYS
             and ("dataset" in source) != ("data" in source), "bad source")
    for key, value in source.items():
        _require(value is None or isinstance(value, (str, int, float))
                 and not isinstance(value, bool), f"bad source {key}")
    for key in ("dataset", "data", "data_dir", "test"):
        _require(source.get(key) is None or isinstance(source[key], str), f"bad source {key}")
    if "data" in source:
        _require(source.get("missing") in ("error", "drop", "mean"), "bad source missing policy")
        split = source.get("validation_split")
        _require(split is None or isinstance(split, (int, float)) and 0 <= split < 1,
                 "bad source validation_split")
        _int(source.get("seed"), "source seed")
    return source


def _preprocessing(prep, sizes):
    if prep is None:
        return None
    keys = {"features", "target", "missing", "mean", "scale", "classes"}
    _require(isinstance(prep, dict) and set(prep) == keys, "bad preprocessing")
    n_features, n_classes = sizes[0], sizes[-1]
    for key in ("mean", "scale"):
        values = prep[key]
        _require(isinstance(values, list) and len(values) == n_features
                 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v) for v in values),
                 f"preprocessing {key} must hold {n_features} finite numbers")
    _require(all(v > 0 for v in prep["scale"]), "preprocessing scale must be > 0")
    names = prep["features"]
    _require(names is None or isinstance(names, list) and len(names) == n_features
             and all(isinstance(n, str) for n in names), "bad preprocessing features")
    _require(prep["target"] is None or isinstance(prep["target"], str), "bad preprocessing target")
    _require(prep["missing"] in ("error", "drop", "mean"), "bad preprocessing missing policy")
    classes = prep["classes"]
    _require(isinstance(classes, list) and len(classes) == n_classes
             and all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in classes)
             and len(set(classes)) == n_classes,
             f"preprocessing classes must be {n_classes} distinct labels")
    return prep
