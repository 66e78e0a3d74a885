"""The fused minibatch step, and the loop that runs many steps in compiled code.

A step is two phases:

1. `forward_backward`: the batch is cut into one contiguous part per
   thread, at multiples of 4 rows, sized by each thread's measured speed
   (balance.py). Each part gathers its rows from the dataset, runs every
   layer forward, the output head (heads.py: softmax and cross-entropy,
   say), and every delta backward. Rows are independent, so parts need no
   synchronisation between layers, and no row's result depends on the
   cut: the kernels group rows by 4 from multiples of 4. Each row writes
   its loss into its own slot, summed afterwards in row order. Few, large
   parts let a block of weights serve many rows while it is in cache (W3
   4% faster than with 16 parts of 8 rows, W2 6%, measured).
   On more than one thread, wide hidden layers (column layers: 256
   outputs or more), and a narrow first layer whose weights outweigh the
   batch's input rows (narrow_columns), are split by their outputs
   instead, each thread computing its outputs for every row (a share
   sized by its measured speed, as a part of rows is: balance.py), in a
   parallel region of their own; so is the delta of a wide layer's
   outputs, by the same cut, when the layer above is a column layer too
   (below a narrow one it is a small product, done by rows in the region
   before). A thread then reads only the weights that it updates itself
   (below), where a split by rows
   has each thread read every weight, half of them just written by the
   other core: on a 2-core Xeon, that traffic took W3's step from 1,337 to
   1,614 us, and the split by outputs took it back to 1,490 (both measured,
   docs/performance.md). Each output is computed by the same instructions
   either way, so no value depends on the cut.
2. `gradients_update`: weight gradients are sums over the batch, so they are
   split by *parameter* instead: each task owns a block of weight rows and
   columns (or one layer's bias), sums over all rows of the batch in row
   order into its thread's scratch block, and then applies the optimizer
   update from there while the block is hot in cache. One writer per
   parameter: no atomics, and the result is bit-identical for any thread
   count.
   The tasks of a column layer's weights go to the thread that computes
   their outputs; each thread runs a contiguous share of the other tasks,
   sized by its measured speed.
   A batch of more than 128 rows is summed in two halves, each
   parameter's gradient the sum over the first half plus the sum over the
   second (gradient_cut), whatever the thread count. Those halves are
   summed first, in a stage of their own (part_halves): on two
   threads of equal speed, each thread the half of the batch that it ran
   forward, for every weight row outside the column layers, so that no
   thread reads deltas and inputs another wrote (a faster thread also sums
   some of the other half's weights). The tasks then add the halves and
   update (the 784-100-10 Adam step at batch 200, float32 rows, 0.89 of
   the time; the regression benchmark's 0.90).

`train_steps` runs steps step0..step1 in one call, so an epoch costs one
Python call, and in one parallel region (`fused_steps`): each thread runs its
part of every phase of every step, and waits for the others at a spin
barrier (sync.py) where a phase needs the whole of the one before. A region
of its own for each phase cost 7-10 us to start and join on a 2-core Xeon, a
barrier 0.3 us (W1's step 0.91 of the time, the regression benchmark's 0.95).
Where Numba runs two parts on one thread, the region gives up before any
work and the steps run in regions of their own (`region`,
`gradients_region`), as MPI ranks always do. Nothing is allocated per step:
every array is a view of the workspace or of the parameter and
optimizer-state vectors.
"""
import functools

import numpy as np
from numba import prange

from .amx import COMPILED as AMX_COMPILED, padded
from .amx_layers import AMX_MIN_OUTPUTS, amx_layer
# (each a call that does nothing for a model off AMX tiles: see amx_layers.py)
from .amx_layers import step_amx_backward_input as amx_backward_input
from .amx_layers import step_amx_backward_weight as amx_backward_weight
from .amx_layers import step_amx_forward as amx_forward
from .amx_layers import step_pack_delta as pack_delta
from .amx_layers import step_pack_input as pack_input
from .amx_layers import step_pack_weights as pack_weights
from .balance import (COLUMN_LAYERS, FORWARD, GRADIENTS, HALF_SUMS, cycles, fold_timings, record,
                      share_point, share_rows)
from .collective import allreduce, wall_time
from .fpenv import flush_subnormals, write_fp_control
from .jit import driver_kernel, inline_kernel, kernel, parallel_kernel
from .sync import (ABORTED, START, START_TIMEOUT_CYCLES, SYNC_WORDS, all_started, arrive,
                   end_barrier)
from .heads import head_backward, head_forward
from .schedules import COSINE, KIND, step_lr
from .kernels import (
    BLOCK_COLUMNS,
    MAX_SUM_ROWS,
    NARROW_COLUMNS,
    IDENTITY,
    bias_activation,
    dense_backward_bias,
    dense_backward_input,
    dense_backward_weight,
    dense_forward,
    finite,
    gather_inputs,
    gather_rows,
    gather_targets,
    kept_transposed,
    prefetch_rows,
    round_columns,
    round_row,
    transpose_weight_block,
    transposed_outputs,
    wide_layer,
)
from .optimizers import (
    ADAM,
    ADAM_ALPHA,
    BETA1,
    BETA2,
    DECAY,
    EPSILON,
    LR,
    MOMENTUM,
    MOMENTUM_COEF,
    NONE,
    SGD,
    adam_alpha,
    adam_update,
    momentum_update,
    sgd_update,
)

# A task of gradients_update covers about this many parameters.
TASK_PARAMS = 2048
TASK_GROUPS = 4
# A wide layer's weight task covers 32 rows: 8 register blocks read each
# panel of the batch's inputs, which rows_times_matrix packs where its
# rows would fall into few L1 sets (W3's 512 inputs, 2 KB apart: 16-row
# tasks read them in place). 64 rows gave W3 no more on Zen 3, and half
# as many tasks to share between threads.
WIDE_TASK_ROWS = 32
# a first layer with fewer row groups than this gets its columns split in
# COLUMN_PIECES too
FEW_ROW_GROUPS = 32
COLUMN_PIECES = 2
WEIGHT_TASK = 0
BIAS_TASK = 1
NO_TASK = 2  # pads the task list (see make_tasks)


def make_tasks(layer_sizes):
    """(layer, kind, j0, j1, k0, k1) rows: blocks [j0, j1) x [k0, k1) of the
    (fan_out, fan_in) weight matrices, then one bias task per layer. Depends
    on the layer sizes only, never on the thread count. (A fresh, writable
    copy: a read-only array would be another type to the kernels.)"""
    return task_list(tuple(int(size) for size in layer_sizes)).copy()


@functools.lru_cache(maxsize=64)
def task_list(layer_sizes):
    # make_tasks's list, built once per process and shape (0.12 ms a fit
    # for a small network, twice a fit)
    tasks = []
    preferred = {}  # a column piece's task: the bins it goes to while they have room
    for layer in range(len(layer_sizes) - 1):
        fan_in, fan_out = layer_sizes[layer], layer_sizes[layer + 1]
        # whole groups of the 4 rows that dense_backward_weight computes
        # together; 16 rows (a cache line of the transposed block that the
        # task writes after its update) when the layer has one; WIDE_TASK_ROWS
        # in wide layers (kernels.wide_layer), which keep none
        if wide_layer(fan_out):
            group = WIDE_TASK_ROWS
        else:
            group = 16 if transposed_outputs(fan_out) > 0 else 4
        rows = -(-max(1, -(-TASK_PARAMS // fan_in)) // group) * group
        # A first layer of few row groups (W1's 50 rows: 13; not a wide one)
        # cannot be shared out evenly by rows, so its columns are split too,
        # at whole register blocks: every weight is then computed exactly as
        # without the split. Only the first: a piece's weights are segments
        # of every row, and a thread updating its segments streams into the
        # other thread's, whose cores then take the lines back and forth
        # (the hardware prefetcher runs past the end of a segment: on a
        # 2-core Xeon, Adam on two column halves of one 100 x 784 matrix
        # took 49 us a thread, on row halves 13.5). That pays where the
        # pieces save reading the other core's half of 784-value input rows,
        # not in a hidden layer of 128 (docs/performance.md).
        blocks = fan_in // BLOCK_COLUMNS
        pieces = (max(1, min(COLUMN_PIECES, blocks))
                  if layer == 0 and not wide_layer(fan_out)
                  and -(-fan_out // rows) < FEW_ROW_GROUPS else 1)
        cuts = [piece * blocks // pieces * BLOCK_COLUMNS for piece in range(pieces)] + [fan_in]
        if pieces > 1:
            # Then each piece's rows go in as few tasks as its bins take, cut
            # at whole groups: a task reads each block of the batch's inputs
            # for all its rows while the block is in L1 (W1 and the 784-100
            # Adam fit 1.06x, against tasks of 4 and 16 rows, measured).
            parts = TASK_GROUPS // pieces
            row_cuts = sorted({fan_out * i // parts // group * group for i in range(parts)}
                              | {fan_out})
        else:
            row_cuts = list(range(0, fan_out, rows)) + [fan_out]
        for j0, j1 in zip(row_cuts[:-1], row_cuts[1:]):
            for piece, (k0, k1) in enumerate(zip(cuts[:-1], cuts[1:])):
                tasks.append((layer, WEIGHT_TASK, j0, j1, k0, k1))
                # piece p of P keeps to bins p*G/P..(p+1)*G/P - 1 while they
                # have room: with 2 threads, each thread then reads only its
                # own columns of the batch's inputs, half of them written by
                # the other core in the forward pass, not all of them
                if pieces > 1:
                    preferred[tasks[-1]] = range(piece * TASK_GROUPS // pieces,
                                                 (piece + 1) * TASK_GROUPS // pieces)
    for layer in range(len(layer_sizes) - 1):
        tasks.append((layer, BIAS_TASK, 0, 0, 0, 0))
    # Which thread runs a task never changes its result. Each thread runs a
    # contiguous share of the list, by cost (share_first_task). Without
    # column pieces, the list is in the parameters' order (a layer's weight
    # rows, then its biases): a thread's share is then one stretch of the
    # parameter and optimizer vectors, which meets the next thread's only
    # at its ends (the 100-128-64-1 Adam step 1.035x faster than in the
    # bins below; with SGD, which writes one vector, no change).
    if not preferred:
        return np.array(sorted(tasks), dtype=np.int64).reshape(-1, 6)
    # With them, the tasks are dealt into TASK_GROUPS bins of equal count
    # and similar cost (largest first, each to the cheapest bin with room;
    # no-op tasks pad the bins), each piece to its own half of the list:
    # W1 and 784-100-10 ran slower in the parameters' order, one piece
    # after the other.
    per_bin = -(-len(tasks) // TASK_GROUPS)
    bins = [[] for _ in range(TASK_GROUPS)]
    loads = [0] * TASK_GROUPS
    for task in sorted(tasks, key=task_cost, reverse=True):
        open_bins = [g for g in range(TASK_GROUPS) if len(bins[g]) < per_bin]
        open_preferred = [g for g in open_bins if g in preferred.get(task, open_bins)]
        g = min(open_preferred or open_bins, key=lambda g: loads[g])
        bins[g].append(task)
        loads[g] += task_cost(task)
    for tasks_of_bin in bins:
        tasks_of_bin += [(0, NO_TASK, 0, 0, 0, 0)] * (per_bin - len(tasks_of_bin))
    return np.array([task for tasks_of_bin in bins for task in tasks_of_bin],
                    dtype=np.int64).reshape(-1, 6)


def task_cost(task):
    # rough: weights computed (a bias task sums a batch of deltas: small)
    layer, kind, j0, j1, k0, k1 = task
    return (j1 - j0) * (k1 - k0) if kind == WEIGHT_TASK else 0


def transposed_layout(layer_sizes):
    """Offsets of the transposed weight blocks (fan_in, kept_transposed)
    that dense_forward reads, each on a cache line, and their total size."""
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
        transpose_weight_block(view2d(weights_t, net.wt_off, l, C, OCT), weight, np.int64(0), OCT,
                               k0, k1)


@kernel
def view2d(flat, offsets, index, rows, cols):
    # flat[offsets[index]:...] seen as a (rows, cols) matrix
    start = offsets[index]
    return flat[start:start + rows * cols].reshape((rows, cols))


@kernel
def column_layer(net, l, threads, own):
    # whether layer l runs forward split between threads by its outputs
    # (a region of its own in forward_backward), not by batch rows: on more
    # than one thread, a wide hidden layer, or with own (own_inputs) a
    # narrow first one (narrow_columns). Each thread then reads only the
    # weights it updates itself (gradients_update gives it their tasks),
    # where a split by rows has every thread read every weight, half of them
    # just written by another core (W3's step 1.12x faster, measured: see
    # the module's docstring).
    L = net.sizes.shape[0] - 1
    if threads < 2 or l >= L - 1 or net.bf16:
        return False
    return wide_layer(net.sizes[l + 1]) or (l == 0 and own)


@kernel
def column_parts(work, threads):
    # the parts a column layer's outputs are cut into: one per thread, no
    # more than the scratch blocks (one per thread Numba may start)
    return max(1, min(threads, work.outputs_t.shape[0], work.task_grads.shape[0]))


# A narrow first layer is split by its outputs only when its weights are at
# least this many bytes: in a small network the region this adds costs more
# than the traffic between cores it saves (64-32-10, batch 32: 1.27x the
# time, measured).
NARROW_COLUMNS_MIN_BYTES = 64 * 1024


def narrow_columns(layer_sizes, batch_size, itemsize, input_bytes):
    """Whether a first hidden layer narrower than a wide one (fewer than
    256 outputs) is split between threads by its
    outputs (step.column_layer), each thread gathering every input row of
    the batch into its own copy: where its weights (as large as the rows
    split by rows would have each core read, half of them just written by
    the other) outweigh the batch's input rows (input_bytes a value) that
    each thread then gathers. On a 2-core Xeon: W2's step (784-50-10,
    batch 32, uint8 rows) 0.87 of the time, W1's (batch 100) 0.90; with
    float32 rows W2 0.84, and W1 1.02, which this rule leaves by rows
    (docs/performance.md). Not for a batch summed in two halves
    (gradient_cut): split by rows, each thread then sums the half it ran
    forward (part_halves), and 784-100-10 at batch 200 (uint8 rows,
    Adam) took 0.82 of the time it took as a column layer."""
    if len(layer_sizes) < 3:
        return False
    C, OC = int(layer_sizes[0]), int(layer_sizes[1])
    return (not wide_layer(OC) and OC >= 8 and batch_size <= MAX_SUM_ROWS
            and C * OC * itemsize >= NARROW_COLUMNS_MIN_BYTES
            and OC * itemsize > batch_size * input_bytes)


def own_inputs_shape(layer_sizes, batch_size, threads, itemsize, input_bytes):
    """The shape of Work.inputs: each thread's own copy of the batch's
    input rows where the first layer may be a column layer (a wide hidden
    layer, or a narrow one by narrow_columns, on 2 or more threads), else
    none."""
    C = int(layer_sizes[0])
    if threads >= 2 and len(layer_sizes) > 2 and (
            wide_layer(layer_sizes[1])
            or narrow_columns(layer_sizes, batch_size, itemsize, input_bytes)):
        return threads, batch_size, C
    return 0, 0, C


@kernel
def own_inputs(work, net, threads):
    # whether the first layer is a column layer whose region gathers the
    # batch's input rows itself, each thread all of them into its own copy
    # (Work.inputs, which the workspace holds only for a first layer that
    # may be a column layer: own_inputs_shape), read by its forward products
    # and its weight tasks. No thread then reads input rows another wrote,
    # nor writes lines another has read: with one copy gathered by rows,
    # W3's gather took 31 us a step, 7 us when its lines were its own
    # already (2 threads, Intel Xeon, measured). Computed once a region and
    # passed on as a flag: a call that takes the Work tuple counts the
    # references of all its arrays.
    return (work.inputs.shape[0] >= column_parts(work, threads)
            and column_layer(net, 0, threads, True))


@kernel
def column_cut(shares, OC, part, parts):
    # the first output of part `part` of a column layer's OC outputs (OC for
    # part == parts): at whole 16s within the transposed block (a wide
    # layer's last part also taking any outputs past it), or in a narrow
    # first layer without one (dot tiles only) at any output: W1's 50 in two
    # of 25, each 8 dot tiles of 3 and one of 1 on AVX2 (at whole tiles, 8
    # and 9). A wide layer's parts are sized by their measured speed
    # (shares: balance.py's COLUMN_LAYERS phase, timed over the column
    # regions; equal until timed): W3's step with a third of one core taken
    # by another process 0.81-0.88 of the time cut evenly. A narrow first
    # layer's stay even: its weight tasks, 2 row blocks, could not follow,
    # and its short regions time speed poorly (W2 with that load 1.08x
    # slower by speed, measured). (dense_forward: an output's value does not
    # depend on the cut.)
    if part >= parts:
        return OC
    wide = wide_layer(OC)
    point = share_point(shares, part, parts) if wide else part / parts
    OCT = transposed_outputs(OC)
    if OCT == 0:
        return int(point * OC + 0.5)
    units = (OCT if wide else OC) // NARROW_COLUMNS
    return min(OCT, int(point * units + 0.5) * NARROW_COLUMNS)


@kernel
def column_delta(net, l, threads, own):
    # whether D_l, the delta of layer l's inputs, is split between threads
    # by its columns, in a region of its own (each thread the columns of
    # the outputs it computes forward), rather than by rows: when layer l's
    # inputs are a column layer's outputs and layer l is a column layer too.
    # Below a narrow layer (W3's 10 outputs), that delta is a small product
    # and the region before computes it by rows: a region of its own took
    # 31 us of W3's step (2 threads, Intel Xeon, measured).
    return (l >= 1 and wide_layer(net.sizes[l]) and column_layer(net, l - 1, threads, own)
            and column_layer(net, l, threads, own))


@kernel
def row_split_below(net, l, threads, own):
    # the lowest layer l' <= l such that layers l..l' + 1 have their input
    # deltas split by rows (column_delta)
    while l >= 1 and not column_delta(net, l, threads, own):
        l -= 1
    return l


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


@kernel
def region_plan(work, net, threads, backward):
    # forward_backward's parallel regions in turn, a row each: runs of
    # layers split by rows, and column layers (column_layer) split by
    # outputs, forward and, below another column layer, for the delta of
    # their outputs (column_delta). Without column layers, the whole step
    # is one region.
    L = net.sizes.shape[0] - 1
    plan = np.zeros((3 * L + 1, 8), np.int64)
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
        row = plan[i]
        region(work, net, data, start, nrows, inv_total, backward,
               next_rows if row[NEXT_ROWS] else np.int64(0), threads, np.bool_(row[COLUMNS]),
               np.bool_(row[GATHER]), row[F0], row[F1], np.bool_(row[HEAD]), row[BACK_HI],
               row[BACK_LO])


compiled_run_regions = inline_kernel(run_regions)


@kernel
def region_parts(work, nrows, next_rows, threads, columns):
    # how many parts a region of forward_backward cuts (no more than
    # scratch blocks: one per thread Numba may start)
    if columns:
        return column_parts(work, threads)
    return max(1, min(threads, (max(nrows, next_rows) + 3) // 4, work.outputs_t.shape[0]))


@parallel_kernel
def region(work, net, data, start, nrows, inv_total, backward, next_rows, threads, columns,
           gather, f0, f1, head, back_hi, back_lo):
    # One parallel region of forward_backward, for batch rows 0:nrows: with
    # gather, the batch's rows gathered; layers f0..f1 - 1 forward; with
    # head, the head's outputs and, with backward, its delta; with
    # backward, the deltas of the inputs of layers back_hi down to
    # back_lo + 1. Each part runs region_part.
    parts = region_parts(work, nrows, next_rows, threads, columns)
    fold_timings(work.balance[COLUMN_LAYERS if columns else FORWARD], parts)
    for p in prange(parts):
        # (prange's index is unsigned: see jit.py)
        region_part(work, net, data, start, nrows, inv_total, backward, next_rows, threads,
                    columns, gather, f0, f1, head, back_hi, back_lo, np.int64(p), parts)


@driver_kernel
def region_part(work, net, data, start, nrows, inv_total, backward, next_rows, threads, columns,
                gather, f0, f1, head, back_hi, back_lo, part, parts):
    # Part `part` of `parts` of a region (region's arguments).
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
            n0, n1 = share_rows(shares, next_rows, part, parts)
            prefetch_rows(data.X, data.idx, start + nrows, n0, n1, data.x_bytes)
        r0, r1 = share_rows(shares, nrows, part, parts)
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
                          view2d(work.weights_t, net.wt_off, l, sizes[l],
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


@kernel
def gradient_cut(nrows):
    # where a batch of nrows rows is cut in two halves for the gradients:
    # each parameter's gradient is its sum over rows 0:h plus its sum over
    # rows h:nrows (the second added to the first), whichever thread sums
    # them; nrows (one sum) for a batch that rows_times_matrix sums in one
    # pass. Multiples of 4 rows: forward_backward's parts cut there, and
    # two threads of equal speed cut a batch at h.
    if nrows <= MAX_SUM_ROWS:
        return nrows
    return nrows // 8 * 4


@driver_kernel
def task_gradient(grads, g_first, spare, work, net, t, nrows, inputs):
    # the gradient of task t's parameters over batch rows 0:nrows, into
    # grads from g_first (rows_gradient's layout), summed over each half of
    # the batch (gradient_cut), the second half in spare from 0 (a block of
    # the same size) and added; inputs: the batch's input rows (B, C), as
    # the forward pass read them. A layer on AMX tiles sums all rows at once.
    tasks = net.tasks
    if tasks[t, 1] == NO_TASK:
        return
    l = tasks[t, 0]
    if AMX_COMPILED and tasks[t, 1] == WEIGHT_TASK and amx_layer(net, l):
        j0 = tasks[t, 2]
        j1 = tasks[t, 3]
        fan_in = net.sizes[l]
        block = grads[g_first:g_first + (j1 - j0) * fan_in].reshape((j1 - j0, fan_in))
        amx_backward_weight(block, work, l, j0, j1, nrows, tasks[t, 4], tasks[t, 5])
        return
    B = work.labels.shape[0]
    dout = view2d(work.deltas, work.act_off, l + 1, B, net.sizes[l + 1])
    inp = inputs if l == 0 else view2d(work.acts, work.act_off, l, B, net.sizes[l])
    h = gradient_cut(nrows)
    rows_gradient(grads, g_first, tasks[t], dout[:h], inp[:h])
    if h < nrows:
        rows_gradient(spare, np.int64(0), tasks[t], dout[h:nrows], inp[h:nrows])
        add_blocks(grads, g_first, grads, g_first, spare, np.int64(0), net, t, tasks[t, 4],
                   tasks[t, 5])


@inline_kernel
def rows_gradient(grads, g_first, task, dout, inp):
    # the sum over the rows of dout (R, fan_out) and inp (R, fan_in) of the
    # gradient of a task's parameters (task: its row of net.tasks), into
    # grads from g_first: its weight rows j0:j1 as a (j1 - j0, fan_in) block
    # (columns k0:k1 written), or its layer's biases
    R, fan_in = inp.shape
    if task[1] == WEIGHT_TASK:
        j0 = task[2]
        j1 = task[3]
        block = grads[g_first:g_first + (j1 - j0) * fan_in].reshape((j1 - j0, fan_in))
        dense_backward_weight(block, dout[:, j0:j1], inp, np.int64(0), j1 - j0, R, task[4],
                              task[5])
    else:
        dense_backward_bias(grads[g_first:g_first + dout.shape[1]], dout, R)


@kernel
def add_blocks(out, o_first, a, a_first, b, b_first, net, t, k0, k1):
    # out = a + b over task t's block, each from its first value in
    # rows_gradient's layout: its weight rows' columns k0:k1, or its biases
    # (out may be a)
    tasks = net.tasks
    l = tasks[t, 0]
    if tasks[t, 1] == WEIGHT_TASK:
        rows = tasks[t, 3] - tasks[t, 2]
        stride = net.sizes[l]
    else:
        rows = np.int64(1)
        stride = net.sizes[l + 1]
        k0 = np.int64(0)
        k1 = stride
    for i in range(rows):
        # (unsigned: no wraparound test in the loop, which then vectorizes)
        o = np.uint64(o_first + i * stride + k0)
        p = np.uint64(a_first + i * stride + k0)
        q = np.uint64(b_first + i * stride + k0)
        for k in range(np.uint64(k1 - k0)):
            out[o + k] = a[p + k] + b[q + k]


@kernel
def task_first(net, t):
    # where task t's parameters start in the flat vector: its first weight
    # row, or its layer's biases
    l = net.tasks[t, 0]
    if net.tasks[t, 1] == WEIGHT_TASK:
        return net.w_off[l] + net.tasks[t, 2] * net.sizes[l]
    return net.b_off[l]


def task_block_values(layer_sizes):
    """Values of the largest gradient block of a task (its weight rows
    times fan_in, or a layer's biases), rounded up to a multiple of 16 (a
    float32 cache line): the scratch each thread computes a task's gradient
    into (Work.task_grads)."""
    largest = 0
    for layer, kind, j0, j1, _, _ in make_tasks(layer_sizes):
        if kind == WEIGHT_TASK:
            largest = max(largest, (j1 - j0) * layer_sizes[layer])
        elif kind == BIAS_TASK:
            largest = max(largest, layer_sizes[layer + 1])
    return -(-largest // 16) * 16


@driver_kernel
def task_update(weights_t, net, opt, t, grads, g_first, whole_rows):
    # applies the optimizer to task t's parameters (its weight rows, or its
    # layer's biases) from their gradients in grads, laid out as
    # task_gradient writes them from g_first; with whole_rows, to every
    # column of its weight rows, not only its own; returns the update's
    # check sum (NaN when a new value is not finite)
    tasks = net.tasks
    sizes = net.sizes
    params = net.params
    hyper = opt.hyper
    l = tasks[t, 0]
    if tasks[t, 1] == NO_TASK:
        return 0.0
    first = task_first(net, t)
    if tasks[t, 1] == WEIGHT_TASK:
        rows = tasks[t, 3] - tasks[t, 2]
        k0 = np.int64(0) if whole_rows else tasks[t, 4]
        k1 = sizes[l] if whole_rows else tasks[t, 5]
        stride = sizes[l]
        decay = hyper[DECAY]  # weight decay applies to weights only
    else:
        rows = np.int64(1)
        k0 = np.int64(0)
        k1 = sizes[l + 1]
        stride = k1
        decay = hyper.dtype.type(0.0)
    check = 0.0
    if opt.code == SGD:
        check = sgd_update(params, grads, first, g_first, rows, stride, k0, k1, hyper[LR], decay)
    elif opt.code == MOMENTUM:
        check = momentum_update(params, grads, opt.state1, first, g_first, rows, stride, k0, k1,
                                hyper[LR], hyper[MOMENTUM_COEF], decay, opt.nesterov)
    elif opt.code == ADAM:
        check = adam_update(params, grads, opt.state1, opt.state2, first, g_first, rows, stride,
                            k0, k1, hyper[ADAM_ALPHA], hyper[BETA1], hyper[BETA2],
                            hyper[EPSILON], decay)
    if tasks[t, 1] == WEIGHT_TASK and opt.code != NONE:
        # the new weights, still in cache, rounded for bfloat16 and into
        # dense_forward's transposed block
        C = sizes[l]
        OC = sizes[l + 1]
        OCT = kept_transposed(OC)
        j0 = tasks[t, 2]
        if AMX_COMPILED and amx_layer(net, l):
            pack_weights(net, view2d(params, net.w_off, l, OC, C), l, j0, tasks[t, 3], k0, k1)
            return check
        if net.bf16:
            round_columns(view2d(net.operands, net.w_off, l, OC, C)[j0:tasks[t, 3]],
                          view2d(params, net.w_off, l, OC, C)[j0:tasks[t, 3]], k0, k1)
        if j0 < OCT:
            transpose_weight_block(view2d(weights_t, net.wt_off, l, C, OCT),
                                   view2d(net.operands, net.w_off, l, OC, C), j0,
                                   min(tasks[t, 3], OCT), k0, k1)
    return check


@kernel
def task_work(net, t, halves):
    # a task's estimated cost, in compiled code: the weights it computes (a
    # bias task sums a batch of deltas per bias: cheap; task_cost, which
    # deals the tasks into bins, counts it as nothing). With halves (the
    # update of gradients summed by halves: part_halves), a weight task
    # stands for every column of its rows (gradients_region), and the rows'
    # other column pieces for nothing.
    tasks = net.tasks
    if tasks[t, 1] == WEIGHT_TASK:
        if halves:
            return 0 if tasks[t, 4] > 0 else (tasks[t, 3] - tasks[t, 2]) * net.sizes[tasks[t, 0]]
        return (tasks[t, 3] - tasks[t, 2]) * (tasks[t, 5] - tasks[t, 4])
    if tasks[t, 1] == BIAS_TASK:
        return net.sizes[tasks[t, 0] + 1]
    return 0


@kernel
def task_owner(balance, net, t, parts, threads, own):
    # the part that runs task t whatever the tasks' shares: for the weights
    # of a column layer, the part that computes their outputs forward as
    # balance's column shares cut them now, by the task's middle row (W1's
    # tasks of rows 0:24 and 24:50 go to the parts of outputs 0:25 and
    # 25:50); -1 for every other task
    tasks = net.tasks
    l = tasks[t, 0]
    if tasks[t, 1] != WEIGHT_TASK or not column_layer(net, l, threads, own):
        return -1
    OC = net.sizes[l + 1]
    middle = (tasks[t, 2] + tasks[t, 3] - 1) // 2
    for part in range(parts):
        if middle < column_cut(balance[COLUMN_LAYERS], OC, part + 1, parts):
            return part
    return parts - 1


@kernel
def shared_work(balance, net, t, parts, threads, own, halves):
    # task_work of a task the parts share out by speed (0 for one that has
    # its owner)
    return (task_work(net, t, halves)
            if task_owner(balance, net, t, parts, threads, own) < 0 else 0)


@kernel
def total_work(balance, net, parts, threads, own, halves):
    # the estimated cost of the tasks shared out by speed
    total = 0
    for t in range(net.tasks.shape[0]):
        total += shared_work(balance, net, t, parts, threads, own, halves)
    return total


@kernel
def share_first_task(balance, net, total, part, parts, threads, own, halves):
    # the first task of part `part`'s share of the task list (the list's
    # length for part = parts): the first whose cost midpoint lies at or
    # past the part's point on the cumulative cost of the shared tasks (of
    # `total` in all)
    T = net.tasks.shape[0]
    if part >= parts:
        return T
    point = share_point(balance[GRADIENTS], part, parts) * total
    before = 0
    for t in range(T):
        cost = shared_work(balance, net, t, parts, threads, own, halves)
        if before + 0.5 * cost >= point:
            return t
        before += cost
    return T


# A batch cut in two has its halves summed apart, in a region of their own
# (part_halves), when the parameters fill at least this many bytes; in
# a smaller network the region costs more than it saves, and each task
# sums both halves itself (task_gradient).
HALVES_MIN_BYTES = 16 * 1024


@kernel
def sum_halves(nrows, params, second_half, amx):
    # whether part_halves sums the gradients by halves of the batch: a
    # batch cut in two, no AMX tiles (which sum all rows at once), and
    # parameters of HALVES_MIN_BYTES or more (all in the workspace's
    # second_half)
    P = params.shape[0]
    return (gradient_cut(nrows) < nrows and not amx and second_half.shape[0] >= P
            and P * params.itemsize >= HALVES_MIN_BYTES)


def gradients_update(work, net, opt, nrows, gradients, update, threads):
    # With gradients, computes the gradient of every parameter over batch
    # rows 0:nrows; then, with update, applies the optimizer to them. Both
    # at once (alone), each task's gradient goes into its thread's scratch
    # block (work.task_grads) and is applied from there while it is in
    # cache: for a batch summed at once, the gradient vector opt.grads is
    # neither written nor read, so W3's 2.7 MB of it stay out of a shared L3
    # that holds 8-12 MB here. Apart (MPI ranks sum their gradients in
    # between), they go through opt.grads. The halves of a batch cut in two
    # (gradient_cut) are summed first, into opt.grads and work.second_half
    # (part_halves), where sum_halves says so. work.task_checks[t] is NaN
    # when task t produced a non-finite parameter, else 0. Plain Python, for
    # callers in Python; train_steps inlines its twin,
    # compiled_gradients_update.
    own = own_inputs(work, net, threads)
    halves = gradients and sum_halves(nrows, net.params, work.second_half, net.amx)
    # TASKS, or HALVES then TASKS_AFTER_HALVES (one call site: each costs
    # seconds of train_steps' compile)
    stages = (HALVES, TASKS_AFTER_HALVES + 1) if halves else (TASKS, TASKS + 1)
    for stage in range(stages[0], stages[1]):
        gradients_region(work, net, opt, nrows, gradients, update, threads, own, stage)


compiled_gradients_update = inline_kernel(gradients_update)


@inline_kernel
def part_halves(work, net, opt, nrows, part, parts, threads, own):
    # Part `part`'s share of the gradient of every parameter over each half
    # of the batch, apart: the first half's into opt.grads, the second's
    # into work.second_half, each at its parameter's place (the HALVES
    # stage of gradients_region; the tasks then add them). A column layer's
    # weight rows go to the part that computes their outputs (both halves,
    # from its own inputs). The other layers' weights, the first half's and
    # then the second's, are cut into one contiguous stretch a part, sized
    # by speed (balance.py, HALF_SUMS; at 4 weight rows: shared_rows); the
    # part whose stretch ends a half takes every layer's biases of that
    # half. On two threads of equal speed each part then sums the half of
    # the batch whose rows it ran forward (they cut the batch where
    # gradient_cut does), where a task summed over every row reads half of
    # its deltas and inputs from the other core: the 784-100-10 Adam step
    # (batch 200, float32 rows) 0.88 of the time, measured. On unequal ones
    # the faster also sums some of the other half's weights.
    L = net.sizes.shape[0] - 1
    B = work.labels.shape[0]
    h = gradient_cut(nrows)
    shares = work.balance[HALF_SUMS]
    started = cycles()
    done = np.int64(0)  # weights times rows summed
    total = 0
    for l in range(L):
        if not column_layer(net, l, threads, own):
            total += net.sizes[l] * net.sizes[l + 1]
    for half in range(2):
        out = opt.grads if half == 0 else work.second_half
        r0 = np.int64(0) if half == 0 else h
        r1 = h if half == 0 else nrows
        lo, hi, biases = half_stretch(shares, total, part, parts, half)
        before = 0
        for l in range(L):
            C = net.sizes[l]
            OC = net.sizes[l + 1]
            inputs = view2d(work.acts, work.act_off, l, B, C)
            if column_layer(net, l, threads, own):
                j0 = column_cut(work.balance[COLUMN_LAYERS], OC, part, parts)
                j1 = column_cut(work.balance[COLUMN_LAYERS], OC, part + 1, parts)
                if l == 0 and own:
                    inputs = work.inputs[part]  # (its own copy: own_inputs)
            else:
                j0 = shared_rows(lo, before, C, OC)
                j1 = shared_rows(hi, before, C, OC)
                before += C * OC
            dout = view2d(work.deltas, work.act_off, l + 1, B, OC)[r0:r1]
            if j1 > j0:
                dense_backward_weight(view2d(out, net.w_off, l, OC, C)[j0:j1], dout[:, j0:j1],
                                      inputs[r0:r1], np.int64(0), j1 - j0, r1 - r0,
                                      np.int64(0), C)
                done += (j1 - j0) * C * (r1 - r0)
            if biases:
                dense_backward_bias(out[net.b_off[l]:net.b_off[l] + OC], dout, r1 - r0)
    record(shares, part, started, done)


@kernel
def half_stretch(shares, total, part, parts, half):
    # part_halves: part `part`'s points (lo, hi) on the `total` shared
    # weights of half `half`, where its stretch of both halves' in turn
    # (cut by speed: shares) meets that half (lo = hi: none), and whether it
    # takes the half's biases (its stretch ends the half)
    start = share_point(shares, part, parts)
    stop = share_point(shares, part + 1, parts)
    first = start * 2.0 * total - half * total
    last = stop * 2.0 * total - half * total
    end = 0.5 * (half + 1)  # where the half ends on the unit interval
    return (min(max(first, 0.0), float(total)), min(max(last, 0.0), float(total)),
            start < end <= stop)


@kernel
def shared_rows(point, before, C, OC):
    # the weight row of a layer of OC rows of C weights, whose first weight
    # lies `before` weights into the shared layers, at which a cut at
    # `point` falls: a multiple of 4 rows, or OC at or past the layer's end
    if point >= before + C * OC:
        return OC
    row = int((point - before) / C + 2.0) // 4 * 4
    return min(OC, max(0, row))


# the stages of gradients_region: the tasks, each summing its gradient
# itself; the halves of the batch summed apart (part_halves); the tasks
# after that, adding the halves
TASKS, HALVES, TASKS_AFTER_HALVES = range(3)


@parallel_kernel
def gradients_region(work, net, opt, nrows, gradients, update, threads, own, stage):
    # gradients_update's parallel region: one kernel for its stages, which
    # compiles once (a second parallel kernel for the halves made a cold
    # start 24.2 s, against 18.6: docs/performance.md). Each part runs
    # gradients_part.
    parts = gradient_parts(work, threads)
    fold_timings(work.balance[HALF_SUMS if stage == HALVES else GRADIENTS], parts)
    for p in prange(parts):
        gradients_part(work, net, opt, nrows, gradients, update, threads, own, stage,
                       np.int64(p), parts)


@kernel
def gradient_parts(work, threads):
    # how many parts gradients_region cuts (no more than scratch blocks:
    # one per thread Numba may start)
    return max(1, min(threads, work.task_grads.shape[0]))


@driver_kernel
def gradients_part(work, net, opt, nrows, gradients, update, threads, own, stage, part, parts):
    # Part `part` of `parts` of a stage of gradients_update (gradients_region).
    # In the task stages, each part runs the tasks it owns (the weights of
    # the column layers' outputs it computes forward: task_owner) and a
    # contiguous share of the others, sized by speed (balance.py: timed
    # over those alone). After the halves, a task's gradient is the sum of
    # its halves, and a weight task updates every column of its rows, the
    # rows' other column pieces nothing: two threads updating pieces of the
    # same rows slow each other down (Adam on two column halves of 100 x
    # 784 weights took 50 us a thread, on row halves 14, and one thread
    # alone 28: 2-core Xeon, measured).
    fp_control = flush_subnormals()
    if stage == HALVES:
        part_halves(work, net, opt, nrows, part, parts, threads, own)
        write_fp_control(fp_control)
        return
    halves = stage == TASKS_AFTER_HALVES
    B = work.labels.shape[0]
    shares = work.balance[GRADIENTS]
    total = total_work(work.balance, net, parts, threads, own, halves)
    fused = gradients and update
    T = net.tasks.shape[0]
    grads = work.task_grads[part, 0] if fused else opt.grads
    spare = work.task_grads[part, 1]
    # (its own copy, read only by the tasks it owns: own_inputs)
    inputs = (work.inputs[part] if own
              else view2d(work.acts, work.act_off, np.int64(0), B, net.sizes[0]))
    t0 = share_first_task(work.balance, net, total, part, parts, threads, own, halves)
    t1 = share_first_task(work.balance, net, total, part + 1, parts, threads, own, halves)
    done = np.int64(0)
    started = cycles()
    owned = np.int64(0)  # cycles of the owned tasks, not timed for the shares
    for t in range(T):
        owner = task_owner(work.balance, net, t, parts, threads, own)
        if owner == part or (owner < 0 and t0 <= t < t1):
            owned_from = cycles() if owner >= 0 else np.int64(0)
            check = 0.0
            # (with halves, a later column piece is its rows' first piece's)
            if net.tasks[t, 1] != NO_TASK and not (halves and net.tasks[t, 4] > 0):
                first = task_first(net, t)
                g_first = np.int64(0) if fused else first
                if halves:
                    add_blocks(grads, g_first, opt.grads, first, work.second_half, first, net, t,
                               np.int64(0), net.sizes[net.tasks[t, 0]])
                elif gradients:
                    task_gradient(grads, g_first, spare, work, net, t, nrows, inputs)
                if update:
                    check = task_update(work.weights_t, net, opt, t, grads, g_first, halves)
            work.task_checks[t] = check
            if owner >= 0:
                owned += cycles() - owned_from
            else:
                done += task_work(net, t, halves)
    write_fp_control(fp_control)
    record(shares, part, started + owned, done)


@kernel
def sum_row_stats(row_stats, nrows):
    # (weighted loss sum, score sum) of batch rows 0:nrows, in row order
    loss = 0.0
    score = 0.0
    for b in range(nrows):
        loss += row_stats[b, 0]
        score += row_stats[b, 1]
    return loss, score


@kernel
def batch_weight(sample_weight, idx, start, nrows):
    # total sample weight of rows idx[start:start + nrows], in float64
    total = 0.0
    for b in range(start, start + nrows):
        total += sample_weight[idx[b]]
    return total


@kernel
def shard(nrows, rank, ranks):
    # rows [lo, hi) of a batch of nrows that MPI rank `rank` of `ranks` trains
    return nrows * rank // ranks, nrows * (rank + 1) // ranks


# Behind the P gradients, the buffer an MPI step sums carries TAIL values:
# its shard's loss and score sums, and whether its rank was interrupted.
TAIL = 3
LOSS_SLOT, SCORE_SLOT, INTERRUPT_SLOT = range(TAIL)
# Batches.tally: Ctrl-C heard on this rank (set before each call), seconds
# spent in MPI_Allreduce (other ranks' waits included), its error code
TALLY = 3
INTERRUPT_ASKED, REDUCE_SECONDS, REDUCE_ERROR = range(TALLY)


@kernel
def sum_over_ranks(grads, batches, loss, score):
    # Sums grads (P gradients and the TAIL slots, filled here with this
    # shard's loss and score) over the MPI ranks, in place; returns False if
    # MPI_Allreduce failed (its code in batches.tally).
    P = grads.shape[0] - TAIL
    tally = batches.tally
    grads[P + LOSS_SLOT] = loss
    grads[P + SCORE_SLOT] = score
    grads[P + INTERRUPT_SLOT] = tally[INTERRUPT_ASKED]
    started = wall_time(batches.wtime)
    error = allreduce(batches.allreduce, grads, batches.reduced, batches.datatype, batches.op,
                      batches.comm)
    tally[REDUCE_SECONDS] += wall_time(batches.wtime) - started
    if error != 0:
        tally[REDUCE_ERROR] = error
        return False
    reduced = batches.reduced
    for i in range(grads.shape[0]):  # (a loop: `grads[:] =` compiles for seconds)
        grads[i] = reduced[i]
    return True


# train_steps' status
STEPS_DONE = 0
LOSS_NOT_FINITE = 1  # at the returned step, before its update: nothing applied
PARAMS_NOT_FINITE = 2  # the returned step's update made a parameter NaN or inf
INTERRUPTED = 3  # a rank was interrupted: every rank stops at the returned step
REDUCE_FAILED = 4  # MPI_Allreduce failed at the returned step (nothing applied)


@driver_kernel
def train_steps(work, net, opt, data, batches, step0, step1, update_count, threads):
    # Runs steps step0..step1 of an epoch whose rows, in order, are data.idx;
    # step s covers the batch idx[s*B : (s+1)*B] (B = batches.size; the last
    # one may be short). update_count is the number of updates done before
    # (Adam's t). Returns (sum of the weighted per-row losses, total sample
    # weight, sum of the row scores, status, the step the status is about:
    # step1 when all went well). Divergence costs one finiteness test of the
    # loss and of the update's check sum per step.
    # With MPI ranks (batches.allreduce set), this rank runs its shard of
    # each batch, gradients scaled by the whole batch's weight, then the
    # ranks sum their gradients, losses and scores (sum_over_ranks) and each
    # applies the same update: single-process training up to the order of
    # the sums, each phase a parallel region of its own. Alone, the
    # gradients are summed and applied in one pass, and every step runs in
    # one parallel region (fused_steps), unless it gives up: then in regions
    # of their own, as with MPI.
    B = batches.size
    n_rows = data.idx.shape[0]
    sharded = batches.allreduce != 0
    P = net.params.shape[0]
    loss_sum = 0.0
    weight_sum = 0.0
    score_sum = 0.0
    # params may have changed since the last call (a new fit, a rollback)
    transpose_weights(work.weights_t, net)
    plan = region_plan(work, net, threads, np.bool_(True))
    if not sharded and step1 > step0:
        sync = np.zeros(SYNC_WORDS, np.int64)
        results = np.zeros(RESULT_WORDS)
        results[AT] = step1
        fused_steps(work, net, opt, data, batches, step0, step1, update_count, threads, plan,
                    sync, results)
        if sync[START] != ABORTED:
            return (results[LOSS_SUM], results[WEIGHT_SUM], results[SCORE_SUM],
                    np.int64(results[STATUS]), np.int64(results[AT]))
        # (the region gave up before any work: the steps in regions of their own)
    for s in range(step0, step1):
        start = s * B
        nrows = min(B, n_rows - start)
        lo, hi = shard(nrows, batches.rank, batches.ranks)
        total = batch_weight(data.sample_weight, data.idx, start, nrows)
        # a batch of zero weight has zero gradients (and zero loss)
        inv_total = net.params.dtype.type(1.0 / total if total > 0 else 0.0)
        # the next step's rows, when this call runs it (a shard's own rows
        # of it are not worth working out)
        next_rows = min(B, n_rows - start - nrows) if s + 1 < step1 and not sharded else 0
        compiled_run_regions(work, net, data, start + lo, hi - lo, inv_total, np.bool_(True),
                             next_rows, threads, plan)
        step_loss, step_score = sum_row_stats(work.row_stats, hi - lo)
        if sharded:
            compiled_gradients_update(work, net, opt, hi - lo, np.bool_(True), np.bool_(False),
                                      threads)
            if not sum_over_ranks(opt.grads, batches, step_loss, step_score):
                return loss_sum, weight_sum, score_sum, REDUCE_FAILED, s
            step_loss = float(opt.grads[P + LOSS_SLOT])
            step_score = float(opt.grads[P + SCORE_SLOT])
        score_sum += step_score
        if not finite(step_loss):
            return loss_sum, weight_sum, score_sum, LOSS_NOT_FINITE, s
        loss_sum += step_loss
        weight_sum += total
        update_count += 1
        set_step_size(opt, update_count)
        # alone: gradients and update in one pass; with MPI: the update of
        # the summed gradients
        compiled_gradients_update(work, net, opt, nrows, np.bool_(not sharded), np.bool_(True),
                                  threads)
        if not finite(work.task_checks.sum()):
            return loss_sum, weight_sum, score_sum, PARAMS_NOT_FINITE, s
        if sharded and opt.grads[P + INTERRUPT_SLOT] > 0:
            return loss_sum, weight_sum, score_sum, INTERRUPTED, s + 1
    return loss_sum, weight_sum, score_sum, STEPS_DONE, step1


# fused_steps' results: train_steps' sums, status and step
LOSS_SUM, WEIGHT_SUM, SCORE_SUM, STATUS, AT = range(5)
RESULT_WORDS = 5


@parallel_kernel
def fused_steps(work, net, opt, data, batches, step0, step1, update_count, threads, plan, sync,
                results):
    # train_steps' steps step0..step1 for a single process, in one parallel
    # region: each part runs steps_part, with a barrier (sync.py) where
    # train_steps would end one region and start the next. results: see
    # train_steps; sync: barrier state, all zero, whose START word reads
    # ABORTED on return if the region gave up before doing anything.
    parts = gradient_parts(work, threads)
    for p in prange(parts):
        steps_part(work, net, opt, data, batches, step0, step1, update_count, threads, plan,
                   sync, results, np.int64(p), parts)


@driver_kernel
def steps_part(work, net, opt, data, batches, step0, step1, update_count, threads, plan, sync,
               results, part, parts):
    # Part `part` of fused_steps' region: in each step, its part of each
    # region of the plan (region_part; its part of none where a region
    # cuts fewer parts) and of each stage of gradients_update
    # (gradients_part). At each barrier, the last part to come folds the
    # parts' timings (balance.py: before the next phase cuts its shares by
    # them) and does train_steps' serial work: the step's loss and score
    # after the head, its learning rate, and after the update the check of
    # the new parameters. Every part reads the status after the barrier, so
    # all stop at the same step.
    if not all_started(sync, parts, START_TIMEOUT_CYCLES):
        return
    B = batches.size
    n_rows = data.idx.shape[0]
    own = own_inputs(work, net, threads)
    true = np.bool_(True)  # (backward; gradients and update)
    for s in range(step0, step1):
        first = s * B
        nrows = min(B, n_rows - first)
        total = batch_weight(data.sample_weight, data.idx, first, nrows)
        inv_total = net.params.dtype.type(1.0 / total if total > 0 else 0.0)
        next_rows = min(B, n_rows - first - nrows) if s + 1 < step1 else 0
        for i in range(plan.shape[0]):
            row = plan[i]
            rows_next = next_rows if row[NEXT_ROWS] else np.int64(0)
            columns = np.bool_(row[COLUMNS])
            region_cut = region_parts(work, nrows, rows_next, threads, columns)
            if part < region_cut:
                region_part(work, net, data, first, nrows, inv_total, true, rows_next, threads,
                            columns, np.bool_(row[GATHER]), row[F0], row[F1],
                            np.bool_(row[HEAD]), row[BACK_HI], row[BACK_LO], part, region_cut)
            last, generation = arrive(sync, parts)
            if last:
                fold_all_timings(work.balance, parts)
                if i == plan.shape[0] - 1:
                    step_loss, step_score = sum_row_stats(work.row_stats, nrows)
                    results[SCORE_SUM] += step_score
                    if finite(step_loss):
                        results[LOSS_SUM] += step_loss
                        results[WEIGHT_SUM] += total
                        set_step_size(opt, update_count + 1)
                    else:
                        results[STATUS] = LOSS_NOT_FINITE
                        results[AT] = s
            end_barrier(sync, last, generation)
        if results[STATUS] != STEPS_DONE:
            return
        update_count += 1
        halves = sum_halves(nrows, net.params, work.second_half, net.amx)
        stages = (HALVES, TASKS_AFTER_HALVES + 1) if halves else (TASKS, TASKS + 1)
        for stage in range(stages[0], stages[1]):
            gradients_part(work, net, opt, nrows, true, true, threads, own, stage, part, parts)
            last, generation = arrive(sync, parts)
            if last:
                fold_all_timings(work.balance, parts)
                if stage == stages[1] - 1 and not finite(work.task_checks.sum()):
                    results[STATUS] = PARAMS_NOT_FINITE
                    results[AT] = s
            end_barrier(sync, last, generation)
        if results[STATUS] != STEPS_DONE:
            return


@kernel
def set_step_size(opt, update):
    # the learning rate of update number `update` (1 for the first) where
    # it changes by the step (a cosine schedule), and Adam's step size
    hyper = opt.hyper
    if opt.schedule[KIND] == COSINE:
        hyper[LR] = step_lr(opt.schedule, update)
    if opt.code == ADAM:
        hyper[ADAM_ALPHA] = adam_alpha(float(hyper[LR]), update, opt.betas[0], opt.betas[1])


@kernel
def fold_all_timings(balance, parts):
    # every phase's last timings into its parts' speeds (balance.py)
    for phase in range(balance.shape[0]):
        fold_timings(balance[phase], parts)
