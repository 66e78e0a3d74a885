"""dtype="bfloat16": float32 master weights, products of values rounded to
bfloat16 (fastmlp/bfloat16.py), against the oracle's bfloat16 mode."""
import pickle

import numba
import numpy as np
import pytest

import fastmlp
from fastmlp import reference
from fastmlp.amx_layers import W_ROWS, is_amx_layer
from fastmlp.bfloat16 import round_array, round_bfloat16

from conftest import random_problem, relative_error


@numba.njit
def round_all(a):
    out = np.empty_like(a)
    for i in range(a.size):
        out[i] = round_bfloat16(a[i])
    return out


def edge_values():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32)
    # exact ties (low half 0x8000) with an even and an odd upper half
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x00008000, 0x00018000],
                    np.uint32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-45,
                        1.0, 1.00390625, 1.001953125], np.float32)
    values = np.concatenate([bits.view(np.float32), ties.view(np.float32), special])
    return values[~np.isnan(values) | (np.arange(values.size) >= values.size - 8)]


def test_the_kernels_round_as_the_oracle_does():
    values = edge_values()
    ours = round_all(values)
    assert np.array_equal(ours.view(np.uint32)[~np.isnan(values)],
                          round_array(values).view(np.uint32)[~np.isnan(values)])
    assert np.isnan(ours[np.isnan(values)]).all()
    assert (ours.view(np.uint32) & 0xFFFF == 0)[np.isfinite(values)].all()
    # ties go to even; the largest float32 values round up to inf
    assert round_array(np.float32(1.001953125)) == 1.0  # halfway to 1.0078125, even is 1.0
    assert round_array(np.float32(1.005859375)) == np.float32(1.0078125)  # halfway, even up
    assert round_array(np.float32(3.4e38)) == np.inf


def test_the_oracle_rounds_as_pytorch_does():
    torch = pytest.importorskip("torch")
    values = edge_values()
    finite = np.isfinite(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(round_array(values)[finite].view(np.uint32),
                          theirs[finite].view(np.uint32))


@pytest.mark.parametrize("output", ["softmax", "linear", "sigmoid"])
@pytest.mark.parametrize("activation,sizes", [("sigmoid", [30, 70, 20, 4]),
                                              ("tanh", [30, 70, 20, 4]),
                                              ("relu", [30, 70, 20, 4]),
                                              ("relu", [30, 260, 20, 4])])  # a wide layer
def test_gradients_match_the_bfloat16_oracle(activation, sizes, output):
    model, X, y = random_problem(sizes, 50, activation, np.float32, seed=1)
    rng = np.random.default_rng(1)
    if output == "linear":
        y = rng.standard_normal((50, 4)).astype(np.float32)
    elif output == "sigmoid":
        y = (rng.random((50, 4)) < 0.4).astype(np.float32)
    bf16 = fastmlp.MLP(model.layer_sizes, activation=activation, dtype="bfloat16",
                       output=output)
    bf16.params[:] = model.params
    loss, dweights, dbiases = bf16.gradients(X, y)
    weights = [w.copy() for w in model.weights]
    biases = [b.copy() for b in model.biases]
    oracle = reference.loss_and_gradients(weights, biases, X, y, activation, output=output,
                                          bfloat16=True)
    plain = reference.loss_and_gradients(weights, biases, X, y, activation, output=output)
    for ours, theirs, float32 in zip(dweights + dbiases, oracle[1] + oracle[2],
                                     plain[1] + plain[2]):
        assert relative_error(ours, theirs) < 2e-6
        # the rounding is real: float32 products give other gradients
        assert relative_error(ours, float32) > 1e-4
    assert abs(loss - oracle[0]) < 1e-6 * max(1.0, abs(oracle[0]))


# 50 steps. With SGD the kernels follow the oracle to float32's rounding
# (their sums run in another order); Adam and momentum carry a difference
# further: where the two master weights straddle a bfloat16 rounding
# boundary, their bfloat16 copies differ by 2^-8 relative, and Adam's step
# does not shrink with the gradient. Each still stays nearer the bfloat16
# oracle than the float32 one, layer by layer.
@pytest.mark.parametrize("optimizer,lr,bound,nearer", [
    ("sgd", 0.1, 1e-6, 1000), ("momentum", 0.05, 3e-4, 10), ("adam", 0.003, 3e-3, 2)])
def test_trajectory_follows_the_bfloat16_oracle(optimizer, lr, bound, nearer):
    model, X, y = random_problem([30, 70, 20, 4], 400, "tanh", np.float32, seed=2)
    bf16 = fastmlp.MLP(model.layer_sizes, activation="tanh", dtype="bfloat16")
    bf16.params[:] = model.params
    fastmlp.fit(bf16, X, y, epochs=1, batch_size=8, optimizer=optimizer, lr=lr, shuffle=False)
    batches = [np.arange(i, min(i + 8, 400)) for i in range(0, 400, 8)]
    oracle, float32 = ([p.copy() for p in model.weights + model.biases] for _ in range(2))
    for params, bfloat16 in ((oracle, True), (float32, False)):
        reference.train(params[:3], params[3:], X, y, "tanh", batches, optimizer=optimizer,
                        lr=lr, bfloat16=bfloat16)
    for ours, theirs, plain in zip(bf16.weights + bf16.biases, oracle, float32):
        assert relative_error(ours, theirs) < bound
        assert relative_error(ours, plain) > nearer * relative_error(ours, theirs)


# (on AMX tiles where the CPU has them: test_amx.py); the second case ends
# its epochs with a batch of 38 rows, whose K the tiles pad with zeros
@pytest.mark.parametrize("sizes,n,batch_size", [([40, 96, 70, 4], 600, 50),
                                                ([50, 300, 260, 3], 230, 64)])
def test_parameters_are_bit_identical_for_any_thread_count(sizes, n, batch_size):
    model, X, y = random_problem(sizes, n, "relu", np.float32, seed=3)
    results = []
    for threads in (1, 2):
        bf16 = fastmlp.MLP(model.layer_sizes, activation="relu", dtype="bfloat16")
        bf16.params[:] = model.params
        fastmlp.fit(bf16, X, y, epochs=2, batch_size=batch_size, optimizer="adam", lr=0.01,
                    threads=threads, seed=0)
        results.append(bf16.params.copy())
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], model.params)


def test_the_products_read_the_rounded_weights_after_training_and_loading(tmp_path):
    model, X, y = random_problem([40, 96, 70, 4], 300, "relu", np.float32, seed=4)
    bf16 = fastmlp.MLP(model.layer_sizes, activation="relu", dtype="bfloat16")
    bf16.params[:] = model.params
    fastmlp.fit(bf16, X, y, epochs=2, batch_size=50, optimizer="momentum", lr=0.05)

    def operands_rounded(m):
        # what each layer's products read: the rounded copy, or on AMX
        # tiles (amx_layers.py) the packed rows of bfloat16 bits
        net = m.network()
        for l, w in enumerate(m.weights):
            rounded = round_array(w.T)
            if is_amx_layer(w.shape[1], m.amx):
                start, rows, columns = net.packed_weights_layout[l, W_ROWS]
                packed = net.packed_weights[start:start + rows * columns].reshape(rows, columns)
                read = (packed[:w.shape[1], :w.shape[0]].astype(np.uint32) << 16).view(np.float32)
            else:
                read = net.operands[m.w_off[l]:m.w_off[l] + w.size].reshape(w.T.shape)
            if not np.array_equal(read, rounded):
                return False
        return True

    assert operands_rounded(bf16)
    assert bf16.network().operands is not bf16.params
    path = tmp_path / "m.safetensors"
    bf16.save(path)
    for again in (fastmlp.load(path), pickle.loads(pickle.dumps(bf16))):
        assert again.precision == "bfloat16" and again.dtype == np.float32
        assert np.array_equal(again.predict_proba(X), bf16.predict_proba(X))
        assert operands_rounded(again)
    # float32 models read params itself
    assert model.network().operands is model.params


def test_bfloat16_in_the_estimator_and_bad_dtypes():
    X, y = random_problem([10, 8, 3], 200, "relu", np.float32, seed=5)[1:]
    clf = fastmlp.MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, dtype="bfloat16",
                                random_state=0)
    with pytest.warns(Warning):  # max_iter reached
        clf.fit(X, y)
    assert clf.model_.precision == "bfloat16"
    assert "dtype='bfloat16'" in repr(clf.model_)
    with pytest.raises(ValueError, match="'float32', 'float64' or 'bfloat16'"):
        fastmlp.MLP([3, 2], dtype="float16")


def test_the_command_trains_saves_and_resumes_bfloat16(tmp_path, capsys):
    from fastmlp.cli import main
    from test_datasets import write_dataset
    write_dataset(tmp_path / "data", n_train=250, n_test=50)
    common = ["--data-dir", str(tmp_path / "data"), "--optimizer", "adam", "--hidden", "16"]
    straight, half, resumed = (tmp_path / f"{name}.safetensors" for name in "shr")
    assert main(common + ["--dtype", "bfloat16", "--epochs", "3", "--save", str(straight)]) == 0
    assert 'Model: "784-16-10" (bfloat16)' in capsys.readouterr().out.splitlines()
    assert main(common + ["--dtype", "bfloat16", "--epochs", "1", "--save", str(half)]) == 0
    assert main(["--data-dir", str(tmp_path / "data"), "--resume", str(half), "--epochs", "3",
                 "--save", str(resumed)]) == 0
    assert fastmlp.load(resumed).precision == "bfloat16"
    assert np.array_equal(fastmlp.load(straight).params, fastmlp.load(resumed).params)
    float32 = tmp_path / "f.safetensors"
    assert main(common + ["--epochs", "3", "--save", str(float32)]) == 0
    assert not np.array_equal(fastmlp.load(straight).params, fastmlp.load(float32).params)
