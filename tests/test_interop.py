"""Models in other tools: ONNX export run by onnxruntime, and import from
PyTorch and scikit-learn."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from sklearn.neural_network import MLPClassifier as SklearnMLP

import fastmlp
from fastmlp.cli import main
from fastmlp.interop import ONNX_OPSET

from conftest import random_problem, relative_error


def trained(activation, dtype=np.float32, sizes=(9, 8, 7, 4)):
    model, X, y = random_problem(list(sizes), 200, activation, dtype, seed=2)
    fastmlp.fit(model, X, y, epochs=3, batch_size=16, optimizer="adam", lr=0.01, seed=1)
    return model, X, y


def onnx_proba(path, X):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": np.asarray(X, np.float32)})[0]


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnx_export_equals_predict_proba(tmp_path, activation, dtype):
    model, X, _ = trained(activation, dtype)
    model.to_onnx(tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version == ONNX_OPSET
    assert [node.op_type for node in graph.graph.node] == (
        ["Gemm", {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu",
                  "identity": "Identity"}[activation]] * 2
        + ["Gemm", "Softmax"])
    expected = model.predict_proba(X)
    assert np.abs(onnx_proba(tmp_path / "m.onnx", X) - expected).max() < 1e-5
    assert np.abs(expected - 0.25).max() > 0.05  # the model has learnt something


def test_onnx_from_the_command_line(tmp_path, capsys):
    from test_datasets import write_dataset
    write_dataset(tmp_path / "data", n_train=250, n_test=50)
    onnx_path = tmp_path / "m.onnx"
    code = main(["--data-dir", str(tmp_path / "data"), "--epochs", "1", "--quiet",
                 "--save", str(tmp_path / "m.safetensors"), "--onnx", str(onnx_path)])
    assert code == 0 and f"Wrote {onnx_path}" in capsys.readouterr().out
    model = fastmlp.load(tmp_path / "m.safetensors")
    x_test = fastmlp.datasets.load_directory(tmp_path / "data")[2]
    # from the command line the graph takes pixel values as the files hold
    # them; model.to_onnx's takes them divided by 255, as predict does
    assert np.abs(onnx_proba(onnx_path, x_test) - model.predict_proba(x_test)).max() < 1e-5
    model.to_onnx(tmp_path / "scaled.onnx")
    assert np.abs(onnx_proba(tmp_path / "scaled.onnx", x_test / np.float32(255)) -
                  model.predict_proba(x_test)).max() < 1e-5


def test_onnx_of_a_model_of_your_files_takes_raw_columns(tmp_path, capsys):
    # columns of very different scales, missing cells filled with the means,
    # a target around a million: the graph does the scaling the model
    # records, so raw rows in, the target's units out, as fastmlp-predict
    from fastmlp.predict import main as predict_main
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [1.0, 100.0, 0.01]
    price = 1e6 + 1e5 * (x[:, 0] + x[:, 1] / 100)
    x[5, 1] = np.nan
    path = tmp_path / "t.csv"
    with open(path, "w") as f:
        f.write("a,b,c,price\n")
        for row, p in zip(x, price):
            f.write(",".join("" if np.isnan(v) else repr(float(v)) for v in row)
                    + f",{float(p)!r}\n")
    onnx_path, model_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    code = main(["--data", str(path), "--target", "price", "--output", "linear",
                 "--missing", "mean", "--epochs", "3", "--quiet", "--save", str(model_path),
                 "--onnx", str(onnx_path)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert predict_main([str(model_path), str(path)]) == 0
    predicted = np.array([float(v) for v in capsys.readouterr().out.split()[1:]])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["predictions"], {"input": x.astype(np.float32)})[0][:, 0]
    assert np.abs(got - predicted).max() < 1e-5 * np.abs(predicted).max()
    assert abs(np.mean(got) - 1e6) < 1e5  # in the target's units


def test_onnx_of_a_model_with_text_columns_takes_their_strings(tmp_path, capsys):
    # the numeric columns as "input", each text column as strings of its own;
    # a missing cell filled as in training, an unseen value none of the categories
    from fastmlp.predict import main as predict_main
    from test_own_data import passengers
    lines = passengers(300, seed=0)
    lines[3] = lines[3].replace(",f,", ",,").replace(",m,", ",,")
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    onnx_path, model_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    code = main(["--data", str(path), "--target", "survived", "--ignore", "id", "--missing",
                 "mean", "--epochs", "3", "--quiet", "--save", str(model_path),
                 "--onnx", str(onnx_path)])
    assert code == 0, capsys.readouterr().err
    new = passengers(50, seed=1, ports="CQSX")
    new[5] = new[5].replace(",C,", ",NA,").replace(",Q,", ",NA,").replace(",S,", ",NA,")
    new[6] = new[6].replace(",f,", ",,").replace(",m,", ",,")
    (tmp_path / "new.csv").write_text("\n".join(new) + "\n")
    capsys.readouterr()
    assert predict_main([str(model_path), str(tmp_path / "new.csv"), "--proba"]) == 0
    expected = np.array([[float(v) for v in line.split(",")[1:]]
                         for line in capsys.readouterr().out.split()[1:]])
    rows = [line.split(",") for line in new[1:]]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("input", "tensor(float)", ["batch", 2]), ("sex", "tensor(string)", ["batch", 1]),
        ("port", "tensor(string)", ["batch", 1])]
    got = session.run(["probabilities"], {
        "input": np.array([[float(r[1]), float(r[3])] for r in rows], np.float32),
        "sex": np.array([[r[2]] for r in rows], object),
        "port": np.array([[r[4]] for r in rows], object)})[0]
    assert any(r[4] == "X" for r in rows) and np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("column", ["input", "features", "0.weight", "hidden_0"])
def test_a_text_column_named_as_a_graph_part_is_refused(column, tmp_path):
    model = fastmlp.MLP([3, 4, 2], seed=0)
    model.preprocessing = {"features": ["a", column], "categories": {column: ["x", "y"]},
                           "target": "t", "missing": "error", "mean": [0.0] * 3,
                           "scale": [1.0] * 3, "classes": ["p", "q"], "target_mean": None,
                           "target_scale": None}
    with pytest.raises(ValueError, match=f"would be named '{column}'.*rename that column"):
        model.to_onnx(tmp_path / "m.onnx", preprocessing=True)
    assert not (tmp_path / "m.onnx").exists()
    model.to_onnx(tmp_path / "m.onnx")  # the graph of scaled features has no such input


@pytest.mark.parametrize("activation,module", [
    ("sigmoid", torch.nn.Sigmoid), ("tanh", torch.nn.Tanh), ("relu", torch.nn.ReLU),
    ("identity", torch.nn.Identity)])
def test_from_torch_predicts_the_same_and_trains_on(activation, module):
    torch.manual_seed(0)
    sequential = torch.nn.Sequential(torch.nn.Linear(9, 8), module(), torch.nn.Linear(8, 7),
                                     module(), torch.nn.Linear(7, 4), torch.nn.Softmax(dim=1))
    model = fastmlp.MLP.from_torch(sequential)
    assert model.layer_sizes == (9, 8, 7, 4) and model.activation == activation
    _, X, y = random_problem([9, 8, 7, 4], 100, activation, np.float32, seed=3)
    with torch.no_grad():
        expected = sequential(torch.from_numpy(X)).numpy()
    assert np.abs(model.predict_proba(X) - expected).max() < 1e-6
    before = model.params.copy()
    fastmlp.fit(model, X, y, epochs=1, batch_size=10, optimizer="adam")
    assert not np.array_equal(before, model.params)


@pytest.mark.parametrize("layers,message", [
    ([torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2)], "layer 1 \\(GELU\\)"),
    ([torch.nn.Linear(4, 3), torch.nn.Dropout(), torch.nn.Linear(3, 2)], "layer 1 \\(Dropout\\)"),
    ([torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.Tanh(),
      torch.nn.Linear(3, 2)], "one hidden activation"),
    ([torch.nn.Conv1d(1, 1, 1)], "layer 0 \\(Conv1d\\)"),
    ([torch.nn.Linear(4, 3), torch.nn.ReLU()], "end with a Linear"),
])
def test_from_torch_names_what_it_cannot_take(layers, message):
    with pytest.raises(ValueError, match=message):
        fastmlp.MLP.from_torch(torch.nn.Sequential(*layers))


@pytest.mark.parametrize("activation", ["logistic", "tanh", "relu", "identity"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_from_sklearn_predicts_the_same_and_trains_on(activation, n_classes):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (n_classes == 3) * (X[:, 2] > 0.5)
    fitted = SklearnMLP(hidden_layer_sizes=(6,), activation=activation, max_iter=300,
                        random_state=0).fit(X, y)
    model = fastmlp.MLP.from_sklearn(fitted)
    assert model.dtype == np.float64 and model.n_classes == n_classes
    assert np.abs(model.predict_proba(X) - fitted.predict_proba(X)).max() < 1e-12
    assert np.array_equal(fitted.classes_[model.predict(X)], fitted.predict(X))
    fastmlp.fit(model, X, y, epochs=1, batch_size=10)


def test_from_sklearn_regressor_and_multi_label_classifier():
    from sklearn.neural_network import MLPRegressor
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 5))
    for y in (X[:, 0] - 2 * X[:, 1], np.stack([X[:, 0], X[:, 1] * X[:, 2]], axis=1)):
        fitted = MLPRegressor(hidden_layer_sizes=(8,), max_iter=50, random_state=0).fit(X, y)
        model = fastmlp.MLP.from_sklearn(fitted)
        assert model.output == "linear"
        assert model.predict(X).shape == fitted.predict(X).shape
        assert np.abs(model.predict(X) - fitted.predict(X)).max() < 1e-12
    counts = np.random.default_rng(1).poisson(np.exp(X[:, 0] / 2))
    fitted = MLPRegressor(loss="poisson", hidden_layer_sizes=(8,), max_iter=50,
                          random_state=0).fit(X, counts)
    model = fastmlp.MLP.from_sklearn(fitted)
    assert model.output == "poisson" and model.predict(X).shape == (150,)
    assert np.abs(model.predict(X) - fitted.predict(X)).max() < 1e-12
    labels = np.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 2] > 0], axis=1).astype(int)
    fitted = SklearnMLP(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(X, labels)
    model = fastmlp.MLP.from_sklearn(fitted)
    assert model.output == "sigmoid"
    assert np.abs(model.predict_proba(X) - fitted.predict_proba(X)).max() < 1e-12
    assert np.array_equal(model.predict(X), fitted.predict(X))


def test_from_torch_heads():
    torch.manual_seed(0)
    X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    body = [torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)]
    for layers, output in ((body + [torch.nn.Sigmoid()], None), (body, "linear")):
        sequential = torch.nn.Sequential(*layers)
        model = fastmlp.MLP.from_torch(sequential, output=output)
        with torch.no_grad():
            expected = sequential(torch.from_numpy(X)).numpy()
        got = model.predict(X) if model.output == "linear" else model.predict_proba(X)
        assert model.output == (output or "sigmoid") and np.abs(got - expected).max() < 1e-6


def test_a_pytorch_state_dict_file_is_pointed_to_from_torch(tmp_path):
    from safetensors.torch import save_file
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    save_file(sequential.state_dict(), tmp_path / "torch.safetensors")
    save_file({"embedding": torch.zeros(3, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"torch.safetensors: not a valid fastmlp model file: no "
                       r"fastmlp metadata of format version \d+; for a PyTorch state dict, load it "
                       r"into its nn.Sequential and take fastmlp.MLP.from_torch\(sequential\)$"):
        fastmlp.load(tmp_path / "torch.safetensors")
    with pytest.raises(ValueError, match=r"other.safetensors: .* no fastmlp metadata of format "
                       r"version \d+$"):
        fastmlp.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("output", ["linear", "sigmoid", "poisson"])
def test_onnx_export_of_the_other_heads(tmp_path, output):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 6)).astype(np.float32)
    y = {"linear": lambda: np.stack([X[:, 0] + X[:, 1], X[:, 2] * 2], axis=1),
         "sigmoid": lambda: (X[:, :2] > 0).astype(np.float32),
         "poisson": lambda: rng.poisson(np.exp(X[:, :2] / 2)).astype(np.float32)}[output]()
    model = fastmlp.MLP([6, 8, 2], activation="relu", init="he", output=output, seed=0)
    fastmlp.fit(model, X, y, epochs=5, batch_size=10, optimizer="adam", lr=0.01)
    model.to_onnx(tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    name = "probabilities" if output == "sigmoid" else "predictions"
    got = session.run([name], {"input": X})[0]
    expected = model.predict_proba(X) if output == "sigmoid" else model.predict(X)
    assert relative_error(got, expected) < 1e-5


def test_from_sklearn_names_what_it_cannot_take():
    X = np.random.default_rng(0).normal(size=(30, 3))
    fitted = SklearnMLP(max_iter=5).fit(X, X[:, 0] > 0)
    fitted.activation = "softplus"  # as a later scikit-learn might have
    with pytest.raises(ValueError, match="activation 'softplus' is not supported"):
        fastmlp.MLP.from_sklearn(fitted)
    with pytest.raises(ValueError, match="fitted"):
        fastmlp.MLP.from_sklearn(SklearnMLP())
