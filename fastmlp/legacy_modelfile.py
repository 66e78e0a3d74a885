"""fastmlp's first model file format (".fmlp"), read so that old files still
load; `fastmlp-train --convert OLD NEW` rewrites one as safetensors.

Layout (all integers little-endian):

    bytes 0-7     magic b"FASTMLP\\0"
    bytes 8-11    format version (uint32), 1
    bytes 12-15   header length H (uint32), at most MAX_HEADER
    H bytes       header, UTF-8 JSON: layer_sizes, activation, dtype, init,
                  init_scale, optimizer (name, lr, momentum, nesterov,
                  weight_decay, updates) or null, training (epoch, step,
                  rng: NumPy PCG64 state) or null, and buffers:
                  [{"name", "count"}]
    buffers       raw little-endian values of the model's dtype, in header
                  order: params, then the optimizer's state vectors
    32 bytes      SHA-256 of everything before it

The size the header implies (computed with Python integers) is compared with
the real size before anything is allocated from it; the settings are then
checked as for the current format (`modelfile.build_model`).
"""
import hashlib
import json
import struct

import numpy as np

from .modelfile import Malformed, build_model, check_dtype, check_layer_sizes, require

MAGIC = b"FASTMLP\0"
VERSION = 1
MAX_HEADER = 1 << 24
DIGEST = 32
PREFIX = struct.Struct("<8sII")
STATE_VECTORS = {"sgd": 0, "momentum": 1, "adam": 2}


def dumps(model):
    """The bytes of model in the first format (for tests of the reader)."""
    dtype = model.dtype.newbyteorder("<")
    buffers = [("params", model.params)]
    opt = model.optimizer_state
    if opt is not None:
        buffers += [("state1", opt.state1), ("state2", opt.state2)]
    header = {
        "layer_sizes": list(model.layer_sizes), "activation": model.activation,
        "dtype": model.dtype.name, "init": model.init, "init_scale": model.init_scale,
        "optimizer": None if opt is None else {
            "name": opt.name, "lr": opt.settings[0], "momentum": opt.settings[1],
            "nesterov": opt.settings[2], "weight_decay": opt.settings[3],
            "updates": opt.updates},
        "training": None if model.training_state is None else {
            "epoch": model.training_state.epoch, "step": model.training_state.step,
            "rng": model.training_state.rng_state},
        "buffers": [{"name": name, "count": int(array.size)} for name, array in buffers],
    }
    header_bytes = json.dumps(header).encode()
    body = PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes
    body += b"".join(np.ascontiguousarray(a, dtype=dtype).tobytes() for _, a in buffers)
    return body + hashlib.sha256(body).digest()


def parse(data):
    require(len(data) >= PREFIX.size + DIGEST, f"too short ({len(data)} bytes)")
    magic, version, header_len = PREFIX.unpack_from(data)
    require(magic == MAGIC, "wrong magic number")
    require(version == VERSION, f"format version {version}, this fastmlp reads {VERSION}")
    require(header_len <= MAX_HEADER, f"header length {header_len} is absurd")
    require(PREFIX.size + header_len + DIGEST <= len(data), "truncated header")
    try:
        header = json.loads(data[PREFIX.size:PREFIX.size + header_len].decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Malformed("header is not valid JSON") from None
    require(isinstance(header, dict), "header is not a JSON object")
    sizes = check_layer_sizes(header.get("layer_sizes"))
    dtype = check_dtype(header.get("dtype"))
    n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))  # Python ints: no overflow
    opt = header.get("optimizer")
    expected = [("params", n_params)]
    if opt is not None:
        require(isinstance(opt, dict) and opt.get("name") in STATE_VECTORS, "bad optimizer")
        n_state = STATE_VECTORS[opt["name"]]
        expected += [("state1", n_params if n_state >= 1 else 0),
                     ("state2", n_params if n_state >= 2 else 0)]
    buffers = header.get("buffers")
    require(isinstance(buffers, list) and len(buffers) == len(expected), "bad buffer list")
    for entry, (name, count) in zip(buffers, expected):
        require(isinstance(entry, dict) and entry.get("name") == name
                and entry.get("count") == count, f"buffer {name} should hold {count} values")
    body = PREFIX.size + header_len
    size = body + sum(count for _, count in expected) * dtype.itemsize + DIGEST
    require(len(data) == size, f"the header describes {size} bytes, the file has {len(data)}")
    require(hashlib.sha256(data[:-DIGEST]).digest() == data[-DIGEST:],
            "checksum mismatch (the file is damaged)")
    arrays, offset = {}, body
    for name, count in expected:
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += count * dtype.itemsize
        require(np.isfinite(arrays[name]).all(), f"{name} holds NaN or inf")
    settings = {"model": {key: header.get(key) for key in ("layer_sizes", "activation", "dtype",
                                                           "init", "init_scale")},
                "optimizer": opt, "training": header.get("training"),
                "source": header.get("source"), "preprocessing": header.get("preprocessing")}
    state = [arrays[name] if name in arrays and arrays[name].size else None
             for name in ("state1", "state2")]
    return build_model(settings, arrays["params"], state)
