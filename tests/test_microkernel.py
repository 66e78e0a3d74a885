"""The microkernels: their values against NumPy, and their machine code under
the code generation of every CPU family fastmlp users run (compiled for a
named CPU in a child process; nothing runs there, so no such CPU is needed)."""
import re

import numpy as np
import pytest
from numba import njit

from fastmlp.jit import FASTMATH
from fastmlp.microkernel import (
    DOT_OUTPUTS,
    block_multiply_add,
    compiled_target,
    dot_tile,
    panel_vectors,
    panels,
    transpose_tile,
    vector_bits,
)

from conftest import load_script


@njit(fastmath=FASTMATH)
def multiply_add(out, coef, src, r, rows, k0, nt, add, width):
    if width == 64:
        block_multiply_add(out, coef, src, r, rows, k0, nt, add, 64)
    else:
        block_multiply_add(out, coef, src, r, rows, k0, nt, add, 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [64, 16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("add", [False, True])
def test_block_multiply_add_against_numpy(dtype, width, rows, add, rng):
    # coef is a transposed view (strided along t), as the weight gradient
    # passes it; rows past `rows` and columns outside the block stay as they were
    coef = rng.standard_normal((37, 9)).astype(dtype).T
    src = rng.standard_normal((37, 100)).astype(dtype)
    out = rng.standard_normal((9, 100)).astype(dtype)
    before = out.copy()
    r, k0, nt = 2, 20, 35
    multiply_add(out, coef, src, r, rows, k0, nt, add, width)
    block = np.s_[r:r + rows, k0:k0 + width]
    expected = coef[r:r + rows, :nt].astype(np.float64) @ src[:nt, k0:k0 + width]
    if add:
        expected += before[block]
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out[block], expected, rtol=tol, atol=tol)
    outside = np.ones(out.shape, bool)
    outside[block] = False
    np.testing.assert_array_equal(out[outside], before[outside])


def test_block_multiply_add_is_one_chain_of_multiply_adds_in_order(rng):
    # each output is acc + coef[t] * src[t] for t = 0, 1, ... in turn: the
    # sum a scalar loop of the same multiply-adds gives, bit for bit; one
    # rounding per step (an FMA) where the CPU has FMA, else two (x86-64 or
    # sandybridge code: the product, then the sum)
    coef = rng.standard_normal((4, 50)).astype(np.float32)
    src = rng.standard_normal((50, 64)).astype(np.float32)
    out = np.zeros((4, 64), np.float32)
    multiply_add(out, coef, src, 0, 4, 0, 50, False, 64)
    fused = any("vfmadd" in assembly for assembly in multiply_add.inspect_asm().values())
    expected = np.zeros((4, 64), np.float32)
    for t in range(50):
        if fused:  # the exact product in float64, one rounding
            expected = (expected + coef[:, t:t + 1].astype(np.float64) * src[t]).astype(np.float32)
        else:  # float32 arithmetic rounds the product and then the sum
            expected = expected + coef[:, t:t + 1] * src[t]
    np.testing.assert_array_equal(out, expected)


@njit(fastmath=FASTMATH)
def dot_tiles(out, inp, weight, r0, r1):
    OC = weight.shape[0]
    for b in range(r0, r1, 4):
        for j in range(0, OC, DOT_OUTPUTS):
            dot_tile(out, inp, weight, b, min(4, r1 - b), j, min(DOT_OUTPUTS, OC - j))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 7, 16, 50, 784])
@pytest.mark.parametrize("OC", [1, 3, 4, 10, 25])
def test_dot_tile_against_numpy(dtype, C, OC, rng):
    # C past the last whole vector (masked), rows and outputs past the last
    # whole tile (repeated, never stored): rows 1:10 of 12
    inp = rng.standard_normal((12, C)).astype(dtype)
    weight = rng.standard_normal((OC, C)).astype(dtype)
    out = np.full((12, OC), 7.0, dtype)
    dot_tiles(out, inp, weight, 1, 10)
    expected = inp[1:10].astype(np.float64) @ weight.T
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out[1:10], expected, rtol=tol, atol=tol * np.sqrt(C))
    np.testing.assert_array_equal(out[[0, 10, 11]], 7.0)


@njit(fastmath=FASTMATH)
def one_dot_tile(out, inp, weight, j, outs):
    dot_tile(out, inp, weight, 0, 4, j, outs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_dot_tile_of_fewer_outputs_computes_them_alike(dtype, rng):
    # the last outputs of a call take a tile as wide as they are (1 to
    # dot_tile_outputs() - 1): each output bit for bit as in a whole tile
    inp = rng.standard_normal((4, 50)).astype(dtype)
    weight = rng.standard_normal((DOT_OUTPUTS, 50)).astype(dtype)
    whole = np.zeros((4, DOT_OUTPUTS), dtype)
    one_dot_tile(whole, inp, weight, 0, DOT_OUTPUTS)
    for outs in range(1, DOT_OUTPUTS + 1):
        for j in range(0, DOT_OUTPUTS - outs + 1):
            part = np.full((4, DOT_OUTPUTS), 7.0, dtype)
            one_dot_tile(part, inp, weight, j, outs)
            assert np.array_equal(part[:, j:j + outs], whole[:, j:j + outs])
            assert (np.delete(part, np.s_[j:j + outs], axis=1) == 7.0).all()


def few_bit_values(rng, shape, dtype):
    # values of 12-bit significands and exponents over 2^-12..2^12: any
    # product of two is exact, so a multiply-add rounds only its sum, while
    # sums of them round, in an order-dependent way
    significands = rng.integers(-2048, 2048, shape) / 2048
    return (significands * 2.0 ** rng.integers(-12, 13, shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [50, 64, 100])
def test_dot_tile_adds_each_lane_in_order_then_halves(dtype, C, rng):
    # lane l of an output's accumulator sums the products at c = l, l +
    # lanes, ... in turn (the lanes past C adding exact zeros), then the
    # lanes are added up in halves: lanes l and l + lanes/2, and so on; bit
    # for bit, whether or not C fills the last vector
    inp = few_bit_values(rng, (4, C), dtype)
    weight = few_bit_values(rng, (DOT_OUTPUTS, C), dtype)
    out = np.zeros((4, DOT_OUTPUTS), dtype)
    one_dot_tile(out, inp, weight, 0, DOT_OUTPUTS)
    lanes = compiled_target()[1] // 8 // np.dtype(dtype).itemsize
    steps = -(-C // lanes)
    products = np.zeros((4, DOT_OUTPUTS, steps * lanes), dtype)
    products[:, :, :C] = inp[:, None, :] * weight[None, :, :]  # exact
    partial = np.zeros((4, DOT_OUTPUTS, lanes), dtype)
    for step in range(steps):
        partial = partial + products[:, :, step * lanes:(step + 1) * lanes]
    halves = partial
    while halves.shape[-1] > 1:
        width = halves.shape[-1] // 2
        halves = halves[..., :width] + halves[..., width:]
    np.testing.assert_array_equal(out, halves[..., 0])
    in_lane_order = partial[..., 0]
    for lane in range(1, lanes):
        in_lane_order = in_lane_order + partial[..., lane]
    assert not np.array_equal(out, in_lane_order)  # (the order shows in these values)


def test_panels_fit_the_register_file():
    for bits, registers in ((512, 32), (256, 16), (128, 16)):
        most = panel_vectors(bits)
        assert 4 * most + most + 1 <= registers
    assert panels(4, 6) == [4]  # AVX-512 float32, 64 columns: one panel
    assert panels(8, 3) == [2, 3, 3]  # AVX2 float32
    assert panels(16, 3) == [2, 3, 3, 2, 3, 3]  # AVX2 float64


# the code generation of each CPU name, and llvm-mca's simulation of it
throughput = load_script("kernel_throughput")
CPUS = throughput.CPUS
loops = throughput.loops


@pytest.fixture(scope="module")
def assemblies(tmp_path_factory):
    return throughput.compile_for(CPUS, str(tmp_path_factory.mktemp("cpus")))


@pytest.mark.parametrize("cpu", CPUS)
def test_inner_loops_keep_accumulators_in_registers(assemblies, cpu):
    bits = CPUS[cpu]
    register = {512: "zmm", 256: "ymm"}[bits]
    assert vector_bits(cpu, "") == bits
    for name, assembly in assemblies[cpu].items():
        if name.endswith("-transpose"):
            continue
        fma_loops = [body for body in loops(assembly) if any("vfmadd" in b for b in body)]
        assert fma_loops, f"{cpu} {name}: no loop of FMAs"
        for body in fma_loops:
            text = "\n".join(body)
            # no spill or reload: nothing in the loop addresses the stack
            assert "(%rsp" not in text, f"{cpu} {name}: stack access in the loop\n{text}"
            fmas = [b for b in body if "vfmadd" in b]
            assert all(f"%{register}" in b for b in fmas), \
                f"{cpu} {name}: FMAs not all on {register}\n{text}"
            # every FMA's accumulator is a register, never memory: the
            # last operand (the destination) is a register
            assert all(re.search(rf"%{register}\d+\s*$", b) for b in fmas), text


# The kernels whose loops do nearly all of a layer's multiply-adds: blocks of
# 64 and 48 columns and the dot tiles. (A 16-column block's 4 or 8 chains
# cannot cover the FMA latency: 49% and 79% of the peak on AVX-512, simulated;
# it only takes the last 16 columns of a layer such as 784's.)
BUSY_KERNELS = ["float32-64", "float32-48", "float64-64", "float64-48", "float32-dot",
                "float64-dot"]
needs_mca = pytest.mark.skipif(throughput.llvm_mca() is None,
                               reason="llvm-mca is not installed (apt-get install llvm)")


@needs_mca
@pytest.mark.parametrize("cpu", sorted(throughput.MODELS))
def test_inner_loops_keep_the_fma_units_busy(assemblies, cpu):
    # llvm-mca simulates each inner loop on the CPU's scheduling model, all
    # loads hitting L1: at least 85% of the model's FMA peak (they run at
    # 92-100%). Registers alone do not give this: the loops must also have
    # enough independent chains for the FMA latency and few enough other
    # instructions for the ports.
    model = throughput.MODELS[cpu]
    for name in BUSY_KERNELS:
        rate, peak, per_loop = throughput.kernel_rate(name, assemblies[cpu][name], model)
        assert rate >= 0.85 * peak, \
            f"{cpu} ({model}) {name}: {rate:.2f} FMAs a cycle of {peak:.2f}; loops {per_loop}"


@needs_mca
def test_simulated_rate_sees_the_fma_latency():
    # the measure itself: 16 multiply-adds into 16 accumulators run at the
    # peak; into 4 (one chain each per 4-cycle FMA) at half of it; into 1 at
    # a quarter of it or less
    def rate(chains):
        body = [f"vfmadd231ps %zmm30, %zmm31, %zmm{i % chains}" for i in range(16)]
        return 16 / throughput.cycles_per_iteration(body, "skylake-avx512")

    peak = throughput.fma_peak("skylake-avx512", "zmm")
    assert rate(16) >= 0.95 * peak
    assert 0.4 * peak <= rate(4) <= 0.6 * peak
    assert rate(1) <= 0.26 * peak


def function_body(assembly, prefix):
    """The lines of the function whose label starts with prefix."""
    lines = assembly.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(".Lfunc_end"))
    return lines[start + 1:end]


def vector_moves(body):
    """The ymm loads and stores of a function body, leaving out loads from
    the constant pool (AVX-512 shuffles load their index vectors there)."""
    pool = set()  # registers that hold a constant pool address
    loads, stores = [], []
    for line in body:
        constant = re.match(r"\s+movabsq\s+\$\.LCPI\w*,\s*(%\w+)", line)
        if constant:
            pool.add(constant.group(1))
            continue
        if re.match(r"\s+vmov\w+\s", line) and "%ymm" in line:
            load = re.search(r"\((%\w+)[^)]*\),\s*%ymm\d+$", line)
            if load and load.group(1) not in pool:
                loads.append(line)
            elif re.search(r"%ymm\d+,\s*-?\w*\(", line):
                stores.append(line)
        written = re.search(r",\s*(%\w+)$", line)
        if written:
            pool.discard(written.group(1))
    return loads, stores


@pytest.mark.parametrize("cpu", CPUS)
def test_transpose_tile_moves_whole_vectors(assemblies, cpu):
    # n rows in, n rows out, each one 256-bit vector (n = 8 float32 or 4
    # float64), transposed by shuffles in registers: no value goes one at a
    # time, and nothing touches the stack
    for dtype, n in (("float32", 8), ("float64", 4)):
        body = function_body(assemblies[cpu][f"{dtype}-transpose"], "fastmlp_transpose_")
        text = "\n".join(body)
        loads, stores = vector_moves(body)
        assert len(loads) == n and len(stores) == n, f"{cpu} {dtype}\n{text}"
        assert not re.search(r"vmovs[sd]|vextract|vpextr", text), \
            f"{cpu} {dtype}: scalar moves\n{text}"
        assert "(%rsp" not in text, f"{cpu} {dtype}: stack access\n{text}"


@njit
def transpose_tiles(dst, src, j0, j1, k0, k1, n):
    for k in range(k0, k1, n):
        for j in range(j0, j1, n):
            transpose_tile(dst, src, j, k)


@pytest.mark.parametrize("dtype,n", [(np.float32, 8), (np.float64, 4)])
def test_transpose_tile_against_numpy(dtype, n, rng):
    # tiles at offsets of neither matrix's alignment; the rest untouched
    src = rng.standard_normal((37, 45)).astype(dtype)
    dst = np.full((45, 37), 7.0, dtype)
    transpose_tiles(dst, src, 3, 3 + 4 * n, 5, 5 + 2 * n, n)
    block = np.s_[5:5 + 2 * n, 3:3 + 4 * n]
    np.testing.assert_array_equal(dst[block], src[3:3 + 4 * n, 5:5 + 2 * n].T)
    outside = np.ones(dst.shape, bool)
    outside[block] = False
    np.testing.assert_array_equal(dst[outside], 7.0)
