"""Layer kernels: small serial Numba functions, outputs first, then inputs.

A constant argument reaches a kernel as a literal type, and Numba compiles
the kernel once more for that literal (rows_times_matrix for k0 = 0 besides
k0 an int64; forward_backward for backward = True besides a bool: seconds of
a cold start each), so kernels pass constants as np.int64(0) or
np.bool_(True), ordinary values.

Dimension letters used in the shape comments:
  B  rows of the minibatch workspace (its capacity; rows r0:r1 are touched)
  N  rows of the whole dataset
  C  input features of a layer, OC its output features
  K  classes (the output layer's width)

The activation of a hidden layer is a compile-time code (below); derivatives
are written in terms of the activation's output, so the forward pass keeps
only post-activations (as scikit-learn does). Callers choose which rows or
weight rows a call covers, so that parallel callers write disjoint memory.
"""
import math

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic

from .expf import fast_exp
from .heads import copy_target
from .jit import kernel, ordered_kernel
from .microkernel import block_multiply_add, dot_tile

SIGMOID = 0
TANH = 1
RELU = 2
IDENTITY = 3
ACTIVATIONS = {"sigmoid": SIGMOID, "tanh": TANH, "relu": RELU}

# Constants are float32 literals: exact in float32, so a float32 kernel stays
# float32 and a float64 kernel promotes them without loss.
ZERO = np.float32(0.0)
ONE = np.float32(1.0)


@kernel
def finite(x):
    # not NaN and not inf. (math.isfinite tests x - x, which the fastmath
    # flags may fold to 0: it then calls NaN finite. Comparisons keep NaN and
    # inf visible under these flags.)
    return x == x and abs(x) != np.inf


# ----------------------------------------------------------------------------
# input

@intrinsic
def prefetch(typingctx, address):
    # a hint to fetch the cache line at `address` (an integer) into L2
    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]),
            "llvm.prefetch.p0")
        # read, locality 2 (L2 and beyond), data
        builder.call(function, [builder.inttoptr(args[0], byte_pointer), ir.Constant(i32, 0),
                                ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(types.uintp), codegen


@kernel
def prefetch_rows(X, idx, start, r0, r1):
    # X is (N, C), idx is (>=start+r1,)
    # asks for dataset rows idx[start + r0:start + r1] ahead of their use:
    # rows drawn at random from a large X otherwise arrive one DRAM latency
    # at a time
    base = X.ctypes.data
    row_bytes = X.shape[1] * X.itemsize
    for b in range(r0, r1):
        row = base + idx[start + b] * X.strides[0]
        for offset in range(0, row_bytes, 64):
            prefetch(row + offset)


@kernel
def gather_rows(out, labels_out, targets_out, weights_out, X, y, sample_weight, idx, start,
                scale, r0, r1):
    # out is (B, C), labels_out and weights_out are (B,), targets_out (B, K),
    # X is (N, C), y is (N,) labels or (N, K) targets, sample_weight is (N,),
    # idx is (>=start+r1,)
    # Row b of the batch is dataset row idx[start + b], times `scale`
    # (1/255 for uint8 pixels, 1 for floats): uint8 data is never copied whole.
    C = out.shape[1]
    for b in range(r0, r1):
        i = idx[start + b]
        src = X[i]
        dst = out[b]
        for c in range(C):
            dst[c] = src[c] * scale
        copy_target(labels_out, targets_out, y, b, i)
        weights_out[b] = sample_weight[i]


# ----------------------------------------------------------------------------
# dense layer with its activation fused

@kernel
def activate_row(row, activation):
    # row = activation(row), one loop per activation so that each vectorizes
    n = row.shape[0]
    if activation == SIGMOID:
        for j in range(n):
            row[j] = ONE / (ONE + fast_exp(-row[j]))
    elif activation == TANH:
        for j in range(n):
            row[j] = math.tanh(row[j])
    elif activation == RELU:
        for j in range(n):
            z = row[j]
            row[j] = z if z > ZERO else ZERO


@kernel
def activation_derivative(a, activation):
    # the derivative at the pre-activation, written with the output a
    if activation == SIGMOID:
        return a * (ONE - a)
    if activation == TANH:
        return ONE - a * a
    if activation == RELU:
        return ONE if a > ZERO else ZERO
    return ONE


@kernel
def dense_forward(out, inp, weight, weight_t, bias, activation, r0, r1):
    # out is (B, OC), inp is (B, C), weight is (OC, C), weight_t is (C, OCT)
    # holding weight[:OCT].T, bias is (OC,)
    # out = activation(inp @ weight.T + bias) for rows r0:r1.
    # Outputs 0:OCT (OCT a multiple of BLOCK_COLUMNS, see
    # transposed_outputs) are rows of inp times weight_t through
    # rows_times_matrix's register blocks (about 1.5x the rate of the dot
    # products below, measured). The rest are dot products along the long,
    # contiguous C axis of weight's rows, in tiles of 4 rows x 4 outputs
    # (dot_tile in microkernel.py: explicit vectors, sub-tiles that fit the
    # CPU's registers). At an edge a tile repeats the last row or output
    # and stores only what is real, so every output is computed by the
    # same instructions.
    OC, C = weight.shape
    OCT = weight_t.shape[1]
    if OCT > 0:
        rows_times_matrix(out, inp[:, ::1], weight_t, r0, r1, C, np.int64(0), OCT, C)
    for b in range(r0, r1, 4):
        for j in range(OCT, OC, 4):
            dot_tile(out, inp, weight, b, min(4, r1 - b), j, min(4, OC - j))
        # bias and activation in loops of their own, which vectorize (exp too)
        for i in range(b, min(b + 4, r1)):
            o = out[i]
            for j in range(OC):
                o[j] += bias[j]
            activate_row(o, activation)


@kernel
def transpose_weight_block(weight_t, weight, j0, j1, k0, k1):
    # weight_t is (C, OCT), weight is (OC, C); j0, j1 multiples of 16
    # weight_t[k0:k1, j0:j1] = weight[j0:j1, k0:k1].T, one cache line of
    # weight_t (16 float32 outputs) at a time: whole lines, so that tasks
    # owning different outputs never share one
    for jb in range(j0, j1, 16):
        for k in range(k0, k1):
            dst = weight_t[k]
            for j in range(jb, jb + 16):
                dst[j] = weight[j, k]


@ordered_kernel
def dense_backward_input(dinp, dout, weight, inp, activation, r0, r1):
    # dinp is (B, C), dout is (B, OC), weight is (OC, C), inp is (B, C)
    # dinp = (dout @ weight) * activation'(inp) for rows r0:r1, where inp is
    # the previous layer's output: the delta of the previous layer's
    # pre-activation, ready for its own weight gradient. An ordered_kernel:
    # with `reassoc`, g * (a * (1 - a)) could become (g * a) * (1 - a) in one
    # caller and not in another (seen: a fresh compile and the cached one
    # trained to different parameters).
    rows_times_matrix(dinp, dout[:, ::1], weight, r0, r1, weight.shape[0], np.int64(0),
                      dinp.shape[1], weight.shape[0])
    C = dinp.shape[1]
    for b in range(r0, r1):
        g = dinp[b]
        a = inp[b]
        for k in range(C):
            g[k] *= activation_derivative(a[k], activation)


@kernel
def dense_backward_weight(dweight, dout, inp, j0, j1, nrows, k0, k1):
    # dweight is (OC, C), dout is (B, OC), inp is (B, C)
    # dweight[j0:j1, k0:k1] = dout[:nrows, j0:j1].T @ inp[:nrows, k0:k1],
    # k0 a multiple of BLOCK_COLUMNS (or k0:k1 all of C). One writer per
    # weight row, and each row sums over batch rows in the same order
    # whatever the thread count. (Both callers pass coef as `[:, ::1]`, which
    # Numba types as any-layout: one compiled rows_times_matrix instead of a
    # C and an F one, seconds less of compiling; it only reads coef's scalars.)
    rows_times_matrix(dweight, dout.T[:, ::1], inp, j0, j1, nrows, k0, k1, MAX_SUM_ROWS)


# Columns of a block in rows_times_matrix: block_multiply_add takes them in
# register panels that fit the CPU's vector registers. The whole 16s of
# columns past the last whole block go in one narrow block.
BLOCK_COLUMNS = 64
NARROW_COLUMNS = 16
# rows_times_matrix sums more source rows than this in equal passes of at
# most this many: a packed 64-column panel (32 KB at most in float32) then
# stays in L1 for every row group (weight gradient of 784-100 on 200 rows
# 1.2x faster in two passes of 100, measured).
MAX_SUM_ROWS = 128
PACK_VALUES = MAX_SUM_ROWS * BLOCK_COLUMNS  # rows_times_matrix's packed panel
PACK_MIN_ROWS = 16


@kernel
def transposed_outputs(OC):
    # how many leading outputs of a layer of OC outputs dense_forward takes
    # from transposed weights: whole register blocks
    return OC // BLOCK_COLUMNS * BLOCK_COLUMNS


@intrinsic
def stack_buffer(typingctx, size, like):
    # a pointer to `size` (a literal) values of the array like's dtype, on
    # the stack of the function this is inlined into
    if not isinstance(size, types.IntegerLiteral) or not isinstance(like, types.Array):
        return None

    def codegen(context, builder, signature, args):
        value_type = context.get_value_type(like.dtype)
        buffer = cgutils.alloca_once(builder, ir.ArrayType(value_type, size.literal_value))
        buffer.align = 64
        return builder.bitcast(buffer, value_type.as_pointer())
    return types.CPointer(like.dtype)(size, like), codegen


@kernel
def source_panel(packed, src, t0, t1, k, width, pack):
    # src[t0:t1, k:k + width], copied into the first values of packed as a
    # contiguous (t1 - t0, width) matrix if `pack`, else as it is
    if not pack:
        return src[t0:t1, k:k + width]
    panel = packed[:(t1 - t0) * width].reshape((t1 - t0, width))
    for t in range(t0, t1):
        row = src[t, k:k + width]
        dst = panel[t - t0]
        for c in range(width):
            dst[c] = row[c]
    return panel[:, ::1]  # typed as the view above: one compiled caller


@kernel
def rows_times_matrix(out, coef, src, r0, r1, nt, k0, k1, sum_rows):
    # out is (R, C), coef is (R, T), src is (T, C)
    # out[r0:r1, k0:k1] = coef[r0:r1, :nt] @ src[:nt, k0:k1], both backward
    # products and the forward one from transposed weights (k0 a multiple of
    # BLOCK_COLUMNS, or 0): each output row is a sum of source rows, all
    # contiguous along C. Groups of 4 output rows (the last group may have
    # fewer) take C in blocks of BLOCK_COLUMNS, then the whole 16s of
    # columns left in one narrow block, whose accumulators stay in
    # registers over a pass (block_multiply_add in microkernel.py: explicit
    # vectors, no stores until the end). Column blocks are the outer loop,
    # so that a block of src stays in cache for every row group; within a
    # column block, source rows go in equal passes of at most sum_rows (and
    # MAX_SUM_ROWS), each continuing the sums the pass before stored (the
    # same additions in the same order as in one pass). The last few
    # columns go through rows_times_matrix_tile, in one pass. Which path an
    # output takes depends on the shapes and r0, r1 only, never on the
    # thread count or the caller (the block is explicit IR, the tile an
    # ordered_kernel).
    blocked = k0 + (k1 - k0) // BLOCK_COLUMNS * BLOCK_COLUMNS
    narrow = blocked + (k1 - blocked) // NARROW_COLUMNS * NARROW_COLUMNS
    tiled = r0 + (r1 - r0) // 4 * 4
    # each pass packs its rows of the source block into a contiguous panel
    # on the stack that every row group then reads: source rows whose
    # stride is a multiple of 2 KB (512 columns) fall into few L1 sets and
    # would be fetched from L2 again for every row group
    packed = carray(stack_buffer(PACK_VALUES, out), PACK_VALUES)
    # a panel read by few row groups is not worth its copy (W3's weight
    # gradient tasks of 16 rows: 7.7-8.1 to 5.4-7.4 ms a step on Zen 3)
    pack = r1 - r0 > PACK_MIN_ROWS
    passes = max(1, -(-nt // min(sum_rows, MAX_SUM_ROWS)))
    step = max(1, -(-nt // passes))  # equal passes that fit the panel
    # the width is a literal at each call: 64 here, one of three in narrow_block
    for k in range(k0, blocked, BLOCK_COLUMNS):
        for t0 in range(0, max(nt, 1), step):  # once when nt is 0: zeros
            t1 = min(nt, t0 + step)
            panel = source_panel(packed, src, t0, t1, k, BLOCK_COLUMNS, pack)
            for r in range(r0, r1, 4):
                block_multiply_add(out[:, k:], coef[:, t0:t1], panel, r, min(4, r1 - r),
                                   0, t1 - t0, t0 > 0, BLOCK_COLUMNS)
    if narrow > blocked:  # 16, 32 or 48 columns: one block, as wide as they are
        rest = narrow - blocked
        for t0 in range(0, max(nt, 1), step):  # once when nt is 0: zeros
            t1 = min(nt, t0 + step)
            panel = source_panel(packed, src, t0, t1, blocked, rest, pack)
            for r in range(r0, r1, 4):
                narrow_block(out[:, blocked:], coef[:, t0:t1], panel, r, min(4, r1 - r),
                             t1 - t0, t0 > 0, rest)
    if narrow < k1:
        for r in range(r0, tiled, 4):
            rows_times_matrix_tile(out, coef, src, r, 4, nt, narrow, k1)
        for r in range(tiled, r1):
            rows_times_matrix_tile(out, coef, src, r, 1, nt, narrow, k1)


@kernel
def narrow_block(out, coef, src, r, rows, nt, add, width):
    # block_multiply_add on the first `width` columns (16, 32 or 48) of out
    # and src, each width a literal of its own
    if width == 16:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 16)
    elif width == 32:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 32)
    else:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 48)


@ordered_kernel
def rows_times_matrix_tile(out, coef, src, r, rows, nt, k0, k1):
    # out[r:r + rows, k0:k1] as in rows_times_matrix, rows being 4 or 1 (then
    # the three other rows repeat row r and are neither computed nor
    # stored). Four output rows share each pass over the columns and take 8
    # source rows at a time, in order 0..nt-1: 8 source loads and 4 output
    # loads and stores per 32 multiply-adds. Each sum of eight products is a
    # fixed tree, short enough to keep the FMA units busy.
    last = nt - 1
    ra = r + 1 if rows == 4 else r
    rb = r + 2 if rows == 4 else r
    rc = r + 3 if rows == 4 else r
    g0 = out[r, k0:k1]
    C = g0.shape[0]
    for k in range(C):
        g0[k] = ZERO
    if rows == 4:
        out[ra, k0:k1] = ZERO
        out[rb, k0:k1] = ZERO
        out[rc, k0:k1] = ZERO
    c0 = coef[r]
    for t in range(0, nt, 8):
        # source rows past nt repeat the last one with a zero coefficient
        x0 = src[t, k0:k1]
        x1 = src[min(t + 1, last), k0:k1]
        x2 = src[min(t + 2, last), k0:k1]
        x3 = src[min(t + 3, last), k0:k1]
        x4 = src[min(t + 4, last), k0:k1]
        x5 = src[min(t + 5, last), k0:k1]
        x6 = src[min(t + 6, last), k0:k1]
        x7 = src[min(t + 7, last), k0:k1]
        t1 = min(t + 1, last)
        t2 = min(t + 2, last)
        t3 = min(t + 3, last)
        t4 = min(t + 4, last)
        t5 = min(t + 5, last)
        t6 = min(t + 6, last)
        t7 = min(t + 7, last)
        m1 = ONE if t + 1 < nt else ZERO
        m2 = ONE if t + 2 < nt else ZERO
        m3 = ONE if t + 3 < nt else ZERO
        m4 = ONE if t + 4 < nt else ZERO
        m5 = ONE if t + 5 < nt else ZERO
        m6 = ONE if t + 6 < nt else ZERO
        m7 = ONE if t + 7 < nt else ZERO
        p0 = c0[t]; p1 = c0[t1] * m1; p2 = c0[t2] * m2; p3 = c0[t3] * m3
        p4 = c0[t4] * m4; p5 = c0[t5] * m5; p6 = c0[t6] * m6; p7 = c0[t7] * m7
        if rows == 1:
            for k in range(C):
                g0[k] += ((p0 * x0[k] + p1 * x1[k]) + (p2 * x2[k] + p3 * x3[k])
                          + ((p4 * x4[k] + p5 * x5[k]) + (p6 * x6[k] + p7 * x7[k])))
            continue
        g1 = out[ra, k0:k1]
        g2 = out[rb, k0:k1]
        g3 = out[rc, k0:k1]
        c1 = coef[ra]
        c2 = coef[rb]
        c3 = coef[rc]
        q0 = c1[t]; q1 = c1[t1] * m1; q2 = c1[t2] * m2; q3 = c1[t3] * m3
        q4 = c1[t4] * m4; q5 = c1[t5] * m5; q6 = c1[t6] * m6; q7 = c1[t7] * m7
        u0 = c2[t]; u1 = c2[t1] * m1; u2 = c2[t2] * m2; u3 = c2[t3] * m3
        u4 = c2[t4] * m4; u5 = c2[t5] * m5; u6 = c2[t6] * m6; u7 = c2[t7] * m7
        v0 = c3[t]; v1 = c3[t1] * m1; v2 = c3[t2] * m2; v3 = c3[t3] * m3
        v4 = c3[t4] * m4; v5 = c3[t5] * m5; v6 = c3[t6] * m6; v7 = c3[t7] * m7
        for k in range(C):
            y0 = x0[k]; y1 = x1[k]; y2 = x2[k]; y3 = x3[k]
            y4 = x4[k]; y5 = x5[k]; y6 = x6[k]; y7 = x7[k]
            g0[k] += ((p0 * y0 + p1 * y1) + (p2 * y2 + p3 * y3)
                      + ((p4 * y4 + p5 * y5) + (p6 * y6 + p7 * y7)))
            g1[k] += ((q0 * y0 + q1 * y1) + (q2 * y2 + q3 * y3)
                      + ((q4 * y4 + q5 * y5) + (q6 * y6 + q7 * y7)))
            g2[k] += ((u0 * y0 + u1 * y1) + (u2 * y2 + u3 * y3)
                      + ((u4 * y4 + u5 * y5) + (u6 * y6 + u7 * y7)))
            g3[k] += ((v0 * y0 + v1 * y1) + (v2 * y2 + v3 * y3)
                      + ((v4 * y4 + v5 * y5) + (v6 * y6 + v7 * y7)))


@kernel
def dense_backward_bias(dbias, dout, nrows):
    # dbias is (OC,), dout is (B, OC)
    OC = dbias.shape[0]
    for j in range(OC):
        dbias[j] = ZERO
    for b in range(nrows):
        d = dout[b]
        for j in range(OC):
            dbias[j] += d[j]


# ----------------------------------------------------------------------------
# softmax output with mean categorical cross-entropy
