"""Each kernel, and the model's forward pass, loss and gradients, against the
NumPy oracle."""
import math
import os
import re
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from fastmlp import heads, expf, jit, kernels, optimizers, reference
from fastmlp.bfloat16 import round_array
from fastmlp.buffers import make_data
from fastmlp.kernels import ACTIVATIONS, IDENTITY
from fastmlp.model import aligned_zeros

from conftest import random_problem, reference_copy, relative_error

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def random_configs(count, seed=2024):
    """Configurations drawn from: 0-3 hidden layers, widths 1-300, batch
    sizes 1, 7, 100, 257, every activation, both dtypes; the edges are
    always in."""
    rng = np.random.default_rng(seed)
    configs = [
        ([5, 2], 1, "sigmoid", np.float64),
        ([300, 1, 3], 7, "relu", np.float32),
        ([1, 300, 300, 2], 257, "tanh", np.float64),
        ([784, 50, 10], 100, "sigmoid", np.float32),
    ]
    while len(configs) < count:
        hidden = [int(w) for w in rng.integers(1, 301, rng.integers(0, 4))]
        sizes = [int(rng.integers(1, 301))] + hidden + [int(rng.integers(2, 30))]
        configs.append((sizes, int(rng.choice([1, 7, 100, 257])),
                        str(rng.choice(sorted(ACTIVATIONS))),
                        [np.float32, np.float64][rng.integers(2)]))
    return configs


CONFIGS = random_configs(28)


@pytest.mark.parametrize("sizes,n,activation,dtype", CONFIGS,
                         ids=[f"{s}-n{n}-{a}-{d.__name__}" for s, n, a, d in CONFIGS])
def test_forward_loss_gradients_match_oracle(sizes, n, activation, dtype):
    x_dtype = np.uint8 if sizes[0] % 3 == 0 else dtype  # about a third take pixels
    model, X, y = random_problem(sizes, n, activation, dtype, seed=sum(sizes) + n, x_dtype=x_dtype)
    weights, biases = reference_copy(model)
    tol = TOL[dtype]

    probs = model.predict_proba(X)
    expected = reference.forward(weights, biases, X, activation)[-1]
    assert probs.dtype == dtype
    assert relative_error(probs, expected) < tol

    loss, dweights, dbiases = model.gradients(X, y)
    ref_loss, ref_dweights, ref_dbiases = reference.loss_and_gradients(weights, biases, X, y, activation)
    assert abs(loss - ref_loss) <= tol * max(1.0, abs(ref_loss))
    for l, (got, want) in enumerate(zip(dweights + dbiases, ref_dweights + ref_dbiases)):
        assert got.shape == want.shape
        assert relative_error(got, want) < 10 * tol, f"gradient {l} differs"

    eval_loss, accuracy = model.evaluate(X, y)
    assert abs(eval_loss - ref_loss) <= tol * max(1.0, abs(ref_loss))
    assert accuracy == np.mean(np.argmax(expected, axis=1) == y)


# --- single kernels on row ranges, against plain NumPy ----------------------

def panels_of(weight):
    """dense_forward's transposed weights for weight (OC, C): panels of
    BLOCK_COLUMNS outputs, each its block of weight transposed, as
    transpose_to_panels writes them (nothing for a wide layer)."""
    OC, C = weight.shape
    width = kernels.BLOCK_COLUMNS
    panels = np.full((kernels.kept_transposed(OC) // width, C, width), 7.0, weight.dtype)
    kernels.transpose_to_panels(panels, weight, 0, panels.shape[0] * width, 0, C)
    for p in range(panels.shape[0]):
        assert np.array_equal(panels[p], weight[p * width:(p + 1) * width].T)
    return panels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("j0,j1", [(0, 128), (16, 48), (48, 80), (112, 128)])
def test_streamed_panels_are_the_plain_ones(dtype, j0, j1, rng):
    # transposed_panels_streamed writes what transpose_to_panels writes,
    # and nothing else
    C, OC = 100, 130
    weight = rng.standard_normal((OC, C)).astype(dtype)
    plain, streamed = (aligned_zeros(2 * C * 64, dtype).reshape(2, C, 64) for _ in range(2))
    plain[:] = streamed[:] = 7.0
    block = np.zeros(16 * C, dtype)
    assert kernels.streamable(streamed, j0, j1, 0, C, block)
    kernels.transpose_to_panels(plain, weight, j0, j1, 0, C)
    kernels.transposed_panels_streamed(streamed, weight, block, j0, j1)
    np.testing.assert_array_equal(streamed, plain)
    assert (plain == 7.0).sum() == (2 * 64 - (j1 - j0)) * C


def test_only_whole_blocks_of_whole_rows_on_whole_lines_stream():
    C = 100
    panels = aligned_zeros(2 * C * 64 + 2, np.float32)
    whole = panels[:2 * C * 64].reshape(2, C, 64)
    block = np.zeros(16 * C, np.float32)
    assert kernels.streamable(whole, 16, 64, 0, C, block)
    assert not kernels.streamable(whole, 8, 64, 0, C, block)  # not a block's start
    assert not kernels.streamable(whole, 16, 56, 0, C, block)
    assert not kernels.streamable(whole, 16, 64, 4, C, block)  # not whole rows
    assert not kernels.streamable(whole, 16, 64, 0, C, block[:-1])  # no room
    off_line = panels[1:2 * C * 64 + 1].reshape(2, C, 64)
    assert not kernels.streamable(off_line, 16, 64, 0, C, block)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("C,OC,r0,r1", [(1, 1, 0, 1), (13, 5, 2, 9), (64, 10, 0, 64), (7, 9, 3, 4),
                                        (9, 64, 0, 8), (70, 133, 1, 10), (3, 128, 4, 5),
                                        (130, 260, 3, 90), (5, 512, 0, 17)])
def test_dense_forward_rows(activation, C, OC, r0, r1, rng):
    # OC >= 64: the leading whole blocks of 64 outputs come from the
    # transposed weights (wide layers: weight rows times the input's
    # transpose), the rest from dot products
    code = ACTIVATIONS.get(activation, IDENTITY)
    inp = rng.standard_normal((r1 + 2, C))
    weight = rng.standard_normal((OC, C))
    bias = rng.standard_normal(OC)
    out = np.full((r1 + 2, OC), 7.0)
    OCT = kernels.transposed_outputs(OC)
    assert OCT == OC // 64 * 64
    assert kernels.wide_layer(OC) == (OCT >= 256)
    weight_t = panels_of(weight)
    outputs_t = np.full(OCT * kernels.BLOCK_COLUMNS, np.nan)
    kernels.dense_forward(out, inp, weight, weight_t, outputs_t, bias, code, False, r0, r1, 0, OC)
    z = inp[r0:r1] @ weight.T + bias
    expected = z if activation == "identity" else reference.ACTIVATION[activation](z)
    assert relative_error(out[r0:r1], expected) < 1e-13
    # rows outside r0:r1 are not touched
    assert (out[:r0] == 7.0).all() and (out[r1:] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C,OC,r0,r1", [(100, 256, 0, 64), (300, 320, 5, 90), (9, 260, 1, 2),
                                        (257, 512, 0, 77), (0, 256, 2, 6)])
def test_wide_forward_equals_the_transposed_weights_path(dtype, C, OC, r0, r1, rng):
    """A wide layer's outputs, weight rows times panels of the input's
    transpose, are bit for bit what rows of the input times the transposed
    weights give (the path of narrower layers): the same chain of
    multiply-adds for each, over row blocks of 64 padded to 16s, input
    widths past one pass (MAX_SUM_ROWS) and edges of the transposed tiles."""
    OCT = kernels.transposed_outputs(OC)
    assert kernels.wide_layer(OC) and kernels.kept_transposed(OC) == 0
    inp = rng.standard_normal((r1 + 3, C)).astype(dtype)
    weight = rng.standard_normal((OC, C)).astype(dtype)
    wide = np.full((r1 + 3, OC), 7.0, dtype)
    kernels.dense_forward(wide, inp, weight, panels_of(weight),
                          np.full(OCT * kernels.BLOCK_COLUMNS, np.nan, dtype),
                          np.zeros(OC, dtype), IDENTITY, False, r0, r1, 0, OC)
    transposed = np.full((r1 + 3, OC), 7.0, dtype)
    kernels.rows_times_matrix(transposed, inp, weight[:OCT].T.copy(), r0, r1, C, 0, OCT, C, 0)
    assert np.array_equal(wide[:, :OCT], transposed[:, :OCT])
    assert (wide[:r0] == 7.0).all() and (wide[r1:] == 7.0).all()
    assert relative_error(wide[r0:r1].astype(np.float64),
                          inp[r0:r1].astype(np.float64) @ weight.T.astype(np.float64)) < (
        1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("j0,j1,k0,k1", [(0, 64, 0, 100), (16, 48, 3, 99), (0, 16, 64, 70),
                                         (32, 128, 5, 6), (0, 16, 8, 8)])
def test_transpose_weight_block(dtype, j0, j1, k0, k1, rng):
    # whole tiles of transpose_tile and the rows past the last one, exactly;
    # nothing outside weight_t[k0:k1, j0:j1] is written
    weight = rng.standard_normal((130, 100)).astype(dtype)
    weight_t = np.full((100, 128), 7.0, dtype)
    kernels.transpose_weight_block(weight_t, weight, j0, j1, k0, k1)
    expected = np.full((100, 128), 7.0, dtype)
    expected[k0:k1, j0:j1] = weight[j0:j1, k0:k1].T
    np.testing.assert_array_equal(weight_t, expected)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("C,OC", [(1, 1), (9, 6), (50, 10), (3, 17), (64, 1), (100, 1)])
def test_dense_backward_input(activation, C, OC, rng):
    code = ACTIVATIONS[activation]
    dout = rng.standard_normal((6, OC))
    weight = rng.standard_normal((OC, C))
    inp = reference.ACTIVATION[activation](rng.standard_normal((6, C)))
    dinp = np.full((6, C), 7.0)
    kernels.dense_backward_input(dinp, dout, weight, inp, code, False, 1, 5, 0, C)
    expected = (dout @ weight) * reference.DERIVATIVE[activation](inp)
    assert relative_error(dinp[1:5], expected[1:5]) < 1e-13
    assert (dinp[0] == 7.0).all() and (dinp[5] == 7.0).all()


@pytest.mark.parametrize("OC", [1, 10])
def test_dense_backward_input_rounds_every_row_to_bfloat16(OC, rng):
    """With bf16, each row of the delta is rounded as the oracle rounds."""
    code = ACTIVATIONS["relu"]
    dout = rng.standard_normal((12, OC)).astype(np.float32)
    weight = rng.standard_normal((OC, 40)).astype(np.float32)
    inp = np.maximum(rng.standard_normal((12, 40)), 0).astype(np.float32)
    plain = np.zeros((12, 40), np.float32)
    kernels.dense_backward_input(plain, dout, weight, inp, code, False, 2, 11, 0, 40)
    rounded = np.zeros((12, 40), np.float32)
    kernels.dense_backward_input(rounded, dout, weight, inp, code, True, 2, 11, 0, 40)
    assert not np.array_equal(plain[2:11], round_array(plain[2:11]))
    assert np.array_equal(rounded[2:11], round_array(plain[2:11]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("k0,k1", [(0, 100), (16, 100), (32, 48)])
def test_a_single_outputs_delta_is_the_products_bit_for_bit(dtype, activation, k0, k1, rng):
    """A layer of one output takes its delta without rows_times_matrix; the
    values are the ones that product gives, times the derivative."""
    code = ACTIVATIONS[activation]
    dout = rng.standard_normal((40, 1)).astype(dtype)
    weight = rng.standard_normal((1, 100)).astype(dtype)
    inp = reference.ACTIVATION[activation](rng.standard_normal((40, 100))).astype(dtype)
    dinp = np.full((40, 100), 7.0, dtype)
    kernels.dense_backward_input(dinp, dout, weight, inp, code, False, 3, 37, k0, k1)
    product = np.full((40, 100), 7.0, dtype)
    kernels.rows_times_matrix(product, dout, weight, 3, 37, 1, k0, k1, 1, 0)
    expected = product[3:37, k0:k1] * reference.DERIVATIVE[activation](inp[3:37, k0:k1])
    assert np.array_equal(dinp[3:37, k0:k1], expected.astype(dtype))
    outside = np.ones((40, 100), bool)
    outside[3:37, k0:k1] = False
    assert (dinp[outside] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C,cuts", [(512, [0, 256, 512]), (512, [0, 272, 512]),
                                    (300, [0, 128, 300]), (300, [0, 48, 208, 300]),
                                    (260, [0, 64, 128, 192, 260])])
def test_dense_backward_input_by_columns_equals_all_columns(dtype, C, cuts, rng):
    """The delta of a column layer's outputs, computed in column pieces
    (column_layers.column_delta, one a thread, cut by speed at 16s: column_layers.column_cut),
    is bit for bit the delta of all columns at once, and each piece writes
    its columns only."""
    code = ACTIVATIONS["relu"]
    dout = rng.standard_normal((70, 300)).astype(dtype)
    weight = rng.standard_normal((300, C)).astype(dtype)
    inp = np.maximum(rng.standard_normal((70, C)), 0).astype(dtype)
    whole = np.full((70, C), 7.0, dtype)
    kernels.dense_backward_input(whole, dout, weight, inp, code, False, 0, 70, 0, C)
    pieces = np.full((70, C), 7.0, dtype)
    for k0, k1 in zip(cuts[:-1], cuts[1:]):
        kernels.dense_backward_input(pieces, dout, weight, inp, code, False, 0, 67, k0, k1)
        assert (pieces[:67, k1:] == 7.0).all()
    assert np.array_equal(pieces[:67], whole[:67]) and (pieces[67:] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C,OC,nrows,cuts", [(784, 512, 128, [0, 256, 512]),
                                             (784, 512, 128, [0, 16, 272, 512]),
                                             (130, 300, 70, [0, 128, 300]),
                                             (130, 300, 70, [0, 144, 300]),
                                             (9, 260, 3, [0, 64, 128, 192, 260]),
                                             (784, 128, 32, [0, 64, 128]),
                                             (100, 192, 20, [0, 96, 192]),
                                             (70, 133, 9, [0, 16, 80, 133]),
                                             (784, 50, 100, [0, 25, 50]),
                                             (20, 50, 9, [0, 1, 7, 26, 50])])
def test_column_layer_by_columns_equals_by_rows(dtype, C, OC, nrows, cuts, rng):
    """A column layer's outputs, computed in column pieces for all rows
    (column_layers.column_layer, one piece a thread: whole blocks transposed, the
    outputs past them in dot tiles, a narrow layer's cut at any output;
    transposed panels cut at a panel's edge or inside one, 96 of 192),
    are bit for bit those of the same layer cut by rows; each piece writes
    its columns only."""
    inp = rng.standard_normal((nrows + 2, C)).astype(dtype)
    weight = rng.standard_normal((OC, C)).astype(dtype)
    bias = rng.standard_normal(OC).astype(dtype)
    code = ACTIVATIONS["tanh"]
    outputs_t = np.full(kernels.transposed_outputs(OC) * kernels.BLOCK_COLUMNS, np.nan, dtype)
    weight_t = panels_of(weight)
    rows = np.full((nrows + 2, OC), 7.0, dtype)
    for r0, r1 in [(0, nrows // 8 * 4), (nrows // 8 * 4, nrows)]:
        kernels.dense_forward(rows, inp, weight, weight_t, outputs_t, bias, code,
                              False, r0, r1, 0, OC)
    columns = np.full((nrows + 2, OC), 7.0, dtype)
    for j0, j1 in zip(cuts[:-1], cuts[1:]):
        kernels.dense_forward(columns, inp, weight, weight_t, outputs_t, bias, code,
                              False, 0, nrows, j0, j1)
        assert (columns[:, j1:] == 7.0).all()
    assert np.array_equal(columns, rows)
    z = inp[:nrows].astype(np.float64) @ weight.T.astype(np.float64) + bias
    assert relative_error(columns[:nrows], np.tanh(z)) < (1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("nrows", [1, 3, 4, 9])
def test_dense_backward_weight_and_bias(nrows, rng):
    dout = rng.standard_normal((10, 6))
    inp = rng.standard_normal((10, 11))
    dweight = np.full((6, 11), 7.0)
    kernels.dense_backward_weight(dweight, dout, inp, 2, 5, nrows, 0, 11)
    expected = dout[:nrows].T @ inp[:nrows]
    assert relative_error(dweight[2:5], expected[2:5]) < 1e-13
    assert (dweight[:2] == 7.0).all() and (dweight[5:] == 7.0).all()
    dbias = np.full(6, 7.0)
    kernels.dense_backward_bias(dbias, dout, nrows)
    assert relative_error(dbias, dout[:nrows].sum(axis=0)) < 1e-13


@pytest.mark.parametrize("nrows", [kernels.MAX_SUM_ROWS + 1, 300])
def test_dense_backward_weight_in_passes_sums_as_one_pass(nrows, rng):
    # more rows than MAX_SUM_ROWS: summed in passes, each continuing the
    # sums of the one before, so every weight gets the very same value as
    # from a single pass (and the oracle's up to rounding)
    dout = rng.standard_normal((nrows, 9)).astype(np.float32)
    inp = rng.standard_normal((nrows, 150)).astype(np.float32)
    in_passes = np.full((9, 150), 7.0, np.float32)
    kernels.dense_backward_weight(in_passes, dout, inp, 0, 9, nrows, 0, 150)
    one_pass = np.full((9, 150), 7.0, np.float32)
    kernels.rows_times_matrix(one_pass, dout.T.copy(), inp, 0, 9, nrows, 0, 150, nrows, 0)
    assert np.array_equal(in_passes, one_pass)
    expected = dout.T.astype(np.float64) @ inp.astype(np.float64)
    assert relative_error(in_passes, expected) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# dout's rows 2 KB or 4 KB apart (copied), or 2000 / 4000 bytes (read in place)
@pytest.mark.parametrize("fan_out", [512, 500])
def test_weight_gradients_from_copied_deltas_are_the_in_place_ones(fan_out, dtype, rng):
    # deltas_times_inputs copies dout's columns into contiguous rows (where
    # dout's rows fall into few L1 sets), in chunks of weight rows: at 128
    # batch rows, chunks of 64, so that rows 4..132 (whole 16s, with the
    # transposed tail of 300 inputs) take two and rows 132..140 one more;
    # 300 inputs also take whole blocks and a narrow block. Every weight
    # must be the very value that rows_times_matrix gives reading dout.T in
    # place.
    nrows, C, j0, j1 = kernels.MAX_SUM_ROWS, 300, 4, 140
    assert (fan_out * np.dtype(dtype).itemsize % kernels.CONFLICT_STRIDE == 0) == (fan_out == 512)
    assert j1 - j0 > 2 * (kernels.PACK_VALUES // nrows) and C >= kernels.PACKED_DELTAS_MIN_COLUMNS
    dout = rng.standard_normal((nrows, fan_out)).astype(dtype)
    inp = rng.standard_normal((nrows, C)).astype(dtype)
    out = np.full((fan_out, C), 7.0, dtype)
    kernels.dense_backward_weight(out, dout, inp, j0, j1, nrows, 0, C)
    in_place = np.full((fan_out, C), 7.0, dtype)
    main = C // kernels.NARROW_COLUMNS * kernels.NARROW_COLUMNS
    kernels.rows_times_matrix(in_place, dout.T, inp, j0, j1, nrows, 0, main, nrows, 0)
    kernels.tail_columns(in_place, dout.T, inp, np.zeros(kernels.PACK_VALUES, dtype), j0, j1,
                         nrows, main, C, 0)
    assert np.array_equal(out, in_place)
    expected = dout[:, j0:j1].T.astype(np.float64) @ inp.astype(np.float64)
    assert relative_error(out[j0:j1], expected) < (1e-5 if dtype == np.float32 else 1e-12)
    assert (out[:j0] == 7.0).all() and (out[j1:] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_source_whose_rows_share_few_cache_sets_is_packed_to_the_same_sums(dtype, rng):
    # rows_times_matrix packs PACK_MIN_ROWS output rows' source panel when
    # its rows are a multiple of CONFLICT_STRIDE bytes apart (512 columns),
    # not when they are not (500 columns): the same sums either way
    nt, rows = 100, kernels.PACK_MIN_ROWS
    coef = rng.standard_normal((rows, nt)).astype(dtype)
    wide = rng.standard_normal((nt, 512)).astype(dtype)
    narrow = np.ascontiguousarray(wide[:, :500])
    packed = np.full((rows, 500), 7.0, dtype)
    in_place = np.full((rows, 500), 7.0, dtype)
    kernels.rows_times_matrix(packed, coef, wide, 0, rows, nt, 0, 500, nt, 0)
    kernels.rows_times_matrix(in_place, coef, narrow, 0, rows, nt, 0, 500, nt, 0)
    assert np.array_equal(packed, in_place)
    expected = coef.astype(np.float64) @ narrow.astype(np.float64)
    assert relative_error(packed, expected) < (1e-5 if dtype == np.float32 else 1e-12)


def test_softmax_crossentropy_forward_backward(rng):
    logits = rng.standard_normal((8, 5)) * 30  # large logits: stability matters
    labels = rng.integers(0, 5, 8).astype(np.int32)
    weights = rng.uniform(0, 2, 8)
    probs = logits.copy()
    row_stats = np.full((8, 2), 7.0)
    heads.softmax_crossentropy_forward(probs, row_stats, labels, weights, 2, 8)
    expected = reference.softmax(logits[2:8])
    assert relative_error(probs[2:8], expected) < 1e-13
    assert (probs[:2] == logits[:2]).all()
    expected_loss = -weights[2:8] * np.log(expected[np.arange(6), labels[2:8]])
    assert relative_error(row_stats[2:8, 0], expected_loss) < 1e-10
    assert (row_stats[2:8, 1] == (np.argmax(logits[2:8], axis=1) == labels[2:8])).all()
    assert (row_stats[:2] == 7.0).all()
    dlogits = np.zeros_like(probs)
    total = weights[2:8].sum()
    heads.softmax_crossentropy_backward(dlogits, probs, labels, weights, 1 / total, 2, 8)
    onehot = np.eye(5)[labels[2:8]]
    expected_delta = (expected - onehot) * weights[2:8, None] / total
    assert relative_error(dlogits[2:8], expected_delta) < 1e-13


@pytest.mark.parametrize("output", ["linear", "sigmoid"])
def test_head_kernels_against_the_oracle(rng, output):
    K = 3
    logits = rng.standard_normal((8, K)) * 30  # large logits: stability matters
    targets = (rng.standard_normal((8, K)) if output == "linear"
               else rng.integers(0, 2, (8, K)).astype(np.float64))
    weights = rng.uniform(0, 2, 8)
    scale = heads.target_scale(output, targets[2:8], K, np.float64)
    out = logits.copy()
    row_stats = np.full((8, 2), 7.0)
    heads.head_forward(out, row_stats, np.zeros(8, np.int32), targets, weights, scale,
                       heads.HEADS[output], 2, 8)
    expected = heads.oracle_output(output, logits[2:8])
    assert relative_error(out[2:8], expected) < 1e-13 and (out[:2] == logits[:2]).all()
    total = weights[2:8].sum()
    losses, delta = heads.oracle_loss_and_delta(output, logits[2:8], expected, targets[2:8],
                                                weights[2:8] / total)
    assert relative_error(row_stats[2:8, 0], weights[2:8] * losses) < 1e-12
    assert (row_stats[:2] == 7.0).all()
    if output == "linear":  # the row scores give sklearn's R² of the rows
        from sklearn.metrics import r2_score
        r2 = heads.score(output, row_stats[2:8, 1].sum(), 6)
        assert abs(r2 - r2_score(targets[2:8], out[2:8])) < 1e-12
    else:  # subset accuracy
        assert (row_stats[2:8, 1] == ((out[2:8] >= 0.5) == targets[2:8]).all(axis=1)).all()
    dout = np.zeros_like(out)
    heads.head_backward(dout, out, np.zeros(8, np.int32), targets, weights, 1 / total,
                        heads.HEADS[output], 2, 8)
    assert relative_error(dout[2:8], delta) < 1e-13 and (dout[:2] == 0).all()


# (rows of 9 values: float rows asked for a step early, uint8 rows while an
# earlier one is copied; of 30,000: more than kernels.EARLY_PREFETCH_BYTES
# for 5 rows, asked for while an earlier one is copied)
@pytest.mark.parametrize("columns", [9, 30000])
@pytest.mark.parametrize("x_dtype", [np.uint8, np.float32, np.float64])
def test_gather_rows_scales_uint8_and_follows_index(rng, x_dtype, columns):
    if x_dtype == np.uint8:
        X = rng.integers(0, 256, (20, columns), dtype=np.uint8)
    else:
        X = rng.standard_normal((20, columns)).astype(x_dtype)
    y = rng.integers(0, 3, 20).astype(np.int32)
    idx = rng.permutation(20)
    sample_weight = rng.uniform(0, 1, 20).astype(np.float32)
    out = np.zeros((5, columns), np.float32)
    labels = np.zeros(5, np.int32)
    weights = np.zeros(5, np.float32)
    targets = np.zeros((5, 2), np.float32)
    data = make_data(X, y, sample_weight, idx, np.dtype(np.float32))
    scale = np.float32(1 / 255) if x_dtype == np.uint8 else np.float32(1)
    assert data.scale == scale and data.X.dtype == np.uint8
    early = kernels.early_prefetch(data.X, 5, data.x_bytes)
    assert early == (x_dtype != np.uint8 and columns == 9)
    kernels.prefetch_rows(data.X, idx, 10, 0, 5, data.x_bytes)  # (a hint: no effect on values)
    kernels.gather_rows(out, labels, targets, weights, data, 10, False, 0, 5)
    assert np.array_equal(out, (X[idx[10:15]] * scale).astype(np.float32))
    assert np.array_equal(labels, y[idx[10:15]])
    assert np.array_equal(weights, sample_weight[idx[10:15]])
    assert (targets == 0).all()
    # float targets (linear and sigmoid heads) go to targets, labels untouched
    y2 = rng.standard_normal((20, 2)).astype(np.float32)
    data = make_data(X, y2, sample_weight, idx, np.dtype(np.float32))
    kernels.gather_rows(out, labels, targets, weights, data, 3, False, 1, 5)
    assert np.array_equal(targets[1:5], y2[idx[4:8]]) and (targets[0] == 0).all()
    assert np.array_equal(labels, y[idx[10:15]])


def float32_ir(function, *args):
    """LLVM IR of a kernel compiled afresh (cached code cannot be inspected)
    for the given float32 arguments."""
    fresh = numba.njit(fastmath=jit.FASTMATH, error_model="numpy")(function.py_func)
    fresh(*args)
    ir = fresh.inspect_llvm(fresh.signatures[0])
    # the kernel's own body, not the wrappers that box its result for Python
    bodies = [f for f in ir.split("\ndefine ")[1:] if re.match(r"[^@]*@_ZN(?!7cpython)", f)]
    assert bodies, "no kernel body found in the IR"
    return "\n".join(bodies)


def test_float32_kernels_never_widen_to_float64():
    """A float64 constant or scalar in a float32 kernel makes it silently
    compute in float64: LLVM then has to `fpext` float to double."""
    f32 = np.float32
    inp, out = np.ones((4, 8), f32), np.ones((4, 3), f32)
    weight, vec = np.ones((3, 8), f32), np.ones(3, f32)
    labels = np.zeros(4, np.int32)
    compiled = {
        "dense_forward": float32_ir(kernels.dense_forward, out, inp, weight,
                                    np.ones((0, 8, kernels.BLOCK_COLUMNS), f32),
                                    np.ones(4 * 64, f32), vec, 0, True, 0, 4, 0, 3),
        "wide_forward": float32_ir(kernels.wide_forward, np.ones((4, 256), f32), inp,
                                   np.ones((256, 8), f32), np.ones(256 * 64, f32), 0, 4, 0, 256),
        "transpose_weight_block": float32_ir(kernels.transpose_weight_block, inp.T.copy(), weight,
                                             0, 0, 0, 8),
        "dense_backward_input": float32_ir(kernels.dense_backward_input, inp, out, weight, inp, 0,
                                           True, 0, 4, 0, 8),
        "round_columns": float32_ir(kernels.round_columns, weight, weight, 0, 8),
        "dense_backward_weight": float32_ir(kernels.dense_backward_weight, weight, out, inp, 0, 3, 4, 0, 8),
        "dense_backward_bias": float32_ir(kernels.dense_backward_bias, vec, out, 4),
        "softmax_crossentropy_backward": float32_ir(
            heads.softmax_crossentropy_backward, out, out, labels, np.ones(4, f32), f32(0.25),
            0, 4),
        "squared_error_backward": float32_ir(
            heads.squared_error_backward, out, out, out, np.ones(4, f32), f32(0.25), 0, 4),
        "output_minus_target_backward": float32_ir(
            heads.output_minus_target_backward, out, out, out, np.ones(4, f32), f32(0.25), 0, 4),
        "sgd_update": float32_ir(optimizers.sgd_update, vec, vec, 0, 0, 1, 3, 0, 3, f32(0.1),
                                 f32(0)),
        "momentum_update": float32_ir(optimizers.momentum_update, vec, vec, vec, 0, 0, 1, 3, 0,
                                      3, f32(0.1), f32(0.9), f32(0), True),
        "adam_update": float32_ir(optimizers.adam_update, vec, vec, vec, vec, 0, 0, 1, 3, 0, 3,
                                  f32(0.1), f32(0.9), f32(0.999), f32(1e-7), f32(0)),
    }
    widened = [name for name, ir in compiled.items() if "fpext" in ir]
    assert not widened, f"float32 kernels computing in float64: {widened}"
    # the check can see a widening: a float64 literal in a float32 loop
    assert "fpext" in float32_ir(_widening_kernel, vec)


def _update(name, state, p0, g0, rows, stride, k0, k1):
    # optimizer kernel `name` on state = (params, grads, state1, state2)
    f32 = np.float32
    params, grads, first, second = state
    if name == "sgd":
        return optimizers.sgd_update(params, grads, p0, g0, rows, stride, k0, k1, f32(0.1),
                                     f32(0.01))
    if name == "momentum":
        return optimizers.momentum_update(params, grads, first, p0, g0, rows, stride, k0, k1,
                                          f32(0.1), f32(0.9), f32(0.01), True)
    return optimizers.adam_update(params, grads, first, second, p0, g0, rows, stride, k0, k1,
                                  f32(0.1), f32(0.9), f32(0.999), f32(1e-7), f32(0.01))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("k0, k1", [(0, 100), (0, 48), (48, 100), (16, 52)])
def test_an_update_of_rows_is_each_row_updated_alone(name, k0, k1):
    # 7 rows of 100 from parameter 300 (their gradients from 20): whole rows
    # go as one range (optimizers.one_range), pieces by rows; the same
    # values either way, bit for bit, and nothing outside rows x [k0, k1)
    # changes
    def state():
        values = np.random.default_rng(1).standard_normal((4, 1200)).astype(np.float32)
        values[3] = np.abs(values[3])  # Adam's second moments
        return values
    together, alone = state(), state()
    check = _update(name, together, 300, 20, 7, 100, k0, k1)
    for row in range(7):
        _update(name, alone, 300 + 100 * row, 20 + 100 * row, 1, 100, k0, k1)
    np.testing.assert_array_equal(together, alone)
    assert check == 0.0
    changed = np.zeros(1200, bool)
    for row in range(7):
        changed[300 + 100 * row + k0:300 + 100 * row + k1] = True
    assert (together[0] != state()[0])[changed].all()
    np.testing.assert_array_equal(together[0][~changed], state()[0][~changed])


@numba.njit
def _widening_kernel(v):
    for i in range(v.shape[0]):
        v[i] = v[i] * 0.1


# --- exp and the finiteness test under the fastmath flags -------------------

@jit.kernel
def _exp_all(out, x):
    for i in range(x.shape[0]):
        out[i] = expf.fast_exp(x[i])


@pytest.mark.parametrize("dtype, lowest, highest, bound", [
    # float32: 8.2e-8 of the exact exp (one ulp); float64: 3.1e-16 of the C
    # library's (2.1e-16 of the exact value, libm's own 1.2e-16), measured
    (np.float32, -87.0, 88.0, 1e-7),
    (np.float64, -708.0, 709.0, 5e-16),
])
def test_fast_exp_is_within_an_ulp_or_two_and_clamped(dtype, lowest, highest, bound):
    x = np.linspace(lowest, highest, 200_001, dtype=dtype)
    out = np.empty_like(x)
    _exp_all(out, x)
    exact = np.array([math.exp(v) for v in x.astype(np.float64)])
    assert np.max(np.abs(out - exact) / exact) < bound
    special = np.array([np.nan, np.inf, -np.inf, -1000, 1000, 0], dtype)
    out = np.empty_like(special)
    _exp_all(out, special)
    assert np.isnan(out[0])
    # clamped to [lowest, highest]: never inf, never subnormal
    assert out[1] == out[4] and abs(out[1] / math.exp(highest) - 1) < bound
    assert out[2] == out[3] and abs(out[2] / math.exp(lowest) - 1) < bound
    assert out[5] == 1


@jit.kernel
def _tanh_all(out, x):
    for i in range(x.shape[0]):
        out[i] = expf.fast_tanh(x[i])


def tanh_relative_error(x, exact):
    # fast_tanh's largest relative error on x against `exact`, tanh(x)
    out = np.empty_like(x)
    _tanh_all(out, x)
    nonzero = exact != 0
    return np.max(np.abs(out - exact)[nonzero] / np.abs(exact[nonzero]))


def assert_tanh_keeps_nan_and_saturates(dtype):
    special = np.array([np.nan, np.inf, -np.inf, 1000, -1000, 0], dtype)
    out = np.empty_like(special)
    _tanh_all(out, special)
    assert np.isnan(out[0])
    assert list(out[1:]) == [1, -1, 1, -1, 0]


def test_fast_tanh_float32_is_within_2e7_near_zero_and_far_from_it():
    # 1.6e-7 measured (two float32 ulp; float32's own np.tanh 1.1e-7): the
    # small arguments, where 1 - 2 / (exp(2x) + 1) would cancel, included
    for x in (np.linspace(-12, 12, 1_000_001, dtype=np.float32),
              np.linspace(-0.01, 0.01, 100_001, dtype=np.float32),
              np.float32([1e-20, -3e-8, 1e-38, 0.17, 0.18, -0.35])):
        assert tanh_relative_error(x, np.tanh(x.astype(np.float64))) < 2e-7
    assert_tanh_keeps_nan_and_saturates(np.float32)


def test_fast_tanh_float64_is_within_1e15_of_libm_tanh():
    # 5.2e-16 on [-25, 25], 6.6e-16 on [-0.01, 0.01] (measured; a few
    # float64 ulp): no cancellation near 0
    for x in (np.linspace(-25, 25, 100_001), np.linspace(-0.01, 0.01, 100_001),
              np.array([1e-300, -3e-17, 0.17, 0.35, 0.36])):
        assert tanh_relative_error(x, np.array([math.tanh(v) for v in x])) < 1e-15
    assert_tanh_keeps_nan_and_saturates(np.float64)


# CPUs this machine can run whose code generation differs from the host's:
# SSE2 only, AVX without FMA, AVX2 with FMA
RUNNABLE_CPUS = ["x86-64", "sandybridge", "haswell"]

EXP_CHILD = textwrap.dedent("""
    import math

    import numpy as np
    from fastmlp import expf, jit

    @jit.kernel
    def exp_all(out, x):
        for i in range(x.shape[0]):
            out[i] = expf.fast_exp(x[i])

    x = np.linspace(-87, 88, 1_000_001, dtype=np.float32)
    out = np.empty_like(x)
    exp_all(out, x)
    exact = np.exp(x.astype(np.float64))
    print(np.max(np.abs(out - exact) / exact))

    @jit.kernel
    def tanh_all(out, x):
        for i in range(x.shape[0]):
            out[i] = expf.fast_tanh(x[i])

    x = np.linspace(-12, 12, 1_000_001, dtype=np.float32)
    tanh_all(out, x)
    exact = np.tanh(x.astype(np.float64))
    print(np.max(np.abs(out - exact)[exact != 0] / np.abs(exact[exact != 0])))

    x = np.linspace(-708, 709, 100_001)
    out = np.empty_like(x)
    exp_all(out, x)
    exact = np.array([math.exp(v) for v in x])
    print(np.max(np.abs(out - exact) / exact))
    x = np.linspace(-25, 25, 100_001)
    tanh_all(out, x)
    exact = np.array([math.tanh(v) for v in x])
    print(np.max(np.abs(out - exact)[exact != 0] / np.abs(exact[exact != 0])))
""")


@pytest.mark.parametrize("cpu", RUNNABLE_CPUS)
def test_fast_exp_and_tanh_keep_their_accuracy_on_other_cpus(cpu, tmp_path):
    # Without FMA nothing ties n * LN2_HIGH and n * LN2_LOW to their own
    # subtractions, and with `reassoc` LLVM folded them into n * ln2 rounded
    # to float32: 4.1e-6 on x86-64 and sandybridge code (3.0e-7 with FMA)
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="",
               NUMBA_CACHE_DIR=str(tmp_path))
    script = tmp_path / "exp_child.py"  # a file: jit.kernel caches what it compiles
    script.write_text(EXP_CHILD)
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    exp_error, tanh_error, exp_error_64, tanh_error_64 = (
        float(value) for value in child.stdout.split()[-4:])
    assert exp_error < 1e-7
    assert tanh_error < 2e-7
    assert exp_error_64 < 5e-16
    assert tanh_error_64 < 1e-15


@jit.kernel
def _finite_sum(values):
    # a fixed-length sum: the shape in which math.isfinite called NaN finite
    total = 0.0
    for i in range(16):
        total += values[i]
    return kernels.finite(total)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_sees_nan_and_inf_under_the_fastmath_flags(bad):
    values = np.zeros(16)
    assert _finite_sum(values)
    values[5] = bad
    assert not _finite_sum(values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nrows", [0, 13, kernels.TAIL_ROWS + 3])
# output rows: fewer than 16 (the padded panel); two blocks of 16 (the
# transposed tail) and 3 rows left over (the padded panel)
@pytest.mark.parametrize("j0,j1", [(1, 8), (1, 36)])
def test_tail_columns_sum_as_a_whole_narrow_block(j0, j1, nrows, dtype, rng):
    # the last C % 16 columns run on a zero-padded panel or, in whole blocks
    # of 16 weight rows, transposed (weight_tail_columns): either way each
    # gets the very value it gets as a column of a whole 16-column block
    # (one chain of multiply-adds in source order), also over several
    # passes of TAIL_ROWS
    C = 150  # 2 blocks of 64, a narrow block of 16, a tail of 6
    coef = rng.standard_normal((max(nrows, 1), 40)).astype(dtype)
    src = rng.standard_normal((max(nrows, 1), C)).astype(dtype)
    out = np.full((40, C), 7.0, dtype)
    kernels.dense_backward_weight(out, coef, src, j0, j1, nrows, 0, C)
    padded = np.zeros((max(nrows, 1), 160), dtype)
    padded[:, :C] = src
    whole = np.full((40, 160), 7.0, dtype)
    kernels.dense_backward_weight(whole, coef, padded, j0, j1, nrows, 0, 160)
    assert np.array_equal(out[j0:j1], whole[j0:j1, :C])
    assert (out[:j0] == 7.0).all() and (out[j1:] == 7.0).all()
    expected = coef[:nrows, j0:j1].T.astype(np.float64) @ src[:nrows].astype(np.float64)
    assert relative_error(out[j0:j1], expected) < (1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("nt", [0, 1, 13])
# whole register blocks; blocks, narrow blocks of 16 and a remainder; none;
# narrow blocks only
@pytest.mark.parametrize("C", [64, 150, 7, 48])
# source rows summed in one pass, or in passes of 5 (the last one shorter)
@pytest.mark.parametrize("sum_rows", [13, 5])
def test_rows_times_matrix_blocks_and_remainders(C, nt, sum_rows, dtype, tol, rng):
    coef = rng.standard_normal((11, 13)).astype(dtype)
    src = rng.standard_normal((13, C)).astype(dtype)
    out = np.full((11, C), 7.0, dtype)
    # 2 groups of 4 rows and 1 more
    kernels.rows_times_matrix(out, coef, src, 1, 10, nt, 0, C, sum_rows, 0)
    expected = coef[1:10, :nt].astype(np.float64) @ src[:nt].astype(np.float64)
    if nt:
        assert relative_error(out[1:10], expected) < tol
    else:
        assert (out[1:10] == 0).all()
    assert (out[0] == 7.0).all() and (out[10] == 7.0).all()
    # a range of columns from a block boundary on, the others untouched
    if C > 64:
        out[...] = 7.0
        kernels.rows_times_matrix(out, coef, src, 1, 10, nt, 64, C, sum_rows, 0)
        if nt:
            assert relative_error(out[1:10, 64:], expected[:, 64:]) < tol
        assert (out[:, :64] == 7.0).all()
    # src's columns into out's from column 5 (out_col) on: the same values,
    # the columns before and after untouched
    shifted = np.full((11, C + 9), 7.0, dtype)
    kernels.rows_times_matrix(shifted, coef, src, 1, 10, nt, 0, C, sum_rows, 5)
    out[...] = 7.0
    kernels.rows_times_matrix(out, coef, src, 1, 10, nt, 0, C, sum_rows, 0)
    assert np.array_equal(shifted[:, 5:C + 5], out)
    assert (shifted[:, :5] == 7.0).all() and (shifted[:, C + 5:] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_panels_give_the_unpacked_values(dtype, rng):
    # more than PACK_MIN_ROWS output rows read the source through a packed
    # copy; the same rows in calls of at most PACK_MIN_ROWS read it in place:
    # the same multiply-adds in the same order, so the same bits
    rows = kernels.PACK_MIN_ROWS * 2 + 5
    nt, C = 150, 150
    coef = rng.standard_normal((rows, nt)).astype(dtype)
    src = rng.standard_normal((nt, C)).astype(dtype)
    packed = np.zeros((rows, C), dtype)
    kernels.rows_times_matrix(packed, coef, src, 0, rows, nt, 0, C, nt, 0)
    unpacked = np.zeros((rows, C), dtype)
    for r0 in range(0, rows, kernels.PACK_MIN_ROWS):
        kernels.rows_times_matrix(unpacked, coef, src, r0, min(rows, r0 + kernels.PACK_MIN_ROWS),
                                  nt, 0, C, nt, 0)
    assert np.array_equal(packed, unpacked)
    assert relative_error(packed, coef.astype(np.float64) @ src) < 1e-5


def relu_like(rng, shape, zeros, dtype):
    # a matrix with about `zeros` of its values 0, half of those -0 (a
    # delta below a relu unit that is off: g * 0)
    values = rng.standard_normal(shape).astype(dtype)
    off = rng.random(shape) < zeros
    values[off] = np.where(rng.random(shape) < 0.5, -0.0, 0.0)[off]
    return values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# a listed block's columns: one call, one call and a masked vector, several
# calls (float32: 128 a call), fewer than a vector
@pytest.mark.parametrize("C", [64, 100, 300, 5])
@pytest.mark.parametrize("zeros", [0.5, 0.9, 1.0])
# one pass over the sources; several (300 x 64 float32 values: 75 KB,
# beyond LISTED_MAX_BYTES), as an image's pixels take
@pytest.mark.parametrize("nt", [25, 300])
def test_listed_rows_give_the_register_blocks_values(dtype, C, zeros, nt, rng):
    """Where many coefficients are 0, rows_times_matrix sums pairs of rows
    over the sources either needs: the same bits as the register blocks'
    chains over every source, signs of zeros included, for odd row ranges
    and a shifted output, whether the sums take one pass over the sources
    or several, each continuing the last."""
    coef = relu_like(rng, (13, nt), zeros, dtype)
    src = rng.standard_normal((nt, C)).astype(dtype)
    assert kernels.listed_rows(coef, 1, 12, nt)
    listed = np.full((13, C + 3), 7.0, dtype)
    blocks = listed.copy()
    kernels.rows_times_matrix(listed, coef, src, 1, 12, nt, 0, C, nt, 3)
    kernels.dense_rows_times_matrix(blocks, coef, src, 1, 12, nt, 0, C, nt, 3)
    assert np.array_equal(listed, blocks)
    assert np.array_equal(np.signbit(listed), np.signbit(blocks))
    assert (listed[0] == 7.0).all() and (listed[12] == 7.0).all()
    assert (listed[:, :3] == 7.0).all()
    expected = coef[1:12].astype(np.float64) @ src
    assert relative_error(listed[1:12, 3:], expected) < (1e-5 if dtype == np.float32 else 1e-13)


def test_listed_rows_skip_the_sources_of_zero_coefficients(rng):
    # a source that only zero coefficients multiply is never read: an inf
    # there leaves the listed sums finite, where the register blocks' give
    # NaN (0 * inf); which path runs depends on the share of zeros and on
    # the coefficients' layout. 784 sources (an image's pixels) take 13
    # passes; the one zero source is in the last.
    for nt, zero in ((64, 3), (784, 700)):
        coef = relu_like(rng, (10, nt), 0.5, np.float32)
        coef[:, zero] = 0
        src = rng.standard_normal((nt, 128)).astype(np.float32)
        src[zero] = np.inf
        listed = np.zeros((10, 128), np.float32)
        blocks = listed.copy()
        kernels.rows_times_matrix(listed, coef, src, 0, 10, nt, 0, 128, nt, 0)
        kernels.dense_rows_times_matrix(blocks, coef, src, 0, 10, nt, 0, 128, nt, 0)
        assert np.isfinite(listed).all() and np.isnan(blocks).all()
    dense_coef = rng.standard_normal((10, 64)).astype(np.float32)
    assert not kernels.listed_rows(dense_coef, 0, 10, 64)
    assert kernels.listed_rows(coef[:, :64], 0, 10, 64)
    assert not kernels.listed_rows(np.asfortranarray(coef[:, :64]), 0, 10, 64)


def sorted_pairs(dout, j0, j1, nrows):
    """zero_sorted_pairs' twin: (the pairs of weight rows j0:j1, relative to
    j0, by descending count of zero deltas over the first PAIR_SAMPLE_ROWS
    batch rows, stable; the share of those pairs' deltas both 0 over those
    rows)"""
    zeros = dout[:min(nrows, kernels.PAIR_SAMPLE_ROWS), j0:j1] == 0
    order = np.argsort(-zeros.sum(axis=0), kind="stable")
    pairs = [tuple(order[p:p + 2]) for p in range(0, j1 - j0, 2)]
    both = [zeros[:, pair[0]] & zeros[:, pair[1]] for pair in pairs if len(pair) == 2]
    return pairs, float(np.mean(both))


def sorted_windows(j0, j1, nrows):
    """dense_backward_weight's windows of weight rows"""
    most = min(kernels.SORTED_MAX_ROWS, kernels.PACK_VALUES // nrows)
    span = -(-(j1 - j0) // -(-(j1 - j0) // most))
    return [(w0, min(j1, w0 + span)) for w0 in range(j0, j1, span)]


def test_zero_sorted_pairs_puts_weight_rows_of_many_zeros_together(rng):
    # units 0 for a whole batch, units 0 for half of it and units never 0,
    # shuffled: the sort pairs each kind with its own
    for dtype in (np.float32, np.float64):
        for j0, j1, nrows in ((0, 64, 100), (5, 106, 100), (0, 7, 3), (2, 4, 128)):
            dout = relu_like(rng, (kernels.MAX_SUM_ROWS, 120), 0.5, dtype)
            kind = rng.integers(0, 3, 120)
            dout[:, kind == 0] = 0.0
            dout[:, kind == 2] = rng.uniform(1, 2, (kernels.MAX_SUM_ROWS, (kind == 2).sum()))
            order = np.full(kernels.SORTED_MAX_ROWS, -1, np.int32)
            share = kernels.zero_sorted_pairs(order, dout, j0, j1, nrows)
            pairs, expected = sorted_pairs(dout, j0, j1, nrows)
            n = j1 - j0
            assert sorted(order[:n]) == list(range(n))
            assert [tuple(order[p:min(p + 2, n)]) for p in range(0, n, 2)] == pairs
            assert share == pytest.approx(expected, abs=1e-12)
            dead = np.flatnonzero(kind[j0:j1] == 0)
            assert set(order[:len(dead) // 2 * 2]) <= set(dead)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# weight rows and inputs: the regression benchmark's first and second
# layers (a masked last vector; one listed call), odd rows of a wide layer
# past a column piece at 64 (several calls a row, and at 100 batch rows
# three windows), a few of each
@pytest.mark.parametrize("j0,j1,k0,C", [(0, 128, 0, 100), (0, 64, 0, 128), (3, 200, 64, 300),
                                        (1, 6, 0, 5)])
# batch rows: fewer than a transposed tile, 100, a batch summed at once
@pytest.mark.parametrize("nrows", [3, 100, kernels.MAX_SUM_ROWS])
def test_sorted_pairs_give_the_register_blocks_values(dtype, j0, j1, k0, C, nrows, rng):
    """Where many pairs of deltas are both 0 once sorted by their zeros,
    dense_backward_weight sums those pairs of weight rows, most of them not
    neighbours, over the batch rows either needs: the same bits as the
    register blocks' chains over every row, signs of zeros included, and
    nothing written outside rows j0:j1 and columns k0:C."""
    dout = relu_like(rng, (kernels.MAX_SUM_ROWS + 2, 201), 0.8, dtype)
    dout[:, rng.choice(201, 40, replace=False)] = -0.0  # units off for the whole batch
    inp = rng.standard_normal((kernels.MAX_SUM_ROWS + 2, C)).astype(dtype)
    share = kernels.listed_min_pair_zeros(np.dtype(dtype).itemsize)
    for w0, w1 in sorted_windows(j0, j1, nrows):
        pairs, both = sorted_pairs(dout, w0, w1, nrows)
        assert both >= share
        assert w1 - w0 < 8 or sum(abs(pair[-1] - pair[0]) > 1 for pair in pairs) > (w1 - w0) // 4
    listed = np.full((201, C), 7.0, dtype)
    blocks = listed.copy()
    kernels.dense_backward_weight(listed, dout, inp, j0, j1, nrows, k0, C)
    kernels.blocked_backward_weight(blocks, dout, inp, j0, j1, nrows, k0, C)
    assert np.array_equal(listed, blocks)
    assert np.array_equal(np.signbit(listed), np.signbit(blocks))
    assert (listed[:j0] == 7.0).all() and (listed[j1:] == 7.0).all()
    assert (listed[:, :k0] == 7.0).all()
    expected = dout[:nrows, j0:j1].T.astype(np.float64) @ inp[:nrows, k0:]
    assert relative_error(listed[j0:j1, k0:], expected) < (1e-5 if dtype == np.float32 else 1e-13)


def test_sorted_pairs_skip_the_inputs_of_zero_deltas(rng):
    # an input row whose deltas are all 0 is never read by the listed pairs:
    # an inf there leaves their sums finite, where the register blocks'
    # give NaN (0 * inf)
    dout = relu_like(rng, (100, 128), 0.8, np.float32)
    dout[40] = 0
    inp = rng.standard_normal((100, 100)).astype(np.float32)
    inp[40] = np.inf
    listed = np.zeros((128, 100), np.float32)
    blocks = listed.copy()
    kernels.dense_backward_weight(listed, dout, inp, 0, 128, 100, 0, 100)
    kernels.blocked_backward_weight(blocks, dout, inp, 0, 128, 100, 0, 100)
    assert np.isfinite(listed).all() and np.isnan(blocks).all()
    # Each window goes its own way: the first 64 weight rows' deltas are 0
    # in row 40 alone, so only the last 64's are listed (windows of 64 at
    # 128 rows).
    dout = relu_like(rng, (128, 128), 0.8, np.float32)
    dout[:, :64] = 1.0
    dout[40] = 0
    inp = rng.standard_normal((128, 100)).astype(np.float32)
    inp[40] = np.inf
    listed[:] = 0
    kernels.dense_backward_weight(listed, dout, inp, 0, 128, 128, 0, 100)
    assert np.isnan(listed[:64]).all() and np.isfinite(listed[64:]).all()
    # which windows are listed: where the share of pairs of sampled deltas
    # both 0 (zero_sorted_pairs' count, the same as its twin's here) reaches
    # the compiled target's (AVX-512: float32 30%, float64 40%; AVX2 50%);
    # about 22% (0.45 zeros), 35% (0.58), 46% (0.67) and 64% (0.8) here
    taken = {np.float32: set(), np.float64: set()}
    for zeros in (0.45, 0.58, 0.67, 0.8):
        deltas = relu_like(rng, (100, 128), zeros, np.float32)
        deltas[40] = 0
        inputs = rng.standard_normal((100, 100)).astype(np.float32)
        inputs[40] = np.inf
        for dtype in taken:
            share = kernels.listed_min_pair_zeros(np.dtype(dtype).itemsize)
            out = np.zeros((128, 100), dtype)
            kernels.dense_backward_weight(out, deltas.astype(dtype), inputs.astype(dtype),
                                          0, 128, 100, 0, 100)
            for w0, w1 in sorted_windows(0, 128, 100):
                lists = sorted_pairs(deltas, w0, w1, 100)[1] >= share
                assert np.isfinite(out[w0:w1]).all() == lists
                taken[dtype].add(lists)
    assert taken[np.float32] == taken[np.float64] == {False, True}
    # more rows than one sum takes: never listed
    tall = relu_like(rng, (kernels.MAX_SUM_ROWS + 1, 128), 0.9, np.float32)
    tall[40] = 0
    tall_inputs = rng.standard_normal((kernels.MAX_SUM_ROWS + 1, 100)).astype(np.float32)
    tall_inputs[40] = np.inf
    kernels.dense_backward_weight(listed, tall, tall_inputs, 0, 128, kernels.MAX_SUM_ROWS + 1,
                                  0, 100)
    assert np.isnan(listed).all()
