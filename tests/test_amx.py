"""bfloat16 on packed operands (fastmlp/amx.py, fastmlp/amx_layers.py,
fastmlp/dpbf16.py): the packed layouts everywhere; the products (AMX tiles
or vdpbf16ps) and the layers that use them where the CPU runs them,
against the float64 product and the bfloat16 oracle; the assembly of both
products for their CPUs on any CPU."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastmlp
from fastmlp import amx, dpbf16, reference
from fastmlp.amx_layers import amx_product
from fastmlp.bfloat16 import round_array

from conftest import random_problem, relative_error

needs_amx = pytest.mark.skipif(
    not amx.usable(), reason="needs a CPU with AMX (amx_bf16: Intel Xeon, with Linux's grant of "
                             "the tile state) or AVX512_BF16 with AMD's tuning (Zen 4 and "
                             "later), and kernels compiled for it; elsewhere bfloat16 is "
                             "emulated")


def bfloat16_values(shape, seed):
    return round_array(np.random.default_rng(seed).standard_normal(shape))


def top_halves(a):
    return (a.view(np.uint32) >> 16).astype(np.uint16)


def test_packing_matches_the_tile_layouts():
    # 21 x 37: the transposes' 8 x 8 tiles and what is left past them
    src = bfloat16_values((21, 37), 0)
    words = src.view(np.uint32)
    # A, rows along K: a window of rows and columns, the rest untouched
    rows = np.full((22, 40), 7, np.uint16)
    amx.pack_rows(rows, src, 2, 17, 3, 31)
    expected = np.full((22, 40), 7, np.uint16)
    expected[2:17, 3:31] = top_halves(src[2:17, 3:31])
    assert np.array_equal(rows, expected)
    # B, pairs of rows: an odd last row pairs with zero, then zero rows
    pairs = np.full((14, 37), 7, np.uint32)
    amx.pack_row_pairs(pairs, src, 2, 21, 26, 1, 36)
    expected = np.full((14, 37), 7, np.uint32)
    for r in range(2, 26, 2):
        low = words[r, 1:36] >> 16 if r < 21 else 0
        high = words[r + 1, 1:36] & 0xFFFF0000 if r + 1 < 21 else 0
        expected[r // 2, 1:36] = high | low
    assert np.array_equal(pairs, expected)
    # A from columns (a transpose): rows 2:19 of src, zeros to column 24;
    # its words go in
    columns = np.full((37, 28), 7, np.uint16)
    amx.pack_columns(columns.view(np.uint32), src, 2, 19, 24)
    expected = np.full((37, 28), 7, np.uint16)
    expected[:, 2:19] = top_halves(src[2:19]).T
    expected[:, 19:24] = 0
    assert np.array_equal(columns, expected)
    # B from pairs of columns: 37 columns, the last paired with zero
    column_pairs = np.full((20, 23), 7, np.uint32)
    amx.pack_column_pairs(column_pairs, src, 1, 21)
    padded = np.concatenate([words, np.zeros((21, 1), np.uint32)], axis=1)
    expected = np.full((20, 23), 7, np.uint32)
    expected[:19, 1:21] = ((padded[1:, 1::2] & 0xFFFF0000) | (padded[1:, ::2] >> 16)).T
    assert np.array_equal(column_pairs, expected)


def test_packed_products_only_where_the_cpu_runs_them_or_when_asked(monkeypatch):
    assert amx.target_has_amx("+avx512f,+amx-tile,+amx-bf16,-amx-fp16")
    assert not amx.target_has_amx("+avx512f,+amx-tile,-amx-bf16")
    assert dpbf16.target_has_dpbf16("znver4", "+avx512f,+avx512bf16,-amx-bf16")
    assert not dpbf16.target_has_dpbf16("znver4", "+avx512f,-avx512bf16")
    # Intel's vdpbf16ps runs at half its float32 FMA rate: not used there
    assert not dpbf16.target_has_dpbf16("cooperlake", "+avx512f,+avx512bf16")
    monkeypatch.setattr(amx, "tile_permission", lambda: True)
    cases = [("amx", ("avx512_bf16", "amx_bf16"), True), ("amx", ("avx512_bf16",), False),
             ("dpbf16", ("avx512_bf16",), True), ("dpbf16", (), False),
             (None, ("avx512_bf16", "amx_bf16"), False)]
    for compiled, flags, expected in cases:
        monkeypatch.setattr(amx, "COMPILED_PRODUCTS", compiled)
        monkeypatch.setattr("fastmlp.bfloat16.native_support", lambda: flags)
        assert amx.usable() == expected, (compiled, flags)
        assert fastmlp.MLP([4, 300, 2], dtype="bfloat16").amx == expected
    monkeypatch.setattr(amx, "tile_permission", lambda: False)  # Linux refused the tiles
    monkeypatch.setattr(amx, "COMPILED_PRODUCTS", "amx")
    assert not amx.usable()
    monkeypatch.setattr(amx, "COMPILED_PRODUCTS", "dpbf16")
    monkeypatch.setenv("FASTMLP_AMX", "0")
    assert not amx.usable()
    assert not fastmlp.MLP([4, 300, 2], dtype="bfloat16").amx


def packed_a(a, rows):
    # A as the tiles read it: rows, K padded to whole steps, `rows` rows
    out = np.zeros((rows, amx.padded(a.shape[1])), np.uint16)
    amx.pack_rows(out, a, 0, a.shape[0], 0, a.shape[1])
    return out


def packed_b(b, columns):
    out = np.zeros((amx.padded(b.shape[0]) // 2, columns), np.uint32)
    amx.pack_row_pairs(out, b, 0, b.shape[0], b.shape[0], 0, b.shape[1])
    return out


@needs_amx
@pytest.mark.parametrize("rows,columns,K", [(32, 64, 32), (16, 32, 96), (45, 50, 100),
                                            (70, 96, 33), (5, 20, 200)])
def test_tile_products_match_the_exact_product(rows, columns, K):
    # A[a0:a0 + rows] @ B[:, b0:b0 + columns] at offsets, with every edge:
    # a last strip of 16 or fewer rows, a last block of fewer columns, a K
    # padded with zeros. Each product of bfloat16 values is exact in float32
    # and the tiles sum in float32: within K roundings of the exact sum.
    a0, b0 = 3, 5
    A = bfloat16_values((a0 + rows, K), 1)
    B = bfloat16_values((K, b0 + columns), 2)
    out = np.full((rows + 2, columns + 3), 9.0, np.float32)
    amx_product(out, packed_a(A, a0 + rows + 32), np.int64(a0), packed_b(B, b0 + columns + 32),
                np.int64(b0), np.int64(rows), np.int64(columns), np.int64(amx.padded(K) // 32))
    A64, B64 = A[a0:].astype(np.float64), B[:, b0:].astype(np.float64)
    exact = A64 @ B64
    bound = K * np.finfo(np.float32).eps * (np.abs(A64) @ np.abs(B64))
    assert np.all(np.abs(out[:rows, :columns] - exact) <= bound)
    assert np.all(out[rows:] == 9.0) and np.all(out[:, columns:] == 9.0)  # nothing past the edge


@needs_amx
@pytest.mark.parametrize("output", ["softmax", "linear"])
def test_layers_on_amx_follow_the_bfloat16_oracle(output):
    # 300 and 290 outputs: whole blocks and a last one of 12 (forward) or
    # 2 (the weight gradient's columns); 70 rows: strips of 32, 32 and 6.
    # The tiles' float32 sums round otherwise than the oracle's chain (no
    # less precisely: test above), so now and then a value that the step
    # rounds to bfloat16 lands one bfloat16 step (2^-8) away from the
    # oracle's, and the gradients it feeds differ there: here by up to
    # 5.5e-4 of a layer's scale (seed 5, the worst of three), where float32
    # products differ by 1.4e-3 to 0.24. A trajectory drifts likewise, as
    # any two orders of the sums would: 50 steps of SGD end 1.5e-3 apart.
    model, X, y = random_problem([37, 300, 290, 5], 70, "relu", np.float32, seed=5)
    if output == "linear":
        y = np.random.default_rng(5).standard_normal((70, 5)).astype(np.float32)
    bf16 = fastmlp.MLP(model.layer_sizes, activation="relu", dtype="bfloat16", output=output)
    assert bf16.amx
    bf16.params[:] = model.params
    loss, dweights, dbiases = bf16.gradients(X, y)
    weights = [w.copy() for w in model.weights]
    biases = [b.copy() for b in model.biases]
    oracle = reference.loss_and_gradients(weights, biases, X, y, "relu", output=output,
                                          bfloat16=True)
    plain = reference.loss_and_gradients(weights, biases, X, y, "relu", output=output)
    for ours, theirs, float32 in zip(dweights + dbiases, oracle[1] + oracle[2],
                                     plain[1] + plain[2]):
        assert relative_error(ours, theirs) < 1e-3
        assert relative_error(ours, float32) > 2 * relative_error(ours, theirs)
    assert abs(loss - oracle[0]) < 1e-5 * max(1.0, abs(oracle[0]))
    outputs = bf16.predict_proba(X) if output == "softmax" else bf16.predict(X)
    expected = reference.forward(weights, biases, X, "relu", output, bfloat16=True)[-1]
    assert relative_error(outputs, expected) < 1e-3


def test_the_peak_loops_are_valid_llvm(monkeypatch):
    # scripts/core_peaks.py: its loops parse and verify for every vector
    # width, whatever this CPU runs (timing them is for the script)
    import llvmlite.binding as llvm
    from conftest import load_script
    peaks = load_script("core_peaks")
    for text in (peaks.fma_ir(16), peaks.fma_ir(8), peaks.fma_ir(8, "double"),
                 peaks.fma_ir(4, "double"), peaks.dpbf16_ir(), peaks.amx_ir()):
        llvm.parse_assembly(text).verify()
    assert peaks.fma_ir(8).count("@llvm.fma.v8f32(") == 1 + peaks.ACCUMULATORS * peaks.UNROLL
    assert (peaks.fma_ir(8, "double").count("@llvm.fma.v8f64(")
            == 1 + peaks.ACCUMULATORS * peaks.UNROLL)


def strip_assembly(strip_function, row_tiles, cpu):
    """The assembly lines of a strip function (amx.block_function,
    dpbf16.strip_function) compiled for LLVM CPU `cpu`, whatever this
    machine is."""
    import llvmlite.binding as llvm
    from llvmlite import ir
    module = ir.Module()
    module.triple = llvm.get_default_triple()
    strip_function(module, row_tiles)
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=cpu, features="", opt=2)
    return machine.emit_assembly(llvm.parse_assembly(str(module))).splitlines()


def inner_loop(lines, products):
    """The lines of the loop around the product instructions (line indices
    `products`): from the label before the first to the jump after the
    last."""
    start = max(i for i in range(products[0]) if lines[i].startswith(".LBB"))
    end = next(i for i in range(products[-1], len(lines)) if re.match(r"\s+j\w+\s", lines[i]))
    return lines[start:end + 1]


@pytest.mark.parametrize("row_tiles", [1, 2])
def test_the_tile_loop_compiles_for_sapphire_rapids_on_any_cpu(row_tiles):
    # the strip's assembly for Intel's first AMX CPU: its K loop is loads
    # and products of tiles alone (no stack, no reconfiguration), and the
    # tile configuration is loaded and released once a call
    lines = strip_assembly(amx.block_function, row_tiles, "sapphirerapids")
    assembly = "\n".join(lines)
    assert assembly.count("ldtilecfg") == 1 and assembly.count("tilerelease") == 1
    products = [i for i, line in enumerate(lines) if "tdpbf16ps" in line]
    assert len(products) == 2 * row_tiles
    loop = inner_loop(lines, products)
    assert sum("tileloadd" in line for line in loop) == row_tiles + 2
    assert not any("%rsp" in line or "ldtilecfg" in line for line in loop), "\n".join(loop)


@pytest.mark.parametrize("cpu", ["znver4", "znver5"])
@pytest.mark.parametrize("row_tiles", [1, 2])
def test_the_dpbf16_loop_keeps_its_accumulators_in_registers_on_any_cpu(cpu, row_tiles):
    # the vdpbf16ps strip's assembly for AMD's AVX-512 CPUs: its K loop
    # holds 8 rows x 2 accumulators in zmm registers, loads B's two vectors
    # and 8 broadcasts of A, and touches no stack
    lines = strip_assembly(dpbf16.strip_function, row_tiles, cpu)
    products = [i for i, line in enumerate(lines) if "vdpbf16ps" in line]
    assert len(products) == 2 * dpbf16.GROUP_ROWS
    loop = inner_loop(lines, products)
    assert all("zmm" in lines[i] for i in products)
    assert len({lines[i].split(",")[-1].strip() for i in products}) == 2 * dpbf16.GROUP_ROWS
    loads = [line for line in loop if "(%" in line and "lea" not in line]
    assert len(loads) == 2 + dpbf16.GROUP_ROWS, "\n".join(loop)
    assert not any("%rsp" in line for line in loop), "\n".join(loop)


KERNELS_COMPILED = """
import json, sys
import numpy as np
import fastmlp
from fastmlp import amx_layers, compile_ahead
compile_ahead.PROCESSES = 1  # every kernel compiled here, none in a child
rng = np.random.default_rng(0)
X = rng.random((64, 20)).astype(np.float32)
y = rng.integers(0, 3, 64)
model = fastmlp.MLP([20, 40, 3], dtype=sys.argv[1], seed=0)
model.fit(X, y, epochs=1, batch_size=32)
model.predict(X)
print(json.dumps({name: len(getattr(amx_layers, name).signatures)
                  for name in ("amx_forward", "amx_backward_input", "amx_backward_weight",
                               "pack_input", "pack_delta", "pack_weights")}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_only_models_on_tiles_compile_the_tile_kernels(tmp_path, dtype):
    """A float32 model compiles none of the packed products' kernels, even
    where the CPU runs them (where the step's branches to them are not
    pruned by the CPU); a bfloat16 model on them compiles them all."""
    if dtype == "bfloat16" and not amx.usable():
        pytest.skip("packed bfloat16 products (AMX or vdpbf16ps) are not usable here")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", KERNELS_COMPILED, dtype], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    if dtype == "float32":
        assert all(count == 0 for count in counts.values()), counts
    else:
        assert all(count > 0 for count in counts.values()), counts
