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

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .bfloat16 import round_bfloat16
from .buffers import row_weight
from .expf import fast_exp, fast_tanh
from .fpenv import is_x86
from .heads import copy_targets
from .jit import driver_kernel, inline_kernel, kernel, ordered_kernel
from .microkernel import (DOT_OUTPUTS, LISTED_ROWS, TRANSPOSE_BYTES, block_multiply_add,
                          compiled_vector_bits, dot_tile, listed_block, transpose_tile)

SIGMOID = 0
TANH = 1
RELU = 2
IDENTITY = 3  # also the output layer's, before its head
ACTIVATIONS = {"sigmoid": SIGMOID, "tanh": TANH, "relu": RELU, "identity": IDENTITY}

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


@intrinsic
def stream_line(typingctx, dst, src):
    # the 64 bytes at address src copied to address dst (a multiple of 64)
    # by one non-temporal store: the line goes to memory and out of every
    # core's cache, so that no core must take it back from another's
    # before it writes it next time (transposed_panels_streamed)
    def codegen(context, builder, signature, args):
        line = ir.VectorType(ir.IntType(64), 8)
        values = builder.load(builder.inttoptr(args[1], line.as_pointer()), align=1)
        store = builder.store(values, builder.inttoptr(args[0], line.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()
    return types.void(types.uint64, types.uint64), codegen


@intrinsic
def store_fence(typingctx):
    # x86's sfence: the non-temporal stores before it are seen before any
    # store after it (a barrier's); nothing where the target is not x86
    def codegen(context, builder, signature, args):
        if is_x86(context):
            fence = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fence, [])
        return context.get_dummy_value()
    return types.void(), codegen


# A thread's rows of the next batch are asked for a step early
# (prefetch_rows, from forward_backward.region) when they are float rows that fill at
# most this many bytes; larger ones, and uint8 rows, as the gather copies
# them (scale_rows). An Intel core holds one line fill buffer per line in
# flight, so a longer burst stalls the thread until its lines arrive, and
# lines fetched a whole step early are partly evicted before the gather
# reads them: a thread's burst for 100 rows of 784 float32 values stalled
# it 29 us a step (Xeon). A Zen 3 core drops most of a burst instead: 100
# uint8 rows of 784 pixels took 22-24 us to gather after one, 14 us asked
# for 5 rows ahead (the Xeon: the same either way); the regression's float64
# rows gathered as fast with no prefetch at all, but its step was 1.02x
# slower without the burst (docs/performance.md).
EARLY_PREFETCH_BYTES = 128 * 1024
# the gather asks for the row this many bytes ahead of the one it copies (at
# least one row): more than the lines one core keeps in flight
GATHER_AHEAD_BYTES = 4096


@kernel
def early_prefetch(X, nrows, value_bytes):
    # whether nrows rows of X, of value_bytes a value, are asked for a step
    # early (prefetch_rows), not as the gather copies them
    return value_bytes > 1 and nrows * X.shape[1] * X.itemsize <= EARLY_PREFETCH_BYTES


@kernel
def prefetch_row(X, i):
    # X is (N, C)
    # asks for every cache line of dataset row i
    row = np.int64(X.ctypes.data) + i * X.strides[0]
    for line in range(row // 64 * 64, row + X.shape[1] * X.itemsize, 64):
        prefetch(np.uint64(line))


@kernel
def prefetch_rows(X, idx, start, r0, r1, value_bytes):
    # X is (N, C), idx is (>=start+r1,)
    # asks for dataset rows idx[start + r0:start + r1] a step ahead of their
    # use, if early_prefetch: rows drawn at random from a large X otherwise
    # arrive one DRAM latency at a time
    if not early_prefetch(X, r1 - r0, value_bytes):
        return
    for b in range(r0, r1):
        prefetch_row(X, idx[start + b])


@driver_kernel
def gather_rows(out, labels_out, targets_out, weights_out, data, start, bf16, r0, r1):
    # out is (B, C), labels_out and weights_out are (B,), targets_out (B, K);
    # data: buffers.Data of N rows, data.idx (>=start+r1,)
    # Row b of the batch is dataset row data.idx[start + b], times
    # data.scale (1/255 for uint8 pixels, 1 for floats), rounded to bfloat16
    # if bf16: the dataset is never copied whole. The rows are read through
    # one typed view of the whole dataset and indexed in two dimensions:
    # with a view and two kernel calls per row (each with Numba's reference
    # counting of its arrays), 100 float32 rows of 100 values took 8.6-14 us
    # in cache; this way 3.2-3.7 us, a plain copy 1.4-3.3 (Zen 3, measured).
    gather_inputs(out, data, start, bf16, r0, r1)
    gather_targets(labels_out, targets_out, weights_out, data, start, r0, r1)


@driver_kernel
def gather_inputs(out, data, start, bf16, r0, r1):
    # out is (B, C); data: buffers.Data of N rows, data.idx (>=start+r1,)
    # gather_rows' input rows only
    if data.x_bytes == 1:
        scale_rows(out, data.X, data.idx, start, data.scale, bf16, r0, r1)
    elif data.x_bytes == 4:
        scale_rows(out, data.X.view(np.float32), data.idx, start, data.scale, bf16, r0, r1)
    else:
        scale_rows(out, data.X.view(np.float64), data.idx, start, data.scale, bf16, r0, r1)


@kernel
def gather_targets(labels_out, targets_out, weights_out, data, start, r0, r1):
    # labels_out and weights_out are (B,), targets_out (B, K); data as above
    # gather_rows' targets and sample weights only
    copy_targets(labels_out, targets_out, data.labels, data.targets, data.idx, start, r0, r1)
    for b in range(r0, r1):
        weights_out[b] = row_weight(data.sample_weight, data.idx[start + b])


@kernel
def scale_rows(out, X, idx, start, scale, bf16, r0, r1):
    # out is (B, C), X is (N, C), idx is (>=start+r1,)
    # out[b] = X[idx[start + b]] * scale for rows r0:r1, rounded to
    # bfloat16 if bf16. Rows too many to be asked for a step early
    # (early_prefetch) are asked for `ahead` rows before their copy
    # (GATHER_AHEAD_BYTES), so that they arrive while the rows before them
    # are copied. 100 rows of 784 float32 values a thread, 2-core Xeon: the
    # gather 47-48 us that way (1 or 4 rows ahead), against 36-37 after a
    # step-early burst that stalled the thread longer than that saved
    # (forward_backward 207-210 against 219 us a step).
    C = out.shape[1]
    early = early_prefetch(X, r1 - r0, X.itemsize)
    ahead = max(1, GATHER_AHEAD_BYTES // max(1, C * X.itemsize))
    if not early:
        for b in range(r0, min(r1, r0 + ahead)):
            prefetch_row(X, idx[start + b])
    for b in range(r0, r1):
        i = idx[start + b]
        if not early and b + ahead < r1:
            prefetch_row(X, idx[start + b + ahead])
        if bf16:
            for c in range(C):
                out[b, c] = round_bfloat16(X[i, c] * scale)
        else:
            for c in range(C):
                out[b, c] = X[i, c] * scale


# ----------------------------------------------------------------------------
# dense layer with its activation fused

@kernel
def bias_activation(out, bias, activation, bf16, r0, r1, j0, j1):
    # out is (B, OC), bias is (OC,)
    # out = activation(out + bias) for rows r0:r1 and columns j0:j1, rounded
    # to bfloat16 if bf16; one loop per activation so that each vectorizes
    # (exp too), and two-dimensional indexing: a row view or a call per row
    # costs Numba's reference counting per row. (Unsigned columns: a signed
    # index from j0 gets Numba's check for negative indices, which kept the
    # loops from vectorizing: the regression benchmark's forward_backward
    # took 1.5x as long.)
    u0 = np.uint64(j0)
    u1 = np.uint64(j1)
    for i in range(r0, r1):
        if activation == SIGMOID:
            for j in range(u0, u1):
                out[i, j] = ONE / (ONE + fast_exp(-(out[i, j] + bias[j])))
        elif activation == TANH:
            for j in range(u0, u1):
                out[i, j] = fast_tanh(out[i, j] + bias[j])
        elif activation == RELU:
            for j in range(u0, u1):
                z = out[i, j] + bias[j]
                out[i, j] = z if z > ZERO else ZERO
        else:
            for j in range(u0, u1):
                out[i, j] += bias[j]
        if bf16:
            for j in range(u0, u1):
                out[i, j] = round_bfloat16(out[i, j])


@kernel
def round_row(row):
    # row rounded to bfloat16 in place (bfloat16.py)
    for j in range(row.shape[0]):
        row[j] = round_bfloat16(row[j])


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


@driver_kernel
def dense_forward(out, inp, weight, weight_t, outputs_t, bias, activation, bf16, r0, r1, j0, j1):
    # out is (B, OC), inp is (B, C), weight is (OC, C), weight_t is
    # (OCT / BLOCK_COLUMNS, C, BLOCK_COLUMNS), panel p holding the transpose
    # of weight rows p * BLOCK_COLUMNS:(p + 1) * BLOCK_COLUMNS
    # (weight_panels), or (0, C, BLOCK_COLUMNS) for a wide layer,
    # outputs_t is this thread's scratch for a wide layer's transposed
    # outputs (at least OCT * BLOCK_COLUMNS values), bias is (OC,); j0 a
    # multiple of 16 below OCT, or any output past it (column_layers.column_cut)
    # out = activation(inp @ weight.T + bias) for rows r0:r1 and outputs
    # j0:j1, rounded to bfloat16 if bf16.
    # Outputs 0:OCT (OCT = transposed_outputs(OC), whole blocks of
    # BLOCK_COLUMNS) come from rows_times_matrix's register blocks (about
    # 1.5x the rate of the dot products below, measured): as rows of inp
    # times weight_t's panels, or in a wide layer (wide_layer) as their transpose,
    # rows of weight times a panel of inp.T (wide_forward). Both compute
    # each output as the same chain of multiply-adds, so which one a layer
    # takes changes no value. The rest are dot products along the long,
    # contiguous C axis of weight's rows, 4 rows x DOT_OUTPUTS outputs a
    # call (dot_tile in microkernel.py: explicit vectors, in tiles that fit
    # the CPU's registers). At an edge a tile repeats the last row and
    # stores only what is real, and the last outputs take a tile as wide as
    # they are: every output is computed by the same instructions, whatever
    # rows and outputs a call covers (a layer split between threads by its
    # outputs: column_layers.column_layer).
    OC, C = weight.shape
    OCT = transposed_outputs(OC)
    blocked = min(j1, OCT)
    if blocked > j0:
        if wide_layer(OC):
            for b0 in range(r0, r1, BLOCK_COLUMNS):
                wide_forward(out, inp, weight, outputs_t, b0, min(r1, b0 + BLOCK_COLUMNS), j0,
                             blocked)
        else:
            for p in range(j0 // BLOCK_COLUMNS, -(-blocked // BLOCK_COLUMNS)):
                c0 = p * BLOCK_COLUMNS
                rows_times_matrix(out, inp[:, ::1], weight_t[p], r0, r1, C, max(j0 - c0, 0),
                                  min(blocked - c0, BLOCK_COLUMNS), C, c0)
    for b in range(r0, r1, 4):
        for j in range(max(j0, OCT), j1, DOT_OUTPUTS):
            dot_tile(out, inp, weight, b, min(4, r1 - b), j, min(DOT_OUTPUTS, j1 - j))
    # (once, after all tiles: reading a tile's outputs right after storing
    # them stalls on the store buffer; 64-1 over 100 rows took 0.46 us, 0.89
    # with a call after each tile)
    bias_activation(out, bias, activation, bf16, r0, r1, j0, j1)


# Layers with at least this many outputs in whole register blocks compute
# them transposed (wide_forward) and keep no transposed weights: keeping
# them cost W3's step 663,552 copied weights, each read along a column.
# On Zen 3, one core, W3's 784-512 forward of 64 rows took 0.93 of the time
# of the transposed weights' path before their upkeep (0.82 with it);
# 784-256 of 64 rows 0.96; but 100 rows (padded to 112 columns) 1.07-1.13.
WIDE_OUTPUTS = 256


@kernel
def wide_layer(OC):
    # whether a layer of OC outputs computes them transposed (wide_forward)
    return transposed_outputs(OC) >= WIDE_OUTPUTS


@kernel
def kept_transposed(OC):
    # how many of a layer's outputs dense_forward takes from transposed
    # weights kept by the update (weight_t's width): none in a wide layer
    return 0 if wide_layer(OC) else transposed_outputs(OC)


@kernel
def wide_forward(out, inp, weight, outputs_t, b0, b1, j0, j1):
    # out is (B, OC), inp is (B, C), weight is (OC, C), outputs_t has at
    # least OCT * BLOCK_COLUMNS values; b1 - b0 <= BLOCK_COLUMNS; j0, j1
    # multiples of 16 within 0:OCT
    # out[b0:b1, j0:j1] = inp[b0:b1] @ weight[j0:j1].T, computed as its
    # transpose: rows of weight (4 outputs a register block) times a panel
    # of inp.T (C values a column, one column a batch row, zero columns up to
    # a multiple of NARROW_COLUMNS), into outputs_t as an (OCT, width)
    # matrix that is then copied out transposed. C goes in passes of at
    # most panel_rows, the panel of each packed on the stack once and read
    # by every block of 4 outputs. Each output is the chain of
    # multiply-adds that rows_times_matrix gives it from weight_t, in the
    # same order (a * b is b * a), so the values are the same bit for bit.
    # The copies are of inputs and outputs (C + OCT values a row), where
    # weight_t's upkeep copied C * OCT weights a step.
    OC, C = weight.shape
    OCT = transposed_outputs(OC)
    nb = b1 - b0
    width = -(-nb // NARROW_COLUMNS) * NARROW_COLUMNS
    # (any-layout, as rows_times_matrix passes it: one compiled narrow_block)
    sums = outputs_t[:OCT * width].reshape((OCT, width))[:, ::1]
    packed = pointer_array(stack_buffer(PACK_VALUES, out), PACK_VALUES)
    passes = max(1, -(-C // panel_rows(out)))
    step = max(1, -(-C // passes))
    for c0 in range(0, max(C, 1), step):  # once when C is 0: zeros
        c1 = min(C, c0 + step)
        panel = transposed_panel(packed, inp, b0, b1, width, c0, c1)
        for j in range(j0, j1, 4):
            narrow_block(sums, weight[:, c0:c1], panel, j, np.int64(4), c1 - c0, c0 > 0,
                         width)
    # out[b0:b1, j0:j1] = sums[j0:j1, :nb].T, as the weights' transposes are
    # made
    transpose_weight_block(out[b0:b1], sums, j0, j1, np.int64(0), nb)


@inline_kernel
def packed_matrix(packed, rows, cols):
    # the first rows * cols values of packed (a stack panel) as a C-contiguous
    # (rows, cols) matrix: the panels' view, for their copies and callers
    return packed[:rows * cols].reshape((rows, cols))


@inline_kernel
def transposed_panel(packed, inp, b0, b1, width, c0, c1):
    # inp[b0:b1, c0:c1].T copied into the first values of packed as a
    # contiguous (c1 - c0, width) matrix, zero past column b1 - b0 (by
    # transpose_into_panel, which compiles once: inlined, its copy made W3's
    # step 1.03x slower); that matrix
    transpose_into_panel(packed, inp, b0, b1, width, c0, c1)
    return packed_matrix(packed, c1 - c0, width)[:, ::1]  # (source_panel's type)


@kernel
def transpose_into_panel(packed, inp, b0, b1, width, c0, c1):
    # transposed_panel's copy: the batch rows in whole tiles as the weights'
    # transposes are made, the rows past those one value at a time
    n = TRANSPOSE_BYTES // inp.itemsize
    nc = c1 - c0
    nb = b1 - b0
    panel = packed_matrix(packed, nc, width)
    src = inp[b0:b1, c0:c1]
    tiled = nb // n * n
    transpose_weight_block(panel, src, np.int64(0), tiled, np.int64(0), nc)
    for i in range(tiled, nb):
        row = src[i]
        for c in range(nc):
            panel[c, i] = row[c]
    for c in range(nc):
        dst = panel[c]
        for i in range(nb, width):
            dst[i] = ZERO


@kernel
def transpose_weight_block(weight_t, weight, j0, j1, k0, k1):
    # weight_t is (C, OCT), weight is (OC, C); j0, j1 multiples of 16 for
    # weights (of n below for other callers)
    # weight_t[k0:k1, j0:j1] = weight[j0:j1, k0:k1].T in n x n tiles of
    # vectors (transpose_tile: n = 8 float32 or 4 float64 values; W3's
    # float32 step 1.05-1.16x faster than one value at a time on Zen 3), the
    # last (k1 - k0) % n rows of weight_t one value at a time. Each tile row
    # of n values is written across j0:j1 before the next, so that whole
    # cache lines of weight_t (16 float32 outputs) are written together and
    # tasks owning different outputs never share one.
    n = TRANSPOSE_BYTES // weight.itemsize
    tiled = k0 + (k1 - k0) // n * n
    for k in range(k0, tiled, n):
        for j in range(j0, j1, n):
            transpose_tile(weight_t, weight, j, k)
    for k in range(tiled, k1):
        dst = weight_t[k]
        for j in range(j0, j1):
            dst[j] = weight[j, k]


@inline_kernel
def weight_panels(flat, start, C, OCT):
    # flat[start:start + C * OCT] seen as dense_forward's transposed weights:
    # OCT / BLOCK_COLUMNS panels of (C, BLOCK_COLUMNS), panel p the
    # transpose of weight rows p * BLOCK_COLUMNS:(p + 1) * BLOCK_COLUMNS
    # (kept by transpose_to_panels). Each block of outputs is contiguous,
    # so a thread that computes and updates one block (a column layer:
    # column_layers.py) touches no cache line of another's.
    # With one (C, OCT) matrix, each 512-byte row held both threads' blocks
    # of 784-128-10 (batch 32, Adam, 2 threads on Zen 4), and the update of
    # each 16-row task's transposed block took 8-9.5 us against 5.3-6 in
    # panels: the prefetchers pull the other block's lines into each core.
    return flat[start:start + C * OCT].reshape((OCT // BLOCK_COLUMNS, C, BLOCK_COLUMNS))


@kernel
def transpose_to_panels(panels, weight, j0, j1, k0, k1):
    # panels is (OCT / BLOCK_COLUMNS, C, BLOCK_COLUMNS), weight is (OC, C);
    # j0, j1 multiples of 16 (weight_panels)
    # transpose_weight_block of weight[j0:j1, k0:k1] into each panel it covers
    for p in range(j0 // BLOCK_COLUMNS, -(-j1 // BLOCK_COLUMNS)):
        c0 = p * BLOCK_COLUMNS
        transpose_weight_block(panels[p], weight[c0:], max(j0 - c0, 0),
                               min(j1 - c0, BLOCK_COLUMNS), k0, k1)


# transposed_panels_streamed's blocks: 16 outputs, one task's rows at least
STREAMED_OUTPUTS = 16


@kernel
def streamable(panels, j0, j1, k0, k1, block):
    # whether transposed_panels_streamed can copy weight rows j0:j1, columns
    # k0:k1, into panels: whole rows in blocks of STREAMED_OUTPUTS, each
    # block's row of a panel whole cache lines, and block has room
    C = panels.shape[1]
    line_values = 64 // panels.itemsize
    return (k0 == 0 and k1 == C and j0 % STREAMED_OUTPUTS == 0
            and (j1 - j0) % STREAMED_OUTPUTS == 0 and STREAMED_OUTPUTS % line_values == 0
            and np.int64(panels.ctypes.data) % 64 == 0 and block.shape[0] >= STREAMED_OUTPUTS * C)


@kernel
def transposed_panels_streamed(panels, weight, block, j0, j1):
    # transpose_to_panels(panels, weight, j0, j1, 0, C) where streamable,
    # each block of STREAMED_OUTPUTS weight rows transposed into `block`
    # (a thread's scratch), then copied into its panel by non-temporal
    # stores (stream_line): the same values. Where the other thread reads
    # the panels, its next forward takes the lines from memory instead of
    # this core's cache, and this core's next update writes them without
    # taking them back from the other's (docs/performance.md: the float64
    # regression step 0.83 of the time where the two cores are far apart,
    # 1.03 near; training.ExchangeChoice picks).
    C = panels.shape[1]
    n = STREAMED_OUTPUTS
    transposed = block[:C * n].reshape((C, n))
    row_bytes = panels.shape[2] * panels.itemsize
    for j in range(j0, j1, n):
        transpose_weight_block(transposed, weight[j:j + n], np.int64(0), n, np.int64(0), C)
        p = j // panels.shape[2]
        src = np.int64(transposed.ctypes.data)
        dst = np.int64(panels[p].ctypes.data) + (j - p * panels.shape[2]) * panels.itemsize
        for c in range(C):
            for line in range(0, n * panels.itemsize, 64):
                stream_line(np.uint64(dst + c * row_bytes + line),
                            np.uint64(src + c * n * panels.itemsize + line))
    store_fence()


@kernel
def round_columns(out, src, k0, k1):
    # out and src are (OC, C)
    # out[:, k0:k1] = src[:, k0:k1] rounded to bfloat16: the weights' copy
    # that bfloat16 products read
    for j in range(out.shape[0]):
        dst = out[j, k0:k1]
        row = src[j, k0:k1]
        for k in range(dst.shape[0]):
            dst[k] = round_bfloat16(row[k])


@ordered_kernel
def dense_backward_input(dinp, dout, weight, inp, activation, bf16, r0, r1, k0, k1):
    # dinp is (B, C), dout is (B, OC), weight is (OC, C), inp is (B, C)
    # dinp = (dout @ weight) * activation'(inp) for rows r0:r1 and columns
    # k0:k1 (k0 a multiple of 16; rounded to bfloat16 if bf16),
    # where inp is the previous layer's output: the delta of the previous
    # layer's pre-activation, ready for its own weight gradient. Each value
    # is the same whatever rows and columns a call covers. An ordered_kernel:
    # with `reassoc`, g * (a * (1 - a)) could become (g * a) * (1 - a) in one
    # caller and not in another (seen: a fresh compile and the cached one
    # trained to different parameters).
    u0 = np.uint64(k0)  # (unsigned: see bias_activation)
    u1 = np.uint64(k1)
    # one output (a regression's, a binary label's): each row is its delta
    # times the weight row, the product rows_times_matrix gives, in half its
    # time (100 rows of 64 columns: 0.50 us against 0.95)
    single = weight.shape[0] == 1
    if not single:
        rows_times_matrix(dinp, dout[:, ::1], weight, r0, r1, weight.shape[0], k0, k1,
                          weight.shape[0], np.int64(0))
    w = weight[0]
    for b in range(r0, r1):
        g = dinp[b]
        a = inp[b]
        if single:
            d = dout[b, 0]
            for k in range(u0, u1):
                g[k] = d * w[k] * activation_derivative(a[k], activation)
        else:
            for k in range(u0, u1):
                g[k] *= activation_derivative(a[k], activation)
        if bf16:
            for k in range(u0, u1):
                g[k] = round_bfloat16(g[k])


@kernel
def dense_backward_weight(dweight, dout, inp, j0, j1, nrows, k0, k1):
    # dweight is (OC, C), dout is (B, OC), inp is (B, C)
    # dweight[j0:j1, k0:k1] = dout[:nrows, j0:j1].T @ inp[:nrows, k0:k1],
    # k0 a multiple of BLOCK_COLUMNS (or k0:k1 all of C). One writer per
    # weight row, and each row sums over batch rows in the same order
    # whatever the thread count: by blocked_backward_weight's register
    # blocks or, in windows of weight rows where many pairs of them have
    # deltas that are both 0 once sorted by their zeros (zero_sorted_pairs),
    # by those pairs over the batch rows either needs
    # (sorted_pairs_times_inputs). Each weight is the same chain of
    # multiply-adds either way, less terms that add 0: the same values.
    sortable = 0 < nrows <= MAX_SUM_ROWS and j1 - j0 >= 2 and k1 > k0
    order = pointer_array(stack_indices(SORTED_MAX_ROWS), SORTED_MAX_ROWS)
    # equal windows whose deltas, copied as rows, fit PACK_VALUES
    windows = -(-(j1 - j0) // min(SORTED_MAX_ROWS, PACK_VALUES // nrows)) if sortable else 1
    span = -(-(j1 - j0) // windows)
    # the register blocks take each stretch of windows not listed in one call
    # (one call site: blocked_backward_weight is inlined)
    blocked = j0  # the first weight row not computed yet
    w0 = j0
    while blocked < j1:
        w1 = min(j1, w0 + span)
        listed = sortable and (zero_sorted_pairs(order, dout, w0, w1, nrows)
                               >= listed_min_pair_zeros(dout.itemsize))
        if listed or w1 == j1:
            end = w0 if listed else j1
            if blocked < end:
                blocked_backward_weight(dweight, dout, inp, blocked, end, nrows, k0, k1)
            if listed:
                sorted_pairs_times_inputs(dweight, dout, inp, order, w0, w1 - w0, nrows, k0, k1)
            blocked = w1
        w0 = w1


@inline_kernel
def blocked_backward_weight(dweight, dout, inp, j0, j1, nrows, k0, k1):
    # dense_backward_weight by register blocks: the last (k1 - k0) % 16
    # columns go transposed for whole blocks of 16 weight rows
    # (weight_tail_columns); rows past those, on rows_times_matrix's padded
    # panel
    main = k0 + (k1 - k0) // NARROW_COLUMNS * NARROW_COLUMNS
    tail_rows = j0 + (j1 - j0) // NARROW_COLUMNS * NARROW_COLUMNS if main < k1 else j0
    if tail_rows > j0:
        deltas_times_inputs(dweight, dout, inp, j0, tail_rows, nrows, k0, main)
        weight_tail_columns(dweight, dout, inp, j0, tail_rows, nrows, main, k1)
    if j1 > tail_rows:
        deltas_times_inputs(dweight, dout, inp, tail_rows, j1, nrows, k0, k1)


# dense_backward_weight sorts a window's weight rows by how many of their
# deltas are 0 over the first PAIR_SAMPLE_ROWS batch rows (which come
# shuffled), pairs them in that order (units that are 0 for most rows
# together), and lists the pairs where at least a share of the sampled pairs
# of deltas are both 0: on AVX-512, LISTED_MIN_PAIR_ZEROS_512 for float32,
# float64; on AVX2, LISTED_MIN_PAIR_ZEROS_256. One core of Zen 4, 100 batch
# rows, deltas 0 at random, against the register blocks (the copy and the
# sort included) of 128 x 100, 64 x 128, 100 x 784 and 32 x 512 weights,
# pairs both 0:
# - 26-29%: float32 0.84-1.06 were it taken (not);
# - 31-40%: float32 0.75-0.90 (`skylake-avx512` 0.75-0.91); float64
#   0.88-0.98 were it taken (not, but 100 x 784 at 40%: 0.89-0.97);
# - 46-55%: float32 0.62-0.81, float64 0.76-0.80 (`haswell`, where taken:
#   0.82-0.97);
# - 62-70%: 0.48-0.64 (`haswell` 0.66-0.82).
# (Not 32 x 512 in float64, whose sums over 512 inputs in 4 calls a pair
# gain nothing: 1.01-1.03.) On the regression benchmark's network, whose
# second layer has units 0 for a whole half batch, sorted pairs give its
# second weight gradient 0.38-0.44 pairs both 0 where neighbours give
# 0.17-0.21: 0.74-0.79 of the blocks' time after 1-10 epochs, 0.65 after 20
# (docs/performance.md).
LISTED_MIN_PAIR_ZEROS_512 = (0.3, 0.4)
LISTED_MIN_PAIR_ZEROS_256 = 0.5
PAIR_SAMPLE_ROWS = 16  # at most 64: one int64 of zero flags a weight row
SORTED_MAX_ROWS = 256  # weight rows of a window at most
SORT_KEYS = PAIR_SAMPLE_ROWS + 2  # zero_sorted_pairs' counting sort: its bins, and one


@inline_kernel
def listed_min_pair_zeros(itemsize):
    # the share of pairs of deltas both 0 from which dense_backward_weight
    # lists them, for values of `itemsize` bytes on the compiled target
    if compiled_vector_bits() < 512:
        return LISTED_MIN_PAIR_ZEROS_256
    return LISTED_MIN_PAIR_ZEROS_512[0] if itemsize == 4 else LISTED_MIN_PAIR_ZEROS_512[1]


@inline_kernel
def zero_sorted_pairs(order, dout, j0, j1, nrows):
    # order[:j1 - j0] = 0..j1 - j0 - 1 (weight rows j0:j1) by descending
    # count of zero deltas over the first PAIR_SAMPLE_ROWS batch rows
    # (stable), to be taken in pairs order[2p], order[2p + 1]; returns the
    # share of those pairs' deltas both 0 over those rows. (A bit a sampled
    # row in each weight row's word: 0.25-0.53 us for 50-128 weight rows.)
    n = j1 - j0
    zeros = pointer_array(stack_words(SORTED_MAX_ROWS), SORTED_MAX_ROWS)
    starts = pointer_array(stack_indices(SORT_KEYS), SORT_KEYS)
    for i in range(n):
        zeros[i] = 0
    sampled = min(nrows, PAIR_SAMPLE_ROWS)
    for t in range(sampled):
        row = dout[t, j0:j1]
        for i in range(n):
            zeros[i] |= np.int64(row[i] == 0) << t
    # counting sort on sampled - count (0..sampled), stable
    for c in range(sampled + 2):
        starts[c] = 0
    for i in range(n):
        starts[sampled - popcount(zeros[i]) + 1] += 1
    for c in range(1, sampled + 2):
        starts[c] += starts[c - 1]
    for i in range(n):
        key = sampled - popcount(zeros[i])
        order[starts[key]] = i
        starts[key] += 1
    both = 0
    for p in range(0, n - 1, 2):
        both += popcount(zeros[order[p]] & zeros[order[p + 1]])
    return both / (sampled * (n // 2))


@inline_kernel
def sorted_pairs_times_inputs(dweight, dout, inp, order, j0, n, nrows, k0, k1):
    # dweight is (OC, C), dout is (B, OC), inp is (B, C), order as
    # zero_sorted_pairs gives it, n * nrows <= PACK_VALUES
    # dweight[j, k0:k1] = dout[:nrows, j] @ inp[:nrows, k0:k1] for the
    # weight rows j = j0 + order[i], i < n, in pairs (order[2p],
    # order[2p + 1], in either order: listed_block's gap may be negative)
    # over the batch rows where either delta is not 0 (listed_product). The
    # deltas' columns are first copied as rows on the stack
    # (transposed_panel).
    packed = pointer_array(stack_buffer(PACK_VALUES, dweight), PACK_VALUES)
    coef = transposed_panel(packed, dout, np.int64(0), nrows, nrows, j0, j0 + n)
    first_column = np.int64(0)  # (out typed as rows_times_matrix's: one listed_product)
    listed_product(dweight[j0:][:, first_column:], coef, inp, np.int64(0), n, nrows, k0, k1,
                   order, np.bool_(True))


@kernel
def deltas_times_inputs(dweight, dout, inp, j0, j1, nrows, k0, k1):
    # dweight is (OC, C), dout is (B, OC), inp is (B, C)
    # dweight[j0:j1, k0:k1] = dout[:nrows, j0:j1].T @ inp[:nrows, k0:k1] by
    # rows_times_matrix, whose coefficients are dout's columns. Read in
    # place, a column steps a whole row of dout per batch row; where that
    # stride is a multiple of CONFLICT_STRIDE bytes (few_sets), a register
    # block's 4 columns over 128 batch rows fall into a few of L1's sets
    # (at 512 outputs, 2 KB: 2 of 64) and are fetched from L2 again and
    # again. There, for PACKED_DELTAS_MIN_COLUMNS inputs or more (a copy
    # that many multiply-adds repay), the columns are first copied into
    # contiguous rows on the stack, as many weight rows at a time as fit
    # (MAX_SUM_ROWS batch rows at most). The copy changes no value. (Both
    # calls pass coef as `[:, ::1]`, which Numba types as any-layout: one
    # compiled rows_times_matrix for all callers; it only reads coef's
    # scalars.)
    if nrows > MAX_SUM_ROWS or k1 - k0 < PACKED_DELTAS_MIN_COLUMNS or not few_sets(dout):
        rows_times_matrix(dweight, dout.T[:, ::1], inp, j0, j1, nrows, k0, k1,
                          np.int64(MAX_SUM_ROWS), np.int64(0))
        return
    packed = pointer_array(stack_buffer(PACK_VALUES, dweight), PACK_VALUES)
    chunk = PACK_VALUES // max(nrows, 1) // 4 * 4
    for c0 in range(j0, j1, chunk):
        c1 = min(j1, c0 + chunk)
        coef = packed[:(c1 - c0) * nrows].reshape((c1 - c0, nrows))
        for t in range(nrows):
            row = dout[t, c0:c1]
            for i in range(c1 - c0):
                coef[i, t] = row[i]
        rows_times_matrix(dweight[c0:c1], coef[:, ::1], inp, np.int64(0), c1 - c0, nrows, k0,
                          k1, np.int64(MAX_SUM_ROWS), np.int64(0))


@kernel
def few_sets(matrix):
    # whether matrix's rows are a multiple of CONFLICT_STRIDE bytes apart:
    # a column of it falls into a few of L1's sets
    return matrix.strides[0] % CONFLICT_STRIDE == 0


@kernel
def weight_tail_columns(dweight, dout, inp, j0, j1, nrows, k0, k1):
    # dweight is (OC, C), dout is (B, OC), inp is (B, C)
    # dweight[j0:j1, k0:k1] = dout[:nrows, j0:j1].T @ inp[:nrows, k0:k1] for
    # the last k1 - k0 < NARROW_COLUMNS columns, j1 - j0 a multiple of
    # NARROW_COLUMNS, computed as its transpose: the tail columns, 4 at a
    # time as rows of inp.T, by 16 weight rows as columns of dout, into a
    # tile that is copied out transposed. Each weight gets the very chain of
    # multiply-adds that tail_columns gives it (the same products, in source
    # order, from 0), without tail_columns' padded panel and 16 computed
    # columns for a few (the regression benchmark's 100 inputs: 4 columns of
    # 32 rows took 6.1 us there, 23% of the task, on Zen 3).
    tile = pointer_array(stack_buffer(SQUARE_TILE_VALUES, dweight),
                         (NARROW_COLUMNS, NARROW_COLUMNS))
    columns = inp.T[k0:k1]
    width = k1 - k0
    for j in range(j0, j1, NARROW_COLUMNS):
        deltas = dout[:, j:]
        for c in range(0, width, 4):
            block_multiply_add(tile, columns, deltas, c, min(4, width - c), 0, nrows, False,
                               NARROW_COLUMNS)
        for i in range(NARROW_COLUMNS):
            for c in range(width):
                dweight[j + i, k0 + c] = tile[c, i]


# Columns of a block in rows_times_matrix: block_multiply_add takes them in
# register panels that fit the CPU's vector registers. The whole 16s of
# columns past the last whole block go in one narrow block.
BLOCK_COLUMNS = 64
NARROW_COLUMNS = 16
# rows_times_matrix sums more source rows than this in equal passes of at
# most this many (panel_rows: half as many in float64): a packed 64-column
# panel (32 KB at most) then stays in L1 for every row group (weight
# gradient of 784-100 on 200 rows 1.2x faster in two passes of 100,
# measured).
MAX_SUM_ROWS = 128
PACK_VALUES = MAX_SUM_ROWS * BLOCK_COLUMNS  # rows_times_matrix's packed panel
PACK_MIN_ROWS = 32
# Rows a multiple of this many bytes apart fall into 16 of L1's 64 sets or
# fewer: what rows_times_matrix and deltas_times_inputs copy where they can
CONFLICT_STRIDE = 256
# deltas_times_inputs copies its coefficients for this many inputs or more
PACKED_DELTAS_MIN_COLUMNS = 4 * BLOCK_COLUMNS
TAIL_ROWS = PACK_VALUES // NARROW_COLUMNS  # source rows of a padded tail panel
TILE_VALUES = 4 * NARROW_COLUMNS
SQUARE_TILE_VALUES = NARROW_COLUMNS * NARROW_COLUMNS  # weight_tail_columns' tile


@kernel
def panel_rows(out):
    # the most source rows of a packed panel of BLOCK_COLUMNS columns of
    # out's dtype that fit in 32 KB: MAX_SUM_ROWS in float32, half in float64
    return MAX_SUM_ROWS * 4 // out.itemsize


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
        return stack_values(builder, context.get_value_type(like.dtype), size.literal_value)
    return types.CPointer(like.dtype)(size, like), codegen


@intrinsic
def pointer_array(typingctx, pointer, shape):
    # numba.carray(pointer, shape) for a stack buffer, in kernels without
    # reference counts (jit.py), which cannot call carray (a function that
    # returns an array): a C-contiguous array over pointer's values, with
    # no owner
    if not isinstance(pointer, types.CPointer):
        return None
    if isinstance(shape, types.Integer):
        ndim = 1
    elif isinstance(shape, types.UniTuple) and isinstance(shape.dtype, types.Integer):
        ndim = shape.count
    else:
        return None
    array_type = types.Array(pointer.dtype, ndim, "C")

    def codegen(context, builder, signature, args):
        from numba.np.arrayobj import make_array, populate_array
        data, dims = args
        intp = context.get_value_type(types.intp)
        dims = [dims] if ndim == 1 else cgutils.unpack_tuple(builder, dims, ndim)
        dims = [builder.sext(d, intp) if d.type.width < intp.width else d for d in dims]
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(pointer.dtype)))
        strides = [itemsize]
        for d in reversed(dims[1:]):
            strides.insert(0, builder.mul(strides[0], d))
        array = make_array(array_type)(context, builder)
        populate_array(array, data=data, shape=cgutils.pack_array(builder, dims),
                       strides=cgutils.pack_array(builder, strides), itemsize=itemsize,
                       meminfo=None)
        return array._getvalue()
    return array_type(pointer, shape), codegen


def stack_values(builder, value_type, size):
    # `size` values of one type, not an array type: LLVM's scalar
    # replacement of aggregates spent 2.9 s compiling each function that
    # held a [8192 x float] (measured); aligned to a cache line
    buffer = cgutils.alloca_once(builder, value_type, size=ir.Constant(ir.IntType(64), size))
    buffer.align = 64
    return buffer


@inline_kernel
def source_panel(packed, src, t0, t1, k, width, pack):
    # src[t0:t1, k:k + width], copied into the first values of packed as a
    # contiguous (t1 - t0, width) matrix if `pack` (copy_into_panel), else
    # as it is
    if not pack:
        return src[t0:t1, k:k + width]
    copy_into_panel(packed, src, t0, t1, k, width)
    # (typed as the view above: one compiled caller)
    return packed_matrix(packed, t1 - t0, width)[:, ::1]


@kernel
def copy_into_panel(packed, src, t0, t1, k, width):
    # source_panel's copy
    panel = packed_matrix(packed, t1 - t0, width)
    for t in range(t0, t1):
        row = src[t, k:k + width]
        dst = panel[t - t0]
        for c in range(width):
            dst[c] = row[c]


# rows_times_matrix takes pairs of rows over the sources where either row's
# coefficient is not 0 (listed_block) where the coefficients are rows and
# at least LISTED_MIN_ZEROS of those of the first LISTED_SAMPLE_ROWS rows are
# 0: a relu layer's outputs and the deltas below it (about half), an image's
# pixels (Fashion-MNIST's: half, and a third of two images' both). One core
# of Zen 4, 100 rows of the regression benchmark's network after 3 epochs
# (49% and 44% zeros): its 128-64 forward in 0.83 of the register blocks'
# time, the delta of its 128 hidden units in 0.64 (after 20 epochs, 82% and
# 57%: 0.42, 0.48); 100 Fashion-MNIST rows times 64 columns of 784-100's
# transposed weights 0.72-0.74 (float32), 0.73-0.79 (float64)
# (docs/performance.md).
LISTED_MAX_SOURCES = 256
# its list of sources, and room for the last vector of indices stored whole
LISTED_SCRATCH = LISTED_MAX_SOURCES + 16
# A listed block's sources go in passes whose rows fit L1 (784 sources of
# 64 float32 columns: 7 passes of 112, 0.72-0.74 of the register blocks'
# time in three runs; 4 passes of 196 within 64 KB, 0.86 in one), in
# blocks of columns of at most LISTED_COLUMN_BYTES a row: one call of
# LISTED_VECTORS 512-bit vectors.
LISTED_MAX_BYTES = 32 * 1024
LISTED_COLUMN_BYTES = 512
LISTED_SAMPLE_ROWS = 8
LISTED_MIN_ZEROS = 0.4


@intrinsic
def popcount(typingctx, word):
    # the number of bits set in an integer (llvm.ctpop)
    if not isinstance(word, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(value.type, [value.type]),
            f"llvm.ctpop.i{value.type.width}")
        return builder.call(function, [value])
    return word(word), codegen


def stack_integers(size, integer):
    # an intrinsic's typing: a pointer to `size` (a literal) values of the
    # integer type `integer` on the stack of the function it is inlined into
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        return stack_values(builder, ir.IntType(integer.bitwidth), size.literal_value)
    return types.CPointer(integer)(size), codegen


@intrinsic
def stack_indices(typingctx, size):
    # a pointer to `size` (a literal) int32 values on the stack
    return stack_integers(size, types.int32)


@intrinsic
def stack_words(typingctx, size):
    # a pointer to `size` (a literal) int64 values on the stack
    return stack_integers(size, types.int64)


@kernel
def listed_rows(coef, r0, r1, nt):
    # whether rows_times_matrix takes rows r0:r1 in listed blocks
    if coef.strides[1] != coef.itemsize or nt == 0:
        return False
    sampled = min(r1, r0 + LISTED_SAMPLE_ROWS)
    zeros = 0
    for r in range(r0, sampled):
        row = coef[r]
        for t in range(nt):
            zeros += row[t] == 0
    return zeros >= LISTED_MIN_ZEROS * (sampled - r0) * nt


@kernel
def rows_times_matrix(out, coef, src, r0, r1, nt, k0, k1, sum_rows, out_col):
    # out is (R, out_col + C), coef is (R, T), src is (T, C)
    # out[r0:r1, out_col + k0:out_col + k1] = coef[r0:r1, :nt] @ src[:nt, k0:k1]:
    # by dense_rows_times_matrix's register blocks, or where many
    # coefficients are 0 (listed_rows) by pairs of rows over the sources
    # either needs (listed_block). Each output is the same chain of
    # multiply-adds either way, less terms that add 0: the same values.
    if listed_rows(coef, r0, r1, nt):
        rows_in_order = pointer_array(stack_indices(1), 1)  # (not read)
        listed_product(out[:, out_col:], coef, src, r0, r1, nt, k0, k1, rows_in_order,
                       np.bool_(False))
    else:
        dense_rows_times_matrix(out, coef, src, r0, r1, nt, k0, k1, sum_rows, out_col)


@kernel
def listed_product(out, coef, src, r0, r1, nt, k0, k1, order, ordered):
    # out is (R, C), coef is (R, T) with unit stride along T, src is (T, C)
    # out[r0:r1, k0:k1] = coef[r0:r1, :nt] @ src[:nt, k0:k1] by pairs of rows
    # over the sources either needs (listed_block): rows r, r + 1 or, if
    # `ordered`, rows order[r], order[r + 1] (an int32 array)
    if k1 <= k0:
        return
    sources = pointer_array(stack_indices(LISTED_SCRATCH), LISTED_SCRATCH)
    # blocks of columns of at most LISTED_COLUMN_BYTES a source row, each
    # over the sources in equal passes whose rows of the block fit
    # LISTED_MAX_BYTES, each pass continuing the sums the one before stored
    width = min(k1 - k0, LISTED_COLUMN_BYTES // src.itemsize)
    most = max(1, min(LISTED_MAX_SOURCES, LISTED_MAX_BYTES // (width * src.itemsize)))
    step = -(-nt // -(-nt // most))
    for k in range(k0, k1, width):
        k_end = min(k1, k + width)
        for t0 in range(0, nt, step):
            t1 = min(nt, t0 + step)
            for r in range(r0, r1, LISTED_ROWS):
                rows = min(LISTED_ROWS, r1 - r)
                first = np.int64(order[r]) if ordered else r
                gap = np.int64(order[r + 1]) - first if ordered and rows == 2 else np.int64(1)
                listed_block(out, coef[:, t0:t1], src[t0:t1], sources, first, rows, gap,
                             t1 - t0, k, k_end, t0 > 0)


@kernel
def dense_rows_times_matrix(out, coef, src, r0, r1, nt, k0, k1, sum_rows, out_col):
    # out is (R, out_col + C), coef is (R, T), src is (T, C)
    # out[r0:r1, out_col + k0:out_col + k1] = coef[r0:r1, :nt] @ src[:nt, k0:k1]
    # (out_col: where src's columns start in out's), both backward
    # products and the forward one from transposed weights (k0 a multiple of
    # 16, or 0): each output row is a sum of source rows, all
    # contiguous along C. Groups of 4 output rows (the last group may have
    # fewer) take C in blocks of BLOCK_COLUMNS, then the whole 16s of
    # columns left in one narrow block, whose accumulators stay in
    # registers over a pass (block_multiply_add in microkernel.py: explicit
    # vectors, no stores until the end). Column blocks are the outer loop,
    # so that a block of src stays in cache for every row group; within a
    # column block, source rows go in equal passes of at most sum_rows (and
    # panel_rows), each continuing the sums the pass before stored (the
    # same additions in the same order as in one pass). The last few
    # columns (fewer than 16) take the same block on a zero-padded panel
    # (tail_columns). Which path an output takes depends on the shapes and
    # r0, r1 only, never on the thread count or the caller (the block is
    # explicit IR), and every path sums in source order.
    blocked = k0 + (k1 - k0) // BLOCK_COLUMNS * BLOCK_COLUMNS
    narrow = blocked + (k1 - blocked) // NARROW_COLUMNS * NARROW_COLUMNS
    # each pass packs its rows of the source block into a contiguous panel
    # on the stack that every row group then reads: source rows whose
    # stride is a multiple of 2 KB (512 columns) fall into few L1 sets and
    # would be fetched from L2 again for every row group
    packed = pointer_array(stack_buffer(PACK_VALUES, out), PACK_VALUES)
    # a panel read by few row groups is not worth its copy (W3's weight
    # gradient tasks of 16 rows: 7.7-8.1 to 5.4-7.4 ms a step on Zen 3; the
    # tasks of 24 and 32 rows of W1 and the regression benchmark: their
    # gradients 1.2x and 1.07x faster unpacked), unless its rows fall into
    # few L1 sets (CONFLICT_STRIDE): W3's 32-row tasks of 512 inputs
    pack = r1 - r0 > PACK_MIN_ROWS or (r1 - r0 == PACK_MIN_ROWS and few_sets(src))
    passes = max(1, -(-nt // min(sum_rows, panel_rows(out))))
    step = max(1, -(-nt // passes))  # equal passes that fit the panel
    # the width is a literal at each call: 64 here, one of three in narrow_block
    for k in range(k0, blocked, BLOCK_COLUMNS):
        for t0 in range(0, max(nt, 1), step):  # once when nt is 0: zeros
            t1 = min(nt, t0 + step)
            panel = source_panel(packed, src, t0, t1, k, np.int64(BLOCK_COLUMNS), pack)
            for r in range(r0, r1, 4):
                block_multiply_add(out[:, out_col + k:], coef[:, t0:t1], panel, r,
                                   min(4, r1 - r), 0, t1 - t0, t0 > 0, BLOCK_COLUMNS)
    if narrow > blocked:  # 16, 32 or 48 columns: one block, as wide as they are
        rest = narrow - blocked
        for t0 in range(0, max(nt, 1), step):  # once when nt is 0: zeros
            t1 = min(nt, t0 + step)
            panel = source_panel(packed, src, t0, t1, blocked, rest, pack)
            for r in range(r0, r1, 4):
                narrow_block(out[:, out_col + blocked:], coef[:, t0:t1], panel, r, min(4, r1 - r),
                             t1 - t0, t0 > 0, rest)
    if narrow < k1:
        tail_columns(out, coef, src, packed, r0, r1, nt, narrow, k1, out_col)


@kernel
def narrow_block(out, coef, src, r, rows, nt, add, width):
    # block_multiply_add on the first `width` columns (16, 32, 48 or 64) of
    # out and src, each width a literal of its own
    if width == 16:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 16)
    elif width == 32:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 32)
    elif width == 48:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 48)
    else:
        block_multiply_add(out, coef, src, r, rows, 0, nt, add, 64)


@inline_kernel
def padded_panel(packed, src, t0, t1, k0, k1):
    # src[t0:t1, k0:k1] (fewer than NARROW_COLUMNS columns) copied into the
    # first values of packed as a (t1 - t0, NARROW_COLUMNS) matrix, zero
    # past column k1 - k0 (pad_into_panel)
    pad_into_panel(packed, src, t0, t1, k0, k1)
    return packed_matrix(packed, t1 - t0, NARROW_COLUMNS)[:, ::1]


@kernel
def pad_into_panel(packed, src, t0, t1, k0, k1):
    # padded_panel's copy
    panel = packed_matrix(packed, t1 - t0, NARROW_COLUMNS)
    width = k1 - k0
    for t in range(t0, t1):
        row = src[t, k0:k1]
        dst = panel[t - t0]
        for c in range(width):
            dst[c] = row[c]
        for c in range(width, NARROW_COLUMNS):
            dst[c] = ZERO


@kernel
def tail_columns(out, coef, src, packed, r0, r1, nt, k0, k1, out_col):
    # out[r0:r1, out_col + k0:out_col + k1] = coef[r0:r1, :nt] @ src[:nt, k0:k1]
    # for the last k1 - k0 < NARROW_COLUMNS columns: the same register block
    # as the others, on a source panel padded with zero columns to
    # NARROW_COLUMNS, into a tile on the stack whose first k1 - k0 columns
    # are then copied out. Source rows go in passes of TAIL_ROWS (the padded
    # panel fills `packed`), each continuing the sums the pass before stored.
    tile = pointer_array(stack_buffer(TILE_VALUES, out), (4, NARROW_COLUMNS))
    width = k1 - k0
    for t0 in range(0, max(nt, 1), TAIL_ROWS):  # once when nt is 0: zeros
        t1 = min(nt, t0 + TAIL_ROWS)
        panel = padded_panel(packed, src, t0, t1, k0, k1)
        for r in range(r0, r1, 4):
            rows = min(4, r1 - r)
            for i in range(4):
                for c in range(NARROW_COLUMNS):
                    tile[i, c] = ZERO
            if t0 > 0:
                for i in range(rows):
                    for c in range(width):
                        tile[i, c] = out[r + i, out_col + k0 + c]
            block_multiply_add(tile, coef[r:, t0:t1], panel, 0, rows, 0, t1 - t0,
                               True, NARROW_COLUMNS)
            for i in range(rows):
                for c in range(width):
                    out[r + i, out_col + k0 + c] = tile[i, c]


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
