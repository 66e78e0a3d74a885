"""bfloat16 products on AVX512_BF16's `vdpbf16ps`, for AMD Zen 4 and Zen 5.

`vdpbf16ps acc, a, b` adds to each of 16 float32 lanes the two products
of the lane's pair of bfloat16 values in a and in b. The strip below
computes the same blocks as AMX's tiles (amx.py), from the same packed
operands: A's rows (uint16 along K) and B's pairs of rows (uint32 words,
each two bfloat16 values along K). A block of 32 columns goes in groups of
GROUP_ROWS rows, each row's 32 columns two 512-bit accumulators; a step of
the loop loads B's word row (two vectors) and, for each row, broadcasts
A's word (a pair of values along K) into a `vdpbf16ps` on each.

On one core of an AMD EPYC Zen 4 `vdpbf16ps` ran at 223 GFLOP/s and
float32 FMAs at 108 (scripts/core_peaks.py): twice the multiply-adds. On
an Intel Xeon it ran at half the float32 rate (107 against 214), so Intel
CPUs use AMX tiles where they have them and float32 FMAs otherwise: this
path is for AMD's tuning (LLVM CPU names znver4 and later).

Sums: each lane adds its pair's products (exact in float32) to its
float32 accumulator; the instruction, as defined, rounds to nearest even
and treats subnormal inputs and results as zero. The order of the sums is
the strip's, not the oracle's chain, so results agree with the bfloat16
oracle to float32 rounding (tests/test_amx.py bounds both), not bit for
bit, and depend on the shapes only, never on the thread count.
"""
from llvmlite import ir
from numba.core import cgutils

from .microkernel import accumulating_loop, splat, strip_function_shell

GROUP_ROWS = 8  # rows of a register block: 8 x 2 accumulators of 16 lanes
LANES = 16
# the CPU names whose tuning this path is for (AMD); LLVM's names
AMD_PREFIX = "znver"


class BFloatType(ir.Type):
    """LLVM's `bfloat` (llvmlite's IR builder has no such type)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, BFloatType)

    def __hash__(self):
        return hash(BFloatType)


def target_has_dpbf16(cpu_name, features):
    """Whether code for LLVM CPU `cpu_name` with `features` runs bfloat16
    products on vdpbf16ps: AVX512_BF16 with AMD's tuning."""
    return "+avx512bf16" in features.split(",") and cpu_name.startswith(AMD_PREFIX)


def strip_function(module, row_tiles):
    """The LLVM function of a strip of blocks of 16 row_tiles rows by 32
    columns, with amx.block_function's arguments and result:

      void strip(c, c_stride, a, a_stride, b, b_stride, ksteps, blocks)

    C[:16 row_tiles, :32 blocks] = A @ B[:, :32 blocks] over K = 32 ksteps
    (16 ksteps words of A's rows, 16 ksteps rows of B's words)."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    function, builder = strip_function_shell(module, f"fastmlp_dpbf16_strip_{row_tiles}")
    if builder is None:
        return function
    c, c_stride, a, a_stride, b, b_stride, ksteps, blocks = function.args
    floats, words = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(i32, LANES)
    pairs = ir.VectorType(BFloatType(), 2 * LANES)
    dot = cgutils.get_or_insert_function(
        module, ir.FunctionType(floats, [floats, pairs, pairs]),
        "llvm.x86.avx512bf16.dpbf16ps.512")

    def constant(value):
        return ir.Constant(i64, value)

    def at(pointer, offset, kind):
        return builder.bitcast(builder.gep(pointer, [offset]), kind.as_pointer())

    vector_bytes = 4 * LANES
    steps = builder.mul(ksteps, constant(LANES))  # word rows of B

    def block(jb, _):
        c_j = builder.gep(c, [builder.mul(jb, constant(2 * vector_bytes))])
        b_j = builder.gep(b, [builder.mul(jb, constant(2 * vector_bytes))])

        def group(g, _):
            a_rows = [builder.gep(a, [builder.mul(builder.add(g, constant(r)), a_stride)])
                      for r in range(GROUP_ROWS)]
            c_rows = [builder.gep(c_j, [builder.mul(builder.add(g, constant(r)), c_stride)])
                      for r in range(GROUP_ROWS)]

            def step(p, acc):
                b_p = builder.gep(b_j, [builder.mul(p, b_stride)])
                columns = [builder.bitcast(builder.load(at(b_p, constant(vector_bytes * n), words),
                                                        align=4), pairs)
                           for n in range(2)]
                new = []
                for r in range(GROUP_ROWS):
                    word = builder.load(at(a_rows[r], builder.mul(p, constant(4)), i32), align=4)
                    row = builder.bitcast(splat(builder, word, words), pairs)
                    new += [builder.call(dot, [acc[2 * r + n], row, columns[n]])
                            for n in range(2)]
                return new

            zero = ir.Constant(floats, None)
            acc = accumulating_loop(builder, [zero] * (2 * GROUP_ROWS), steps, 1, step)
            for r in range(GROUP_ROWS):
                for n in range(2):
                    builder.store(acc[2 * r + n], at(c_rows[r], constant(vector_bytes * n), floats),
                                  align=4)
            return []
        accumulating_loop(builder, [], constant(16 * row_tiles), GROUP_ROWS, group)
        return []

    accumulating_loop(builder, [], blocks, 1, block)
    builder.ret_void()
    return function
