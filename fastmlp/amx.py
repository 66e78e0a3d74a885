"""AMX tiles for bfloat16 products on Intel Xeon CPUs (Sapphire Rapids on).

A tile is 16 rows of 64 bytes. `tdpbf16ps` multiplies a tile of 16 rows
by 32 bfloat16 values (A) with a tile of 16 pairs of rows by 16 columns
(B, the "VNNI" layout: row p holds columns 0..15 of B's rows 2p and 2p + 1,
interleaved) and adds the 16 x 16 products into a float32 tile (C): 8,192
multiply-adds in one instruction. One core of an Intel Xeon with AMX ran
them at 3,553 GFLOP/s, its float32 FMAs at 238 (scripts/core_peaks.py).

`amx_block(out, i, j, a, ai, b, bj, ksteps, blocks, row_tiles)` computes
a strip of `blocks` blocks of (16 row_tiles) x 32:
    out[i:i + 16 row_tiles, j:j + 32 blocks] =
        A[ai:ai + 16 row_tiles, :32 ksteps] @ B[:32 ksteps, bj:bj + 32 blocks]
from packed bfloat16 operands: `a` holds A's rows (uint16, (M, K)), `b`
B's pairs of rows, each uint32 two bfloat16 values of one column
((K / 2, N)). A block's loop over K keeps its 2 row_tiles accumulators in
tiles 0-3, A in tiles 4-5 and B in 6-7 (2 x 2 tiles: 4 products for 4
loads).

The packers below round float32 values to bfloat16 (activations and
deltas are bfloat16 values already; the weights are the float32 master
weights). The products are exact; the sums are float32 with rounding of
AMX's own, which is not a chain of float32 additions (a probe found none
of the orders of two or four products that it matches; it is no less
precise), so AMX results agree with the oracle to float32 rounding, not
bit for bit. They depend on the shapes only, never on the thread count.

Linux hands a process the tile registers' 8 KB of state only when asked
(arch_prctl ARCH_REQ_XCOMP_PERM): `usable()` asks once.

On AMD Zen 4 and later, which have AVX512_BF16 but no AMX, `amx_block`
computes the same blocks from the same packed operands with `vdpbf16ps`
(dpbf16.py), and every layer kernel built on it (amx_layers.py) runs
unchanged: "AMX" in the names of this path means packed bfloat16
products, on tiles or on vdpbf16ps.
"""
import ctypes
import functools
import os
import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import dpbf16
from .bfloat16 import round_bfloat16
from .jit import kernel
from .kernels import pointer_array, stack_buffer
from .microkernel import (accumulating_loop, element_address, strip_function_shell,
                          transpose_function)

TILE_ROWS = 16
TILE_BYTES = 64
K_STEP = 32  # bfloat16 values along K in one tile of A
BLOCK = 32  # columns of an amx_block, and rows with row_tiles = 2
AMX_FEATURES = ("+amx-tile", "+amx-bf16")

# Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def target_has_amx(features):
    """Whether an LLVM feature string enables AMX's bfloat16 tiles."""
    enabled = set(features.split(","))
    return all(feature in enabled for feature in AMX_FEATURES)


@functools.lru_cache(maxsize=None)
def tile_permission():
    """Asks Linux for the tile state (once a process); whether it was
    granted. Elsewhere than Linux on x86-64, False."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def target_products(codegen):
    """Which packed bfloat16 products a Numba code generator's target runs:
    "amx" tiles, "dpbf16" (AVX512_BF16 with AMD's tuning, dpbf16.py) or
    None."""
    if target_has_amx(codegen._tm_features):
        return "amx"
    if dpbf16.target_has_dpbf16(codegen._get_host_cpu_name(), codegen._tm_features):
        return "dpbf16"
    return None


def compiled_target_products():
    """target_products of the kernels of this process (the host's CPU, or
    NUMBA_CPU_NAME's and NUMBA_CPU_FEATURES')."""
    from numba.core.registry import cpu_target
    return target_products(cpu_target.target_context.codegen())


# Whether this process compiles kernels for packed bfloat16 products: the
# step's kernels test it first, a constant, so that for other CPUs Numba
# prunes their branches to them before typing them (a cold start of the
# float32 kernels 7.7 s longer with them, measured on the Intel Xeon)
COMPILED_PRODUCTS = compiled_target_products()
COMPILED = COMPILED_PRODUCTS is not None


def usable():
    """Whether bfloat16 products run on packed operands here: on AMX tiles
    (the compiled code has them, the CPU runs them and Linux grants their
    state) or on vdpbf16ps (AVX512_BF16 on AMD Zen 4 and later). Set
    FASTMLP_AMX=0 to use the emulated products instead."""
    from .bfloat16 import native_support
    if os.environ.get("FASTMLP_AMX", "1") == "0":
        return False
    if COMPILED_PRODUCTS == "amx":
        return "amx_bf16" in native_support() and tile_permission()
    return COMPILED_PRODUCTS == "dpbf16" and "avx512_bf16" in native_support()


def products_name():
    """What the packed bfloat16 products run on in this process, for
    people to read: "AMX tiles", "vdpbf16ps" (AVX512_BF16) or "float32
    FMAs (emulated)"."""
    if not usable():
        return "float32 FMAs (emulated)"
    return "AMX tiles" if COMPILED_PRODUCTS == "amx" else "vdpbf16ps (AVX512_BF16)"


def tile_config(module):
    # the 64-byte configuration that ldtilecfg loads: palette 1, all 8
    # tiles 16 rows of 64 bytes
    name = "fastmlp_amx_config"
    try:
        return module.get_global(name)
    except KeyError:
        pass
    config = bytearray(64)
    config[0] = 1
    for tile in range(8):
        config[16 + 2 * tile:18 + 2 * tile] = TILE_BYTES.to_bytes(2, "little")
        config[48 + tile] = TILE_ROWS
    kind = ir.ArrayType(ir.IntType(8), 64)
    variable = ir.GlobalVariable(module, kind, name)
    variable.initializer = ir.Constant(kind, bytearray(config))
    variable.global_constant = True
    variable.linkage = "internal"
    variable.align = 64
    return variable


def block_function(module, row_tiles):
    """The LLVM function of a strip of blocks of row_tiles x 2 tiles:

      void strip(c, c_stride, a, a_stride, b, b_stride, ksteps, blocks)

    C[:, :32 blocks] = A @ B[:, :32 blocks] over K = 32 ksteps, one block
    of 32 columns after another: byte pointers to C's, A's and B's first
    values, row strides in bytes. The tile configuration is loaded once a
    strip: a weight gradient's block sums only 4 steps of a batch of 128.
    (A call and a configuration per block, with slower packing, made W3's
    bfloat16 step 1.7 ms; strips and row-slice packing 0.785 ms.)"""
    i8, i64 = ir.IntType(8), ir.IntType(64)
    byte_pointer = i8.as_pointer()
    function, builder = strip_function_shell(module, f"fastmlp_amx_strip_{row_tiles}x2")
    if builder is None:
        return function
    c, c_stride, a, a_stride, b, b_stride, ksteps, blocks = function.args
    void = ir.VoidType()

    def x86(name, *arguments):
        kinds = [argument.type for argument in arguments]
        callee = cgutils.get_or_insert_function(module, ir.FunctionType(void, kinds),
                                                f"llvm.x86.{name}")
        builder.call(callee, list(arguments))

    def tile(number):
        return ir.Constant(i8, number)

    def at(pointer, offset):
        return builder.gep(pointer, [offset])

    def constant(value):
        return ir.Constant(i64, value)

    accumulators = [(r, n) for r in range(row_tiles) for n in range(2)]
    b_step = builder.mul(b_stride, constant(TILE_ROWS))  # B's rows of one K step

    def block(jb, _):
        # columns 32 jb:32 jb + 32: 128 bytes of C's and B's rows a block
        c_j = at(c, builder.mul(jb, constant(2 * TILE_BYTES)))
        b_j = at(b, builder.mul(jb, constant(2 * TILE_BYTES)))
        for number in range(len(accumulators)):
            x86("tilezero", tile(number))

        def step(k, _):
            a_k = at(a, builder.mul(k, constant(TILE_BYTES)))
            b_k = at(b_j, builder.mul(k, b_step))
            for r in range(row_tiles):
                x86("tileloadd64", tile(4 + r),
                    at(a_k, builder.mul(a_stride, constant(TILE_ROWS * r))), a_stride)
            for n in range(2):
                x86("tileloadd64", tile(6 + n), at(b_k, constant(TILE_BYTES * n)), b_stride)
            for number, (r, n) in enumerate(accumulators):
                x86("tdpbf16ps", tile(number), tile(4 + r), tile(6 + n))
            return []
        accumulating_loop(builder, [], ksteps, 1, step)
        for number, (r, n) in enumerate(accumulators):
            x86("tilestored64", tile(number),
                at(c_j, builder.add(builder.mul(c_stride, constant(TILE_ROWS * r)),
                                    constant(TILE_BYTES * n))), c_stride)
        return []

    x86("ldtilecfg", builder.bitcast(tile_config(module), byte_pointer))
    accumulating_loop(builder, [], blocks, 1, block)
    x86("tilerelease")
    builder.ret_void()
    return function


@intrinsic
def amx_block(typingctx, out, i, j, a, ai, b, bj, ksteps, blocks, row_tiles):
    # out is (R, N) float32, a is (M, K) uint16, b is (K / 2, N) uint32,
    # all with unit stride along their last axis; row_tiles a literal 1 or 2:
    # out[i:i + 16 row_tiles, j:j + 32 blocks] =
    #     A[ai:ai + 16 row_tiles, :32 ksteps] @ B[:32 ksteps, bj:bj + 32 blocks]
    # (see the module's docstring): on AMX tiles, or compiled for AMD's
    # AVX512_BF16 CPUs on vdpbf16ps (dpbf16.strip_function, the same
    # blocks). Compiled for a CPU with neither, or for an out of another
    # float type, it traps: callers check usable() first.
    if not isinstance(row_tiles, types.IntegerLiteral):
        return None
    if not all(isinstance(x, types.Array) and x.ndim == 2 for x in (out, a, b)):
        return None
    if a.dtype != types.uint16 or b.dtype != types.uint32:
        return None
    tiles = row_tiles.literal_value

    def codegen(context, builder, signature, args):
        products = target_products(context.codegen()) if out.dtype == types.float32 else None
        if products == "amx":
            strip = block_function(builder.module, tiles)
        elif products == "dpbf16":
            strip = dpbf16.strip_function(builder.module, tiles)
        else:
            trap = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.trap")
            builder.call(trap, [])
            return context.get_dummy_value()
        out_arr, a_arr, b_arr = (context.make_array(t)(context, builder, x)
                                 for t, x in zip((out, a, b), (args[0], args[3], args[5])))
        i_, j_, ai_, bj_, ksteps_, blocks_ = args[1], args[2], args[4], args[6], args[7], args[8]
        zero = ir.Constant(ir.IntType(64), 0)
        builder.call(strip, [
            element_address(builder, out_arr, i_, j_, 4),
            builder.extract_value(out_arr.strides, 0),
            element_address(builder, a_arr, ai_, zero, 2),
            builder.extract_value(a_arr.strides, 0),
            element_address(builder, b_arr, zero, bj_, 4),
            builder.extract_value(b_arr.strides, 0), ksteps_, blocks_])
        return context.get_dummy_value()

    index = types.intp
    return types.void(out, index, index, a, index, b, index, index, index, row_tiles), codegen


# ----------------------------------------------------------------------------
# packing: float32 values, rounded to bfloat16 (those of the activations
# and deltas are already), into tiles' layouts.
# A is uint16 (rows along K); B is uint32, each value a pair of bfloat16
# along K (the lower half first).


@intrinsic
def float_bits(typingctx, x):
    # the bits of float32 x as a uint32
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


@kernel
def bfloat16_bits(x):
    # float32 x rounded to the nearest bfloat16 (ties to even), as its 16
    # bits (a value that is one already stays as it is)
    return np.uint16(float_bits(round_bfloat16(np.float32(x))) >> np.uint32(16))


@kernel
def pair_word(low, high):
    # two float32 values rounded to bfloat16, as one word of B
    # (float64 values type here too, in kernels where no layer is on AMX)
    return ((float_bits(round_bfloat16(np.float32(high))) & np.uint32(0xFFFF0000))
            | (float_bits(round_bfloat16(np.float32(low))) >> np.uint32(16)))


@kernel
def padded(n):
    # n rounded up to whole K steps (and whole blocks: both are 32)
    return -(-n // K_STEP) * K_STEP


@kernel
def pack_rows(dst, src, r0, r1, k0, k1):
    # dst is (>= r1, >= k1) uint16, src is (>= r1, >= k1) float32
    # dst[r0:r1, k0:k1] = src[r0:r1, k0:k1]: A with K along src's rows.
    # (Row slices and loops from 0 vectorize: indexing from k0 in two
    # dimensions ran 4.8x slower, measured on 512 x 784.)
    for r in range(r0, r1):
        out = dst[r, k0:k1]
        row = src[r, k0:k1]
        for c in range(out.shape[0]):
            out[c] = bfloat16_bits(row[c])


@kernel
def pack_row_pairs(dst, src, r0, r1, zero_to, k0, k1):
    # dst is (>= zero_to / 2, >= k1) uint32, src is (>= r1, >= k1) float32;
    # r0 even
    # src[r0:r1, k0:k1] as B with K along src's rows: dst[r // 2, c] pairs
    # src[r, c] and src[r + 1, c]; rows r1:zero_to are zeros (a K padded
    # to whole steps)
    zero = np.float32(0.0)
    for r in range(r0, max(r1, zero_to), 2):
        out = dst[r // 2, k0:k1]
        if r + 1 < r1:
            low = src[r, k0:k1]
            high = src[r + 1, k0:k1]
            for c in range(out.shape[0]):
                out[c] = pair_word(low[c], high[c])
        elif r < r1:
            low = src[r, k0:k1]
            for c in range(out.shape[0]):
                out[c] = pair_word(low[c], zero)
        else:
            for c in range(out.shape[0]):
                out[c] = 0


@intrinsic
def transpose_words(typingctx, dst, di, dj, src, si, sj):
    # dst and src are 2-D uint32 arrays with unit stride along their last
    # axis: dst[di + a, dj + b] = src[si + b, sj + a] for a, b < 8, in
    # registers (microkernel.transpose_function)
    if not all(isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.uint32
               for x in (dst, src)):
        return None

    def codegen(context, builder, signature, args):
        dst_arr, src_arr = (context.make_array(t)(context, builder, x)
                            for t, x in ((dst, args[0]), (src, args[3])))
        function = transpose_function(builder.module, ir.IntType(32), 4, TRANSPOSE_WORDS)
        builder.call(function, [
            element_address(builder, dst_arr, args[1], args[2], 4),
            builder.extract_value(dst_arr.strides, 0),
            element_address(builder, src_arr, args[4], args[5], 4),
            builder.extract_value(src_arr.strides, 0)])
        return context.get_dummy_value()

    index = types.intp
    return types.void(dst, index, index, src, index, index), codegen


TRANSPOSE_WORDS = 8  # a transposed tile: 8 x 8 words
# packing through a transpose goes in blocks of words on the stack
WORD_ROWS = 16
WORD_COLUMNS = 512
WORD_VALUES = WORD_ROWS * WORD_COLUMNS


@kernel
def transpose_block(dst, d0, c0, words, rows, columns):
    # dst[c0 + c, d0 + r] = words[r, c] for r < rows, c < columns: 8 x 8
    # tiles, then what is left one word at a time
    n = TRANSPOSE_WORDS
    rows_n = rows // n * n
    columns_n = columns // n * n
    for c in range(0, columns_n, n):
        for r in range(0, rows_n, n):
            transpose_words(dst, c0 + c, d0 + r, words, r, c)
    for c in range(columns):
        row = dst[c0 + c]
        for r in range(rows_n if c < columns_n else 0, rows):
            row[d0 + r] = words[r, c]


@kernel
def pack_columns(dst, src, r0, r1, zero_to):
    # dst is (>= C, >= zero_to / 2) uint32, the words of a uint16 A;
    # src is (>= r1, C) float32; r0 even
    # src[r0:r1].T as A with K along src's rows: dst's values (uint16)
    # [c, r] = src[r, c], and zeros in its columns r1:zero_to. Pairs of rows
    # make words (as pack_row_pairs), which go transposed in tiles.
    C = src.shape[1]
    end = max(r1, zero_to)
    scratch = pointer_array(stack_buffer(WORD_VALUES, dst), WORD_VALUES)
    zero = np.float32(0.0)
    for c0 in range(0, C, WORD_COLUMNS):
        nc = min(WORD_COLUMNS, C - c0)
        for b0 in range(r0, end, 2 * WORD_ROWS):
            pairs = (min(end, b0 + 2 * WORD_ROWS) - b0 + 1) // 2
            words = scratch[:pairs * nc].reshape((pairs, nc))
            for i in range(pairs):
                r = b0 + 2 * i
                out = words[i]
                if r + 1 < r1:
                    low = src[r, c0:c0 + nc]
                    high = src[r + 1, c0:c0 + nc]
                    for c in range(nc):
                        out[c] = pair_word(low[c], high[c])
                elif r < r1:
                    low = src[r, c0:c0 + nc]
                    for c in range(nc):
                        out[c] = pair_word(low[c], zero)
                else:
                    for c in range(nc):
                        out[c] = 0
            transpose_block(dst, b0 // 2, c0, words, pairs, nc)


@kernel
def pack_column_pairs(dst, src, r0, r1):
    # dst is (>= padded(C) / 2, >= r1) uint32, src is (>= r1, C) float32
    # src[r0:r1].T as B with K along src's columns: dst[p, r] pairs src[r, 2p]
    # and src[r, 2p + 1] (an odd C's last pair with a zero); words made
    # along src's rows, transposed in tiles
    C = src.shape[1]
    P = (C + 1) // 2
    scratch = pointer_array(stack_buffer(WORD_VALUES, dst), WORD_VALUES)
    zero = np.float32(0.0)
    for q0 in range(0, P, WORD_COLUMNS):
        nq = min(WORD_COLUMNS, P - q0)
        whole = min(nq, C // 2 - q0)  # pairs of two columns of src
        for b0 in range(r0, r1, WORD_ROWS):
            nb = min(WORD_ROWS, r1 - b0)
            words = scratch[:nb * nq].reshape((nb, nq))
            for b in range(nb):
                row = src[b0 + b, 2 * q0:]
                out = words[b]
                for q in range(whole):
                    out[q] = pair_word(row[2 * q], row[2 * q + 1])
                if whole < nq:
                    out[whole] = pair_word(row[2 * whole], zero)
            transpose_block(dst, b0, q0, words, nb, nq)
