"""Dense layers of a bfloat16 model on AMX tiles (amx.py), where they run.

A layer takes this path when the model is bfloat16, `amx.usable()` and
the layer has at least AMX_MIN_OUTPUTS outputs (W3's 784-512 and 512-512,
the lesson's 784-50, not a classifier's last 10). Its three products each
read two packed operands, A (uint16 rows along K) and B (uint32 pairs
along K):

  forward      out.T = weight @ inp.T   A: W_ROWS     (OC rows, K = C)
                                         B: XT_PAIRS  (K = C, N = batch)
  input delta  dinp = dout @ weight      A: D_ROWS     (batch rows, K = OC)
                                         B: W_PAIRS   (K = OC, N = C)
  weight grad  dW = dout.T @ inp         A: D_COLS     (OC rows, K = batch)
                                         B: X_PAIRS   (K = batch, N = C)

The forward pass is computed transposed so that the weights, the larger
operand, are packed by rows (a copy) and the batch's inputs, the smaller,
by columns (a transpose); its blocks are copied out transposed.

The step packs each activation and delta as it writes it (rows of its own
part of the batch, each thread its own), and each update task packs the
weights it has just written: nothing is packed in a pass of its own. Other
layers (the 10 outputs of a classifier, say) keep the emulated products.

Layouts: `Work.packed` holds the four activation operands of every layer
and `Network.packed_weights` the two weight operands, each described by a
row of (offset, rows, columns) in `Work.packed_layout` (L, 4, 3) and
`Network.packed_weights_layout` (L, 2, 3), in uint16 values (a B operand's
columns are uint32: two each); a layer off this path has empty ones. K is
padded to whole steps of 32 with zeros, and rows and columns where a block
of 32 may start anywhere by 32 more.
"""
import numpy as np
from numba import types
from numba.extending import overload

from .amx import (BLOCK, K_STEP, TILE_ROWS, amx_block, pack_column_pairs, pack_columns,
                  pack_row_pairs, pack_rows, padded)
from .jit import inline_kernel, kernel, ordered_kernel
from .kernels import (BLOCK_COLUMNS, TRANSPOSE_BYTES, activation_derivative, pointer_array,
                      round_row, stack_buffer, transpose_weight_block)

XT_PAIRS, X_PAIRS, D_COLS, D_ROWS = range(4)
W_ROWS, W_PAIRS = range(2)
SCRATCH_VALUES = BLOCK * BLOCK  # amx_product's block on the stack
ALIGN_VALUES = 32  # each operand starts on a cache line
TILE_OUTPUTS = TRANSPOSE_BYTES // 4  # outputs of a float32 transpose tile
# Layers of fewer outputs keep the emulated products. From 256 down to 32,
# the lesson's bfloat16 step went from 1.8x its float32 time to 0.99x, and
# scikit-learn's (100,) network fitted in 0.78 of float32's time (Intel
# Xeon, measured; docs/performance.md).
AMX_MIN_OUTPUTS = 32


def is_amx_layer(fan_out, amx):
    """Whether a layer of fan_out outputs runs on AMX tiles in a model that
    uses them."""
    return bool(amx) and fan_out >= AMX_MIN_OUTPUTS


def layout(shapes):
    # (offset, rows, columns) of each (rows, columns, bytes a value) in
    # shapes, in uint16 values, each on a cache line; and the total
    rows, offset = [], 0
    for r, c, itemsize in shapes:
        rows.append((offset, r, c))
        offset += -(-r * c * itemsize // 2 // ALIGN_VALUES) * ALIGN_VALUES
    return rows, offset


def layouts(layer_sizes, batch_size, amx):
    """((L, 4, 3) activation operand layout, its size in uint16 values),
    ((L, 2, 3) weight operand layout, its size): see the module's
    docstring."""
    L = len(layer_sizes) - 1
    acts = np.zeros((L, 4, 3), np.int64)
    weights = np.zeros((L, 2, 3), np.int64)
    act_size = weight_size = 0
    Bk = padded(batch_size)
    Bp = Bk + BLOCK  # a block may start at any row
    for l, (C, OC) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
        if not is_amx_layer(OC, amx):
            continue
        Cp, OCp = padded(C), padded(OC)
        # (amx_forward reads BLOCK_COLUMNS columns from any row of the batch)
        rows, size = layout([(Cp // 2, Bk + BLOCK_COLUMNS, 4), (Bk // 2, Cp, 4),
                             (OCp + BLOCK, Bk, 2), (Bp, OCp, 2)])
        acts[l] = np.array(rows) + [act_size, 0, 0]
        act_size += size
        rows, size = layout([(OCp + BLOCK, Cp, 2), (OCp // 2, Cp, 4)])
        weights[l] = np.array(rows) + [weight_size, 0, 0]
        weight_size += size
    return (acts, act_size), (weights, weight_size)


@inline_kernel
def a_operand(flat, layout, l, kind):
    # the packed A operand `kind` of layer l: a (rows, columns) uint16 view
    start, rows, columns = layout[l, kind, 0], layout[l, kind, 1], layout[l, kind, 2]
    return flat[start:start + rows * columns].reshape((rows, columns))


@inline_kernel
def a_operand_words(flat, layout, l, kind):
    # the packed A operand `kind` of layer l as words: its pairs of uint16
    # values along K, a (rows, columns / 2) uint32 view
    start, rows, columns = layout[l, kind, 0], layout[l, kind, 1], layout[l, kind, 2]
    return flat[start:start + rows * columns].view(np.uint32).reshape((rows, columns // 2))


@inline_kernel
def b_operand(flat, layout, l, kind):
    # the packed B operand `kind` of layer l: a (rows, columns) uint32 view
    start, rows, columns = layout[l, kind, 0], layout[l, kind, 1], layout[l, kind, 2]
    return flat[start:start + 2 * rows * columns].view(np.uint32).reshape((rows, columns))


@kernel
def amx_layer(net, l):
    # whether layer l runs on AMX tiles
    return net.amx and net.sizes[l + 1] >= AMX_MIN_OUTPUTS


@kernel
def pack_input(work, inp, l, r0, r1, nrows, backward):
    # layer l's input rows r0:r1 (inp, float32 values rounded to bfloat16),
    # packed as its forward product and, with backward, its weight
    # gradient read them; the part ending the batch also zeroes the weight
    # gradient's K padding past nrows
    pack_column_pairs(b_operand(work.packed, work.packed_layout, l, XT_PAIRS), inp, r0, r1)
    if backward:
        zero_to = padded(nrows) if r1 == nrows else r1
        pack_row_pairs(b_operand(work.packed, work.packed_layout, l, X_PAIRS), inp, r0, r1,
                       zero_to, np.int64(0), inp.shape[1])


@kernel
def pack_delta(work, dout, l, r0, r1, nrows):
    # layer l's output delta rows r0:r1, packed as its weight gradient and
    # (past the first layer) its input delta read them
    zero_to = padded(nrows) if r1 == nrows else r1
    pack_columns(a_operand_words(work.packed, work.packed_layout, l, D_COLS), dout, r0, r1,
                 zero_to)
    if l > 0:
        pack_rows(a_operand(work.packed, work.packed_layout, l, D_ROWS), dout, r0, r1,
                  np.int64(0), dout.shape[1])


@kernel
def pack_weights(net, weight, l, j0, j1, k0, k1):
    # weights [j0:j1, k0:k1] of layer l (weight: its float32 master
    # weights), rounded to bfloat16 and packed for the forward product and
    # (past the first layer) the input delta's; j0 even. (The float32 copy
    # that other layers' products read, Network.operands, is not kept for
    # this one: 2.7 MB less written a step in W3.)
    pack_rows(a_operand(net.packed_weights, net.packed_weights_layout, l, W_ROWS), weight,
              j0, j1, k0, k1)
    if l > 0:
        pack_row_pairs(b_operand(net.packed_weights, net.packed_weights_layout, l, W_PAIRS),
                       weight, j0, j1, j1, k0, k1)


@kernel
def amx_product(out, a, a0, b, b0, rows, columns, ksteps):
    # out is (>= rows, >= columns) float32; a is A, packed with at least
    # a0 + padded(rows) rows of 32 ksteps values; b is B, packed, 16 ksteps
    # rows of at least b0 + padded(columns) columns
    # out[:rows, :columns] = A[a0:a0 + rows] @ B[:, b0:b0 + columns]: strips
    # of 32 rows (16 for a last 16) by all whole blocks of 32 columns; the
    # last columns, and a last strip of other heights, go block by block
    # through a block on the stack
    scratch = pointer_array(stack_buffer(SCRATCH_VALUES, out), (BLOCK, BLOCK))
    whole = columns // BLOCK
    for i in range(0, rows, BLOCK):
        left = rows - i
        tiles = 1 if left <= TILE_ROWS else 2
        height = min(left, TILE_ROWS * tiles)
        first = 0  # the first column block through scratch
        if height == TILE_ROWS * tiles:
            first = whole
            if tiles == 1:
                amx_block(out, i, 0, a, a0 + i, b, b0, ksteps, whole, 1)
            else:
                amx_block(out, i, 0, a, a0 + i, b, b0, ksteps, whole, 2)
        for j in range(first * BLOCK, columns, BLOCK):
            if tiles == 1:
                amx_block(scratch, 0, 0, a, a0 + i, b, b0 + j, ksteps, 1, 1)
            else:
                amx_block(scratch, 0, 0, a, a0 + i, b, b0 + j, ksteps, 1, 2)
            width = min(BLOCK, columns - j)
            for r in range(height):
                row = out[i + r]
                for c in range(width):
                    row[j + c] = scratch[r, c]


@kernel
def amx_forward(out, outputs_t, work, net, l, r0, r1):
    # out is (B, OC), outputs_t this thread's scratch of at least
    # padded(OC) * BLOCK_COLUMNS values: out[r0:r1] = inp[r0:r1] @ weight.T
    # for layer l, its input packed (pack_input); the caller adds the bias
    # and activation. Computed as weight @ inp.T, BLOCK_COLUMNS rows of the
    # batch at a time into outputs_t, copied out transposed in tiles.
    C = net.sizes[l]
    OC = net.sizes[l + 1]
    weight = a_operand(net.packed_weights, net.packed_weights_layout, l, W_ROWS)
    inputs = b_operand(work.packed, work.packed_layout, l, XT_PAIRS)
    sums = outputs_t[:padded(OC) * BLOCK_COLUMNS].reshape((padded(OC), BLOCK_COLUMNS))
    tiled = OC // TILE_OUTPUTS * TILE_OUTPUTS
    # the outputs in whole strips of 32 and a last one of 16 where that
    # covers them (100 outputs: 112 computed, not 128; each output's sum is
    # the same in either)
    strips = -(-OC // TILE_ROWS) * TILE_ROWS
    for b0 in range(r0, r1, BLOCK_COLUMNS):
        nb = min(BLOCK_COLUMNS, r1 - b0)
        # (whole blocks of 32 of the batch's rows: those past r1 are read,
        # not copied out)
        amx_product(sums, weight, np.int64(0), inputs, b0, strips, padded(nb),
                    padded(C) // K_STEP)
        transpose_weight_block(out[b0:b0 + nb], sums[:, ::1], np.int64(0), tiled,
                               np.int64(0), nb)
        for j in range(tiled, OC):
            for b in range(nb):
                out[b0 + b, j] = sums[j, b]


@ordered_kernel
def amx_backward_input(dinp, inp, work, net, l, r0, r1):
    # dinp and inp are (B, C): dinp[r0:r1] = (dout @ weight) *
    # activation'(inp) for layer l > 0, rounded to bfloat16, its output
    # delta dout packed (pack_delta). In source order, as
    # kernels.dense_backward_input (see there)
    C = net.sizes[l]
    OC = net.sizes[l + 1]
    amx_product(dinp[r0:], a_operand(work.packed, work.packed_layout, l, D_ROWS), r0,
                b_operand(net.packed_weights, net.packed_weights_layout, l, W_PAIRS),
                np.int64(0), r1 - r0, C, padded(OC) // K_STEP)
    for b in range(r0, r1):
        g = dinp[b]
        a = inp[b]
        for k in range(C):
            g[k] *= activation_derivative(a[k], net.activation)
        round_row(g)


@kernel
def amx_backward_weight(dweight, work, l, j0, j1, nrows, k0, k1):
    # dweight is (j1 - j0, C): dweight[:, k0:k1] = dout[:nrows, j0:j1].T @
    # inp[:nrows, k0:k1] for layer l, both packed
    amx_product(dweight[:, k0:], a_operand(work.packed, work.packed_layout, l, D_COLS), j0,
                b_operand(work.packed, work.packed_layout, l, X_PAIRS), k0, j1 - j0, k1 - k0,
                padded(nrows) // K_STEP)


# ----------------------------------------------------------------------------
# the entry points of the step (forward_backward.py, gradients.py)
#
# A model that runs on AMX tiles has its operands packed in uint16 arrays
# (Work.packed, Network.packed_weights); any other has empty uint8 ones, a
# type of its own. Called with the latter, each entry point below is a call
# that does nothing, and Numba never types the tile kernels behind it: a
# float32 or float64 model compiles none of them, where the step's
# `AMX_COMPILED and amx_layer(...)` branches alone (which prune them only
# for CPUs without AMX) left an AMX host compiling them for every model
# (`fastmlp-train --compile-only` from an empty cache, float32: 22.8-23.2 s
# before, 16.6-16.8 s after, Intel Xeon, measured).

def packed_dtype(amx):
    """The dtype of a model's packed operands: uint16 on AMX tiles, else
    uint8 (its arrays then empty)."""
    return np.dtype(np.uint16) if amx else np.dtype(np.uint8)


def packs_for_tiles(arg_types):
    """Whether the Work or Network among a call's argument types holds
    operands packed for AMX tiles (uint16 arrays, not empty uint8 ones)."""
    for arg in arg_types:
        if isinstance(arg, types.BaseNamedTuple):
            for name in ("packed", "packed_weights"):
                if name in arg.fields:
                    return arg.types[arg.fields.index(name)].dtype == types.uint16
    raise TypeError("no Work or Network among the arguments")


def on_tiles(tile_kernel):
    """tile_kernel, called from compiled code, for buffers packed for AMX
    tiles; for other buffers a call that does nothing."""
    def entry(*args):
        raise TypeError(f"{tile_kernel.__name__} runs in compiled code only")

    @overload(entry)
    def typed(*args):
        if packs_for_tiles(args):
            return lambda *args: tile_kernel(*args)
        return lambda *args: None

    entry.__name__ = entry.__qualname__ = tile_kernel.__name__
    return entry


step_pack_input = on_tiles(pack_input)
step_pack_delta = on_tiles(pack_delta)
step_pack_weights = on_tiles(pack_weights)
step_amx_forward = on_tiles(amx_forward)
step_amx_backward_input = on_tiles(amx_backward_input)
step_amx_backward_weight = on_tiles(amx_backward_weight)
