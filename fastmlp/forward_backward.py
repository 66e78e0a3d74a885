"""Phase 1 of a step (step.py): the batch forward through every layer,
the output head, and every delta backward, in parallel regions.

The batch is cut into one contiguous part per thread, at multiples of 4
rows, sized by each thread's measured speed (balance.py). Each part
gathers its rows from the dataset, runs every layer forward, the output
head (heads.py: softmax and cross-entropy, say), and every delta backward.
Rows are independent, so parts need no synchronisation between layers,
and no row's result depends on the cut: the kernels group rows by 4 from
multiples of 4. Each row writes its loss into its own slot, summed
afterwards in row order. Few, large parts let a block of weights serve
many rows while it is in cache (W3 4% faster than with 16 parts of 8 rows,
W2 6%, measured).

On more than one thread, column layers (column_layers.py: wide hidden
layers, and a narrow first layer whose weights outweigh the batch's input
rows) are split by their outputs instead, each thread computing its
outputs for every row, in a parallel region of their own; so is the delta
of a wide layer's outputs, by the same cut, when the layer above is a
column layer too. region_plan lists the regions in turn; without column
layers, the whole phase is one region.

A layer narrower than a wide one computes its leading whole blocks of
outputs from a transposed copy of those weights (transpose_weights, laid
out by transposed_layout), which each gradient task rewrites for its rows
as it updates them (gradients.py); a wide layer computes them transposed
(kernels.wide_forward) and keeps no copy.
"""
import numpy as np
from numba import prange

from .amx import BLOCK, COMPILED as AMX_COMPILED, padded
from .amx_layers import AMX_MIN_OUTPUTS, amx_layer
# (each a call that does nothing for a model off AMX tiles: see amx_layers.py)
from .amx_layers import step_amx_backward_input as amx_backward_input
from .amx_layers import step_amx_forward as amx_forward
from .amx_layers import step_pack_delta as pack_delta
from .amx_layers import step_pack_input as pack_input
from .amx_layers import step_pack_weights as pack_weights
from .balance import COLUMN_LAYERS, FORWARD, cycles, fold_timings, record, share_rows
from .buffers import view2d
from .column_layers import (column_cut, column_delta, column_layer, column_parts, own_inputs,
                            row_split_below)
from .fpenv import flush_subnormals, write_fp_control
from .heads import head_backward, head_forward
from .jit import allocating_kernel, driver_kernel, inline_kernel, kernel, parallel_kernel
from .kernels import (BLOCK_COLUMNS, IDENTITY, bias_activation, dense_backward_input,
                      dense_forward, gather_inputs, gather_rows, gather_targets, kept_transposed,
                      prefetch_rows, round_columns, round_row, transpose_to_panels,
                      weight_panels, wide_layer)


def transposed_layout(layer_sizes):
    """Offsets of the transposed weight blocks (fan_in, kept_transposed)
    that dense_forward reads (in panels: kernels.weight_panels), each
    on a cache line, and their total size."""
    offsets, offset = [], 0
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        offsets.append(offset)
        offset += -(-fan_in * kept_transposed(fan_out) // 16) * 16
    return np.array(offsets, np.int64), offset


def wide_scratch_values(layer_sizes):
    """Values of the scratch in which a thread's wide_forward (or
    amx_forward, all outputs padded to 32) sums a block of its rows'
    outputs (Work.outputs_t): 0 without a wide layer."""
    return max([padded(fan_out) * BLOCK_COLUMNS for fan_out in layer_sizes[1:]
                if wide_layer(fan_out) or fan_out >= AMX_MIN_OUTPUTS], default=0)


# pieces of fan_in rows per layer in transpose_weights
TRANSPOSE_PIECES = 8


@parallel_kernel
def transpose_weights(weights_t, net):
    # every layer's transposed block from its weights (and, for bfloat16,
    # the rounded weights first; for layers on AMX tiles, their packed
    # operands instead): needed after params change anywhere but in
    # task_update, which keeps them all current
    L = net.sizes.shape[0] - 1
    for p in prange(L * TRANSPOSE_PIECES):
        l = p // TRANSPOSE_PIECES
        piece = p % TRANSPOSE_PIECES
        C = net.sizes[l]
        OC = net.sizes[l + 1]
        OCT = kept_transposed(OC)
        k0 = piece * C // TRANSPOSE_PIECES
        k1 = (piece + 1) * C // TRANSPOSE_PIECES
        weight = view2d(net.operands, net.w_off, l, OC, C)
        if AMX_COMPILED and amx_layer(net, l):
            pack_weights(net, view2d(net.params, net.w_off, l, OC, C), l, np.int64(0), OC,
                         k0, k1)
            continue
        if net.bf16:
            round_columns(weight, view2d(net.params, net.w_off, l, OC, C), k0, k1)
        transpose_to_panels(weight_panels(weights_t, net.wt_off[l], C, OCT), weight,
                            np.int64(0), OCT, k0, k1)


def forward_backward(work, net, data, start, nrows, inv_total, backward, next_rows, threads):
    # work, net, data: see buffers.py. Rows 0:nrows of the batch are dataset
    # rows data.idx[start:start + nrows]; inv_total is 1 / their total sample
    # weight. Runs every layer forward, the head (its outputs, and each row's
    # loss and score into work.row_stats, summed by the caller over rows
    # 0:nrows), and with backward every delta (D_l, the loss gradient of
    # layer l's pre-activation, at work.act_off[l] in work.deltas).
    # threads is the number of parts to cut (numba.get_num_threads() in the
    # caller: called in a kernel, it would keep the kernel out of Numba's
    # cache). One parallel region for each row of region_plan. Plain
    # Python, for callers in Python; train_steps runs the plan itself.
    run_regions(work, net, data, start, nrows, inv_total, backward, next_rows, threads,
                region_plan(work, net, threads, backward))


# the columns of a region_plan row: region's arguments of the same names;
# with NEXT_ROWS, the region is told the next batch's rows
COLUMNS, GATHER, F0, F1, HEAD, BACK_HI, BACK_LO, NEXT_ROWS = range(8)
PLAN_WIDTH = 8


@allocating_kernel
def region_plan(work, net, threads, backward):
    # forward_backward's parallel regions in turn, a row each: runs of
    # layers split by rows, and column layers (column_layer) split by
    # outputs, forward and, below another column layer, for the delta of
    # their outputs (column_delta). Without column layers, the whole step
    # is one region.
    L = net.sizes.shape[0] - 1
    plan = np.zeros((3 * L + 1, PLAN_WIDTH), np.int64)
    n = 0
    f0 = 0  # the first layer not run forward yet
    gathered = False
    first_own = own_inputs(work, net, threads)
    for l in range(L):
        if column_layer(net, l, threads, first_own):
            own = l == 0 and first_own
            if not own and (f0 < l or not gathered):
                plan_row(plan[n], False, not gathered, f0, l, False, 0, 0, True)
                n += 1
            plan_row(plan[n], True, own, l, l + 1, False, 0, 0, own)
            n += 1
            gathered = True
            f0 = l + 1
    # the other layers forward, the head, and from the last layer down the
    # deltas of the layers' inputs, in regions of each kind
    hi = L - 1
    lo = row_split_below(net, hi, threads, first_own)
    plan_row(plan[n], False, not gathered, f0, L, True, hi, lo, True)
    n += 1
    while backward and lo >= 1:
        hi = lo
        columns = column_delta(net, hi, threads, first_own)
        lo = hi - 1 if columns else row_split_below(net, hi, threads, first_own)
        plan_row(plan[n], columns, False, L, L, False, hi, lo, False)
        n += 1
    return plan[:n]


@kernel
def plan_row(row, columns, gather, f0, f1, head, back_hi, back_lo, next_rows):
    row[COLUMNS] = columns
    row[GATHER] = gather
    row[F0] = f0
    row[F1] = f1
    row[HEAD] = head
    row[BACK_HI] = back_hi
    row[BACK_LO] = back_lo
    row[NEXT_ROWS] = next_rows


def run_regions(work, net, data, start, nrows, inv_total, backward, next_rows, threads, plan):
    # forward_backward's regions, as planned (region_plan). Plain Python;
    # train_steps inlines its twin, compiled_run_regions.
    for i in range(plan.shape[0]):
        region(work, net, data, start, nrows, inv_total, backward, next_rows, threads, plan[i])


compiled_run_regions = inline_kernel(run_regions)


@kernel
def region_parts(work, row, nrows, next_rows, threads):
    # how many parts the region of plan row `row` cuts (no more than
    # scratch blocks: one per thread Numba may start)
    if row[COLUMNS]:
        return column_parts(work, threads)
    rows = max(nrows, planned_next_rows(row, next_rows))
    return max(1, min(threads, (rows + 3) // 4, work.outputs_t.shape[0]))


@kernel
def planned_next_rows(row, next_rows):
    # the next batch's rows that the region of plan row `row` prefetches
    return next_rows if row[NEXT_ROWS] else np.int64(0)


@kernel
def packed_block_rows(net):
    # the rows that the cuts between parts snap to (balance.cut_row): with
    # packed bfloat16 products (amx_layers.py) their blocks of 32, so that
    # a cut some rows past one does not leave a part a block mostly empty
    # (W3's bfloat16 step on Zen 4: 1.18-1.27 ms with rows cut 64 + 64,
    # 1.42-1.59 ms with the cuts at 60 or 68 that speeds a few percent
    # apart chose); else none
    return BLOCK if AMX_COMPILED and net.amx else 0


@parallel_kernel
def region(work, net, data, start, nrows, inv_total, backward, next_rows, threads, row):
    # One parallel region of forward_backward, for batch rows 0:nrows, as
    # row (a row of region_plan) says: with GATHER, the batch's rows
    # gathered (and with NEXT_ROWS, the next batch's next_rows rows
    # prefetched); layers F0..F1 - 1 forward; with HEAD, the head's outputs
    # and, with backward, its delta; with backward, the deltas of the inputs
    # of layers BACK_HI down to BACK_LO + 1; with COLUMNS, split between
    # threads by outputs. Each part runs region_part.
    parts = region_parts(work, row, nrows, next_rows, threads)
    fold_timings(work.balance[COLUMN_LAYERS if row[COLUMNS] else FORWARD], parts)
    for p in prange(parts):
        # (prange's index is unsigned: see jit.py)
        region_part(work, net, data, start, nrows, inv_total, backward, next_rows, threads, row,
                    np.int64(p), parts)


@driver_kernel
def region_part(work, net, data, start, nrows, inv_total, backward, next_rows, threads, row,
                part, parts):
    # Part `part` of `parts` of a region (region's arguments; `columns`,
    # `gather` and so on below are the row's COLUMNS, GATHER, ...).
    # Without columns, the rows are cut into one contiguous part per
    # thread, sized by speed (balance.py), and each part gathering its rows
    # also prefetches its share of the next_rows rows at idx[start + nrows:]
    # where they are few enough float rows (kernels.early_prefetch; the
    # gather asks for the others as it copies them). The same part runs on
    # the same thread next time, under prange's static schedule, which
    # balance.py relies on too. With columns (a column layer forward, or
    # the delta of its outputs), each part takes its outputs (column_cut;
    # timed in multiply-adds for balance.py's COLUMN_LAYERS phase) for every
    # row; with gather too (a first column layer: own_inputs),
    # each part gathers every row into its own copy of the inputs, and
    # prefetches every next row on the same terms.
    columns = row[COLUMNS] != 0
    gather = row[GATHER] != 0
    f0, f1 = row[F0], row[F1]
    head = row[HEAD] != 0
    back_hi, back_lo = row[BACK_HI], row[BACK_LO]
    next_rows = planned_next_rows(row, next_rows)
    sizes = net.sizes
    acts = work.acts
    act_off = work.act_off
    B = work.labels.shape[0]
    L = sizes.shape[0] - 1
    shares = work.balance[FORWARD]
    column_shares = work.balance[COLUMN_LAYERS]
    started = cycles()
    # which outputs of each layer this part computes: cut j of cuts
    cut, cuts = (part, parts) if columns else (np.int64(0), np.int64(1))
    products = np.int64(0)  # the multiply-adds of a column region's part
    if columns:
        r0, r1 = np.int64(0), nrows
        if gather:
            prefetch_rows(data.X, data.idx, start + nrows, np.int64(0), next_rows,
                          data.x_bytes)
    else:
        if gather:
            n0, n1 = share_rows(shares, next_rows, part, parts, np.int64(0))
            prefetch_rows(data.X, data.idx, start + nrows, n0, n1, data.x_bytes)
        r0, r1 = share_rows(shares, nrows, part, parts, packed_block_rows(net))
        if r0 == r1:  # fewer tiles than parts
            return
    fp_control = flush_subnormals()
    outputs_t = work.outputs_t[part]
    inp = view2d(acts, act_off, f0, B, sizes[f0])
    if gather and columns:
        inp = work.inputs[part]
        gather_inputs(inp, data, start, net.bf16, r0, r1)
        if part == 0:
            gather_targets(work.labels, work.targets, work.row_weights, data, start, r0, r1)
    elif gather:
        gather_rows(view2d(acts, act_off, np.int64(0), B, sizes[0]), work.labels,
                    work.targets, work.row_weights, data, start, net.bf16, r0, r1)
    for l in range(f0, f1):
        hidden = l < L - 1  # the logits stay float32 (bfloat16.py)
        OC = sizes[l + 1]
        out = view2d(acts, act_off, l + 1, B, OC)
        bias = net.params[net.b_off[l]:net.b_off[l] + OC]
        activation = net.activation if hidden else IDENTITY
        if AMX_COMPILED and amx_layer(net, l):
            # (its input packed as it was written)
            if l == 0:
                pack_input(work, inp, l, r0, r1, nrows, backward)
            amx_forward(out, outputs_t, work, net, l, r0, r1)
            bias_activation(out, bias, activation, hidden, r0, r1, np.int64(0), OC)
        else:
            j0 = column_cut(column_shares, OC, cut, cuts)
            j1 = column_cut(column_shares, OC, cut + 1, cuts)
            dense_forward(out, inp, view2d(net.operands, net.w_off, l, OC, sizes[l]),
                          weight_panels(work.weights_t, net.wt_off[l], sizes[l],
                                        kept_transposed(OC)),
                          outputs_t, bias, activation, net.bf16 and hidden, r0, r1, j0, j1)
            products += (j1 - j0) * sizes[l] * (r1 - r0)
        if AMX_COMPILED and hidden and amx_layer(net, l + 1):
            pack_input(work, out, l + 1, r0, r1, nrows, backward)
        inp = out
    if head:
        out = view2d(acts, act_off, L, B, sizes[L])
        head_forward(out, work.row_stats, work.labels, work.targets, work.row_weights,
                     work.target_scale, net.head, r0, r1)
        if backward:
            dout = view2d(work.deltas, act_off, L, B, sizes[L])
            head_backward(dout, out, work.labels, work.targets, work.row_weights, inv_total,
                          net.head, r0, r1)
            if net.bf16:
                for b in range(r0, r1):
                    round_row(dout[b])
            if AMX_COMPILED and amx_layer(net, L - 1):
                pack_delta(work, dout, L - 1, r0, r1, nrows)
    if backward:
        for l in range(back_hi, back_lo, -1):
            C = sizes[l]
            dinp = view2d(work.deltas, act_off, l, B, C)
            if AMX_COMPILED and amx_layer(net, l):
                amx_backward_input(dinp, view2d(acts, act_off, l, B, C), work, net, l, r0,
                                   r1)
            else:
                k0 = column_cut(column_shares, C, cut, cuts)
                k1 = column_cut(column_shares, C, cut + 1, cuts)
                dense_backward_input(dinp, view2d(work.deltas, act_off, l + 1, B, sizes[l + 1]),
                                     view2d(net.operands, net.w_off, l, sizes[l + 1], C),
                                     view2d(acts, act_off, l, B, C), net.activation,
                                     net.bf16, r0, r1, k0, k1)
                products += (k1 - k0) * sizes[l + 1] * (r1 - r0)
            if AMX_COMPILED and amx_layer(net, l - 1):
                pack_delta(work, dinp, l - 1, r0, r1, nrows)
    write_fp_control(fp_control)
    if columns:
        record(column_shares, part, started, products)
    else:
        record(shares, part, started, r1 - r0)
