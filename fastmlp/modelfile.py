"""Model files: safetensors, which PyTorch, JAX, Hugging Face and others read.

Tensors, little-endian, in the model's dtype:

    "0.weight" (fan_out, fan_in), "0.bias" (fan_out,), "2.weight", ...
        the dense layers under the names of PyTorch's nn.Sequential of Linear
        layers with an activation module between them (layer l is "2l")
    "optimizer.state1", "optimizer.state2"
        the optimizer's state vectors, laid out like the flat parameters
        (velocity, or Adam's m and v), for the optimizers that keep them

The string-to-string `__metadata__` holds JSON values: "fastmlp" (the format
version), "model" (layer_sizes, activation, output, flat_targets, dtype,
init, init_scale),
"optimizer", "training", "source", "preprocessing" (see `build_model`), and
"sha256", the digest of every tensor's name and bytes and of every other
metadata entry, in name order.

safetensors' own loader (Rust, fuzzed by its maintainers) checks that the
header's offsets fit the file before anything is read from it, so no size in
a file can make fastmlp allocate more than the file holds. Loading then
checks the tensor names, shapes and dtypes against the layer sizes, the
digest, and that every value is finite. Any failure is a ValueError naming
the file; nothing in a file is ever executed. Writing is atomic: a temporary
file in the same directory, fsync, then os.replace.

Files of fastmlp's first format (magic "FASTMLP\\0") still load, through
`legacy_modelfile`.
"""
import hashlib
import json
import math
import os

import numpy as np

from .files import atomic_write
from .tabular import MISSING as MISSING_POLICIES
from .tabular import input_widths

FORMAT_VERSION = "2"
MAX_LAYERS = 1000
MAX_METADATA = 1 << 24  # bytes of JSON: room for the scaling of ~400,000 features
INITS = ("normal", "xavier", "he")
SOURCE_KEYS = {"dataset", "data_dir", "data", "data_sha256", "target", "test", "test_sha256",
               "validation_split", "seed", "missing", "ignore", "class_weight"}


def layer_name(l):
    """The nn.Sequential index of dense layer l (activations sit between)."""
    return str(2 * l)


def tensors(model):
    """{name: array}: the file's tensors for model."""
    out = {}
    for l, (w, b) in enumerate(zip(model.weights, model.biases)):
        out[f"{layer_name(l)}.weight"] = np.ascontiguousarray(w.T)  # (fan_out, fan_in)
        out[f"{layer_name(l)}.bias"] = np.ascontiguousarray(b)
    opt = model.optimizer_state
    if opt is not None and opt.state1.size:
        out["optimizer.state1"] = opt.state1
    if opt is not None and opt.state2.size:
        out["optimizer.state2"] = opt.state2
    little = model.dtype.newbyteorder("<")
    return {name: np.ascontiguousarray(a, dtype=little) for name, a in out.items()}


def digest(arrays, metadata):
    """SHA-256 of every tensor's name and bytes and every metadata entry but
    the digest itself, in name order."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode() + b"\0")
        sha.update(np.ascontiguousarray(arrays[name]).astype(
            arrays[name].dtype.newbyteorder("<")).tobytes())
    for key in sorted(metadata):
        if key != "sha256":
            sha.update(f"{key}\0{metadata[key]}\0".encode())
    return sha.hexdigest()


def header(model):
    """The settings saved with a model, as one JSON-ready dict."""
    opt, progress = model.optimizer_state, model.training_state
    return {
        "model": {"layer_sizes": list(model.layer_sizes), "activation": model.activation,
                  "output": model.output, "flat_targets": model.flat_targets,
                  "dtype": model.precision, "init": model.init, "init_scale": model.init_scale},
        "optimizer": None if opt is None else {
            "name": opt.name, "lr": opt.settings[0], "momentum": opt.settings[1],
            "nesterov": opt.settings[2], "weight_decay": opt.settings[3],
            "beta_1": opt.settings[4], "beta_2": opt.settings[5], "epsilon": opt.settings[6],
            "updates": opt.updates, "schedule": schedule_json(opt.schedule)},
        "training": None if progress is None else {
            "epoch": progress.epoch, "step": progress.step, "batch_size": progress.batch_size,
            "rng": progress.rng_state},
        "source": model.source,
        "preprocessing": model.preprocessing,
    }


def dumps(model):
    """The bytes of model's file."""
    from safetensors.numpy import save as safetensors_bytes
    arrays = tensors(model)
    metadata = {key: json.dumps(value, allow_nan=False) for key, value in header(model).items()}
    size = sum(len(v) for v in metadata.values())
    if size > MAX_METADATA:
        raise ValueError(f"the model's settings need {size} bytes of metadata, more than the "
                         f"{MAX_METADATA} a model file may hold")
    metadata["fastmlp"] = FORMAT_VERSION
    metadata["sha256"] = digest(arrays, metadata)
    return safetensors_bytes(arrays, metadata=metadata)


def save(model, path):
    """Writes model (parameters, optimizer and training state) to path, atomically."""
    atomic_write(path, [dumps(model)])


def load(path):
    """Reads a model file written by save (or by fastmlp's first format);
    returns an MLP with its optimizer and training state."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return loads(data, path)


def loads(data, name="<bytes>"):
    """The model held by the bytes of a model file (`name` for messages)."""
    from . import legacy_modelfile
    try:
        if data[:len(legacy_modelfile.MAGIC)] == legacy_modelfile.MAGIC:
            return legacy_modelfile.parse(data)
        return parse(data)
    except Malformed as exc:
        raise ValueError(f"{name}: not a valid fastmlp model file: {exc}") from None


class Malformed(Exception):
    pass


def require(condition, message):
    if not condition:
        raise Malformed(message)


def parse(data):
    from safetensors import SafetensorError
    from safetensors.numpy import load as safetensors_arrays

    require(len(data) >= 8, f"too short ({len(data)} bytes)")
    try:
        arrays = safetensors_arrays(bytes(data))
        metadata = read_metadata(data)
    except (SafetensorError, ValueError, TypeError, OverflowError, UnicodeDecodeError,
            RecursionError) as exc:
        raise Malformed(f"not a safetensors file ({str(exc)[:200]})") from None
    if not (isinstance(metadata, dict) and metadata.get("fastmlp") == FORMAT_VERSION):
        torch_like = any(name.endswith(".weight") for name in arrays)
        raise Malformed("no fastmlp metadata of format version " + FORMAT_VERSION + (
            "; for a PyTorch state dict, load it into its nn.Sequential and take "
            "fastmlp.MLP.from_torch(sequential)" if torch_like else ""))
    settings = {}
    for key in ("model", "optimizer", "training", "source", "preprocessing"):
        text = metadata.get(key)
        require(isinstance(text, str) and len(text) <= MAX_METADATA, f"no {key} metadata")
        try:
            settings[key] = json.loads(text)
        except (ValueError, RecursionError):
            raise Malformed(f"{key} metadata is not valid JSON") from None
    model = settings["model"]
    require(isinstance(model, dict), "bad model metadata")
    sizes = check_layer_sizes(model.get("layer_sizes"), model.get("output", "softmax"))
    dtype = check_dtype(model.get("dtype"))
    n_layers = len(sizes) - 1
    expected = {}
    for l in range(n_layers):
        expected[f"{layer_name(l)}.weight"] = (sizes[l + 1], sizes[l])
        expected[f"{layer_name(l)}.bias"] = (sizes[l + 1],)
    n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    opt = settings["optimizer"]
    if isinstance(opt, dict):
        n_state = {"sgd": 0, "momentum": 1, "adam": 2}.get(opt.get("name"), 0)
        for k in range(1, n_state + 1):
            expected[f"optimizer.state{k}"] = (n_params,)
    require(set(arrays) == set(expected), f"the tensors should be {sorted(expected)}, the file "
            f"has {sorted(arrays)[:20]}")
    for tensor_name, shape in expected.items():
        array = arrays[tensor_name]
        require(array.shape == shape, f"tensor {tensor_name} should have shape {shape}, it has "
                f"{array.shape}")
        require(array.dtype == dtype, f"tensor {tensor_name} should hold {dtype.name}, it holds "
                f"{array.dtype.name}")
        require(np.isfinite(array).all(), f"{tensor_name} holds NaN or inf")
    require(all(isinstance(v, str) for v in metadata.values()), "bad metadata")
    require(metadata.get("sha256") == digest(arrays, metadata),
            "checksum mismatch (the file is damaged)")
    params = np.concatenate([arrays[f"{layer_name(l)}.{part}"].ravel()
                             for l in range(n_layers) for part in ("weight", "bias")])
    state = [arrays.get(f"optimizer.state{k}") for k in (1, 2)]
    return build_model(settings, params, state)


def read_metadata(data):
    """The __metadata__ map of safetensors bytes (the loader checked the header)."""
    length = int.from_bytes(data[:8], "little")
    require(8 + length <= len(data), "truncated header")
    return json.loads(bytes(data[8:8 + length]).decode()).get("__metadata__")


def integer(value, name, minimum=0):
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def number(value, name):
    require(isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0")
    return float(value)


def check_layer_sizes(sizes, output="softmax"):
    require(isinstance(sizes, list) and 2 <= len(sizes) <= MAX_LAYERS, "bad layer_sizes")
    for size in sizes:
        integer(size, "a layer size", minimum=1)
    require(output != "softmax" or sizes[-1] >= 2, "the output layer needs at least 2 classes")
    return sizes


def check_dtype(name):
    # the tensors' dtype for a model's dtype setting
    require(name in ("float32", "float64", "bfloat16"), "unknown dtype")
    return np.dtype("float32" if name == "bfloat16" else name).newbyteorder("<")


def build_model(settings, params, state):
    """The MLP that settings (the JSON values of `header`) and its arrays
    describe, every setting checked: params is the flat parameter vector,
    state the optimizer's two state vectors (None where it keeps none)."""
    from .kernels import ACTIVATIONS
    from .model import MLP
    from .optimizers import ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, OPTIMIZERS
    from .state import OptimizerState, TrainingState

    from .heads import HEADS
    spec = settings["model"]
    require(isinstance(spec, dict), "bad model settings")
    output = spec.get("output", "softmax")  # files of fastmlp 0.1 have no other head
    require(output in HEADS, "unknown output head")
    sizes = check_layer_sizes(spec.get("layer_sizes"), output)
    require(spec.get("activation") in ACTIVATIONS, "unknown activation")
    check_dtype(spec.get("dtype"))
    require(spec.get("init") in INITS, "unknown init")
    init_scale = number(spec.get("init_scale"), "init_scale")
    n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    require(params.size == n_params, f"params should hold {n_params} values")

    model = MLP(sizes, activation=spec["activation"], dtype=spec["dtype"], init=spec["init"],
                init_scale=init_scale, seed=0, output=output)
    model.params[:] = params
    flat = spec.get("flat_targets", model.flat_targets)
    require(isinstance(flat, bool), "bad flat_targets")
    model.flat_targets = flat
    opt = settings["optimizer"]
    if opt is not None:
        require(isinstance(opt, dict) and opt.get("name") in OPTIMIZERS, "bad optimizer")
        require(isinstance(opt.get("nesterov"), bool), "bad optimizer nesterov flag")
        lr, momentum, decay = (number(opt.get(key), key) for key in ("lr", "momentum",
                                                                     "weight_decay"))
        require(momentum <= 1, "momentum must be <= 1")
        # Adam's constants (files written before they were settings: Keras's)
        adam = [number(opt.get(key, default), key) for key, default in
                (("beta_1", ADAM_BETA1), ("beta_2", ADAM_BETA2), ("epsilon", ADAM_EPSILON))]
        require(max(adam[:2]) < 1 and adam[2] > 0, "bad Adam betas or epsilon")
        updates = integer(opt.get("updates"), "optimizer updates")
        optimizer = OptimizerState(opt["name"], model.dtype, n_params, lr, momentum,
                                   opt["nesterov"], decay, *adam)
        for target, values in zip((optimizer.state1, optimizer.state2), state):
            require((values is None and target.size == 0) or
                    (values is not None and values.size == target.size),
                    f"the {opt['name']} optimizer's state does not fit the model")
            if values is not None:
                target[:] = values
        optimizer.updates = updates
        optimizer.schedule = check_schedule(opt.get("schedule"))
        model.optimizer_state = optimizer
    training = settings["training"]
    if training is not None:
        require(isinstance(training, dict), "bad training state")
        progress = TrainingState()
        progress.epoch = integer(training.get("epoch"), "training epoch")
        progress.step = integer(training.get("step"), "training step")
        if training.get("batch_size") is not None:  # files of fastmlp 0.1 have none
            progress.batch_size = integer(training["batch_size"], "training batch_size", 1)
        try:
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = training.get("rng")
            progress.rng_state = rng.bit_generator.state
        except (TypeError, ValueError, KeyError, OverflowError):
            raise Malformed("bad random generator state") from None
        model.training_state = progress
    model.source = check_source(settings.get("source"))
    model.preprocessing = check_preprocessing(settings.get("preprocessing"), sizes)
    return model


def schedule_json(schedule):
    if schedule is None:
        return None
    return {"name": "callable"} if schedule == "callable" else schedule.to_json()


def check_schedule(data):
    """A schedule object, None, or "callable" (one that must be passed again)."""
    from . import schedules
    if data is None:
        return None
    require(isinstance(data, dict), "bad schedule")
    if data.get("name") == "callable":
        return "callable"
    try:
        schedule = schedules.from_json(data)
    except (KeyError, TypeError, ValueError):
        raise Malformed("bad schedule") from None
    if isinstance(schedule, schedules.Cosine):
        integer(data.get("total_steps"), "schedule total_steps", minimum=1)
        integer(data.get("first_update"), "schedule first_update")
    return schedule


def check_source(source):
    if source is None:
        return None
    require(isinstance(source, dict) and set(source) <= SOURCE_KEYS
            and ("dataset" in source) != ("data" in source), "bad source")
    for key, value in source.items():
        require(value is None or isinstance(value, (str, int, float))
                and not isinstance(value, bool), f"bad source {key}")
    for key in ("dataset", "data", "data_dir", "test", "ignore"):
        require(source.get(key) is None or isinstance(source[key], str), f"bad source {key}")
    require(source.get("class_weight") in (None, "balanced"), "bad source class_weight")
    if "data" in source:
        require(source.get("missing") in MISSING_POLICIES, "bad source missing policy")
        split = source.get("validation_split")
        require(split is None or isinstance(split, (int, float)) and 0 <= split < 1,
                "bad source validation_split")
        integer(source.get("seed"), "source seed")
    return source


def check_preprocessing(prep, sizes):
    if prep is None:
        return None
    keys = {"features", "target", "missing", "mean", "scale", "classes"}
    # not in files written before them; categories only with text columns
    later_keys = {"target_mean", "target_scale", "categories"}
    require(isinstance(prep, dict) and keys <= set(prep) <= keys | later_keys,
            "bad preprocessing")
    prep = {"target_mean": None, "target_scale": None, "categories": None, **prep}
    n_features, n_outputs = sizes[0], sizes[-1]

    def scaling(mean, scale, n, what):
        # a mean and a positive scale of n finite numbers each
        for key in (mean, scale):
            values = prep[key]
            require(isinstance(values, list) and len(values) == n
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            and math.isfinite(v) for v in values),
                    f"preprocessing {key} must hold {n} finite numbers{what}")
        require(all(v > 0 for v in prep[scale]), f"preprocessing {scale} must be > 0")

    scaling("mean", "scale", n_features, "")
    if prep["target_mean"] is not None or prep["target_scale"] is not None:
        scaling("target_mean", "target_scale", n_outputs, ", or both null")
    names, categories = prep["features"], prep["categories"]
    require(categories is None or isinstance(categories, dict) and isinstance(names, list)
            and all(name in names and isinstance(values, list) and values
                    and all(isinstance(v, str) for v in values)
                    and len(set(values)) == len(values) for name, values in categories.items()),
            "preprocessing categories must map feature columns to distinct strings")
    require(names is None or isinstance(names, list)
            and sum(input_widths(names, categories or {})) == n_features
            and all(isinstance(n, str) for n in names), "bad preprocessing features")
    require(prep["target"] is None or isinstance(prep["target"], str), "bad preprocessing target")
    require(prep["missing"] in MISSING_POLICIES, "bad preprocessing missing policy")
    classes = prep["classes"]
    require(classes is None or isinstance(classes, list) and len(classes) == n_outputs
            and all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in classes)
            and len(set(classes)) == n_outputs,
            f"preprocessing classes must be {n_outputs} distinct labels, or null")
    return prep
