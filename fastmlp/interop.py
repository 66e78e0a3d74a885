"""Models to and from other tools: ONNX export, and import from a PyTorch
nn.Sequential or a fitted scikit-learn MLPClassifier. (Model files are
safetensors, which PyTorch reads directly: see fastmlp.modelfile.)"""
import numpy as np

from .heads import VALUE_HEADS
from .files import atomic_write
from .sources import output_scaling
from .tabular import NA_CELLS

ONNX_OPSET = 17
ONNX_ML_OPSET = 2  # LabelEncoder with keys_strings and values_floats
ONNX_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "identity": "Identity"}
TORCH_ACTIVATIONS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "ReLU": "relu", "Identity": "identity"}
SKLEARN_ACTIVATIONS = {"logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
                       "identity": "identity"}


OUTPUT_NODES = {"softmax": ("Softmax", "probabilities"), "linear": ("Identity", "predictions"),
                "poisson": ("Exp", "predictions"),
                "sigmoid": ("Sigmoid", "probabilities")}


def onnx_model(model, preprocessing=False):
    """The ONNX graph of model: Gemm layers with the hidden activation between
    them and the head's output at the end (Softmax, Identity or Sigmoid),
    float32 in and out. Input "input" (batch, features) holds features as
    predict takes them, already scaled (uint8 pixels divided by 255); output
    "probabilities" (softmax, sigmoid) or "predictions" (linear), (batch,
    outputs). With preprocessing, the graph starts and ends with the
    scaling the model records (input_steps, sources.output_scaling): it
    takes raw columns or pixel values and answers in the target's units.
    A model with text columns then takes their cells as strings (batch, 1),
    one input each named after its column, and "input" holds the numeric
    columns (category_steps)."""
    from onnx import TensorProto, checker, helper, numpy_helper

    nodes, initializers = [], []

    def constant(name, values, dtype=np.float32):
        initializers.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(op, inputs, out, **attributes):
        nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    inputs = [("input", TensorProto.FLOAT, model.n_features)]
    current = "input"
    if preprocessing:
        current, inputs = input_steps(model, node, constant)
    n_layers = len(model.weights)
    for l, (w, b) in enumerate(zip(model.weights, model.biases)):
        weight = constant(f"{2 * l}.weight", np.ascontiguousarray(w.T))
        bias = constant(f"{2 * l}.bias", b)
        out = node("Gemm", [current, weight, bias], f"logits_{l}", transB=1)
        if l < n_layers - 1:
            current = node(ONNX_ACTIVATIONS[model.activation], [out], f"hidden_{l}")
    op, name = OUTPUT_NODES[model.output]
    scaling = output_scaling(model) if preprocessing else None
    current = node(op, [out], name if scaling is None else "standardized",
                   **({"axis": 1} if op == "Softmax" else {}))
    if scaling is not None:
        mean, spread = scaling
        node("Add", [node("Mul", [current, constant("target_scale", spread)], "scaled"),
                     constant("target_mean", mean)], name)
    graph = helper.make_graph(
        nodes, "fastmlp",
        [helper.make_tensor_value_info(name, kind, ["batch", width])
         for name, kind, width in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", model.n_outputs])],
        initializers)
    inside = {out for n in nodes for out in n.output} | {t.name for t in initializers}
    names = [name for name, _, _ in inputs]
    clashes = sorted(set(names) & inside | {name for name in names if names.count(name) > 1})
    if clashes:  # (text columns' inputs are named after them)
        raise ValueError(f"a graph input would be named {clashes[0]!r}, as another input or "
                         "a node of the graph is: rename that column to export the model")
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    if any(n.domain == "ai.onnx.ml" for n in nodes):
        opsets.append(helper.make_opsetid("ai.onnx.ml", ONNX_ML_OPSET))
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="fastmlp")
    checker.check_model(proto, full_check=True)
    return proto


def input_steps(model, node, constant):
    """(the node of the features predict takes, the graph's inputs as
    (name, type, width)) from raw input: a model of your files one-hot
    encodes its text columns, fills missing cells (NaN) with the means if
    it was trained so, then standardizes; a model of a dataset's 8-bit
    pixels divides by 255."""
    from onnx import TensorProto
    prep = model.preprocessing
    current, inputs = "input", [("input", TensorProto.FLOAT, model.n_features)]
    if prep is not None and prep.get("categories"):
        current, inputs = category_steps(prep, node, constant)
    if prep is not None:
        mean = constant("feature_mean", prep["mean"])
        if prep["missing"] == "mean":
            current = node("Where", [node("IsNaN", [current], "missing"), mean, current],
                           "filled")
        centred = node("Sub", [current, mean], "centred")
        scaled = node("Div", [centred, constant("feature_scale", prep["scale"])], "features")
        return scaled, inputs
    if model.source is not None and "dataset" in model.source:
        return node("Div", [current, constant("pixel_scale", 255.0)], "pixels"), inputs
    return current, inputs


def category_steps(prep, node, constant):
    """(node, inputs) of a model with text columns: "input" (batch, the
    numeric columns in order) and a string input (batch, 1) per text
    column, put together as tabular.one_hot encodes: 1 in the value's
    column, NaN throughout for a missing cell (NA_CELLS), 0 throughout for
    a value outside the categories."""
    from onnx import TensorProto
    names, categories = prep["features"], prep["categories"]
    numeric = [name for name in names if name not in categories]
    inputs = [("input", TensorProto.FLOAT, len(numeric))] if numeric else []
    pieces, order, start = (["input"] if numeric else []), {}, len(numeric)
    for j, name in enumerate(names):
        if name not in categories:
            order[name] = [numeric.index(name)]
            continue
        values = categories[name]
        inputs.append((name, TensorProto.STRING, 1))
        na = sorted(NA_CELLS)  # (never a category: tabular.category_texts)
        codes = node("LabelEncoder", [name], f"codes_{j}", domain="ai.onnx.ml",
                     keys_strings=values + na,
                     values_floats=list(range(len(values))) + [np.nan] * len(na),
                     default_float=-1.0)
        hot = node("Cast", [node("Equal", [codes, constant(f"categories_{j}", [
            list(range(len(values)))])], f"is_{j}")], f"hot_{j}", to=TensorProto.FLOAT)
        pieces.append(node("Where", [node("IsNaN", [codes], f"missing_{j}"), codes, hot],
                           f"one_hot_{j}"))
        order[name] = list(range(start, start + len(values)))
        start += len(values)
    joined = node("Concat", pieces, "joined", axis=1) if len(pieces) > 1 else pieces[0]
    columns = [k for name in names for k in order[name]]
    return node("Gather", [joined, constant("column_order", columns, np.int64)], "raw",
                axis=1), inputs


def to_onnx(model, path, preprocessing=False):
    """Writes model's ONNX graph to path, atomically (onnx_model)."""
    try:
        proto = onnx_model(model, preprocessing)
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'fastmlp[onnx]'") from None
    atomic_write(path, [proto.SerializeToString()])


def from_layers(weights, biases, activation, output="softmax"):
    """An MLP with these (fan_in, fan_out) weights and biases."""
    from .model import MLP
    dtype = np.result_type(*weights, *biases)
    if dtype not in (np.float32, np.float64):
        dtype = np.float32
    sizes = [weights[0].shape[0]] + [w.shape[1] for w in weights]
    model = MLP(sizes, activation=activation, dtype=dtype.name, seed=0, output=output)
    for target, source in zip(model.weights + model.biases, list(weights) + list(biases)):
        if target.shape != source.shape:
            raise ValueError(f"a layer of shape {source.shape} does not follow the one before")
        target[...] = source
    return model


def from_torch(sequential, output=None):
    """An MLP from a PyTorch nn.Sequential of Linear layers with one kind of
    activation (Sigmoid, Tanh, ReLU or Identity) between them. A final Softmax(dim=1)
    makes the softmax head, a final Sigmoid the sigmoid (multi-label) head;
    a Sequential that ends in Linear gets output (default "softmax", its
    logits; "linear" for regression)."""
    from .heads import HEADS
    modules = list(sequential.children()) if hasattr(sequential, "children") else None
    if not modules:
        raise ValueError("from_torch takes a torch.nn.Sequential of Linear and activation layers")
    last = type(modules[-1]).__name__
    if last in ("Softmax", "Sigmoid") and len(modules) % 2 == 0:
        if last == "Softmax" and getattr(modules[-1], "dim", None) not in (1, -1):
            raise ValueError("a final Softmax must be over dim 1")
        found = last.lower()
        if output not in (None, found):
            raise ValueError(f"the Sequential ends in {last}, which is output={found!r}")
        output = found
        modules = modules[:-1]
    output = output or "softmax"
    if output not in HEADS:
        raise ValueError(f"unknown output {output!r}; expected one of {sorted(HEADS)}")
    weights, biases, activations = [], [], set()
    for i, module in enumerate(modules):
        kind = type(module).__name__
        expect_linear = i % 2 == 0
        if expect_linear and kind == "Linear":
            w = module.weight.detach().cpu().numpy()
            b = (module.bias.detach().cpu().numpy() if module.bias is not None
                 else np.zeros(w.shape[0], w.dtype))
            weights.append(w.T)
            biases.append(b)
        elif not expect_linear and kind in TORCH_ACTIVATIONS:
            activations.add(TORCH_ACTIVATIONS[kind])
        else:
            wanted = "Linear" if expect_linear else "Sigmoid, Tanh, ReLU or Identity"
            raise ValueError(f"layer {i} ({kind}) is not supported there: fastmlp takes "
                             f"{wanted} at position {i}")
    if len(modules) % 2 == 0:
        raise ValueError("the Sequential must end with a Linear layer (then an optional Softmax)")
    if len(activations) > 1:
        raise ValueError(f"fastmlp uses one hidden activation; this Sequential has "
                         f"{sorted(activations)}")
    return from_layers(weights, biases, activations.pop() if activations else "sigmoid", output)


def from_sklearn(fitted):
    """An MLP from a fitted scikit-learn MLPRegressor (the linear head) or
    MLPClassifier: multi-class (softmax), multi-label (sigmoid), or binary
    (a logistic output unit, written as the equal two-class softmax:
    softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]). Predicted class indices
    are positions in fitted.classes_."""
    kind = type(fitted).__name__
    if not hasattr(fitted, "coefs_"):
        raise ValueError(f"from_sklearn takes a fitted scikit-learn MLPClassifier or "
                         f"MLPRegressor, got {kind}")
    if fitted.activation not in SKLEARN_ACTIVATIONS:
        raise ValueError(f"activation {fitted.activation!r} is not supported; fastmlp has "
                         f"{sorted(SKLEARN_ACTIVATIONS)}")
    weights = [np.asarray(w) for w in fitted.coefs_]
    biases = [np.asarray(b) for b in fitted.intercepts_]
    output = {"softmax": "softmax", "identity": "linear", "logistic": "sigmoid",
              "exp": "poisson"}.get(
        fitted.out_activation_)
    if output is None:
        raise ValueError(f"output activation {fitted.out_activation_!r} is not supported")
    binary = output == "sigmoid" and getattr(fitted, "_label_binarizer", None) is not None \
        and fitted._label_binarizer.y_type_ == "binary"
    if binary:
        weights[-1] = np.hstack([np.zeros_like(weights[-1]), weights[-1]])
        biases[-1] = np.concatenate([np.zeros_like(biases[-1]), biases[-1]])
        output = "softmax"
    model = from_layers(weights, biases, SKLEARN_ACTIVATIONS[fitted.activation], output)
    if output in VALUE_HEADS:
        model.flat_targets = fitted.n_outputs_ == 1  # as scikit-learn's predict
    return model
