"""The gradient tasks: gradients_update's work list (make_tasks), what
each task costs, and which part of a parallel region runs it.

A task is a block of one layer's weight rows and columns, or one layer's
biases. The list depends on the layer sizes and on whether a batch's
gradients are summed at once (make_tasks' whole_rows: each workspace has
its own list, Work.tasks), never on the thread count, and which thread runs
a task never changes its result: the weights of a column layer go to the
part that computes their outputs forward (task_owner), and the parts share
the other tasks out by their measured speed (share_first_task).
"""
import functools

import numpy as np

from .balance import COLUMN_LAYERS, GRADIENTS, share_point
from .column_layers import column_cut, column_layer
from .jit import kernel
from .kernels import BLOCK_COLUMNS, MAX_SUM_ROWS, transposed_outputs, wide_layer


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
# ... unless its batches are summed at once and it has at least this many
# outputs: whole rows in tasks of 16 (also the strips of packed bfloat16
# products, which sum every batch at once: amx_layers.py), as many as the
# threads need to share them evenly. Summed at once, a piece's task also
# updates its piece of each row, and the thread updating its row segments
# after the other thread took 2.7-3.7x as long as alone: the stream each
# core's prefetcher follows runs into the other's segments (784-100-10
# bfloat16 on vdpbf16ps, Adam, batch 200, Zen 4: 26-36 us against 10 an
# update of 48-52 x 400 weights; the step 0.95 of the time in 16-row tasks;
# float32 at batch 128 0.91). A batch summed in halves is updated in whole
# rows anyway (gradients.py), and there the pieces keep their edge
# (784-100-10 float32, Adam, batch 200: whole rows 1.03x slower, measured).
WHOLE_ROWS_MIN_OUTPUTS = 96
WEIGHT_TASK = 0
BIAS_TASK = 1
NO_TASK = 2  # pads the task list (see make_tasks)


def make_tasks(layer_sizes, whole_rows=False):
    """(layer, kind, j0, j1, k0, k1) rows: blocks [j0, j1) x [k0, k1) of the
    (fan_out, fan_in) weight matrices, then one bias task per layer. With
    whole_rows (for batches whose gradients are summed at once: see
    sums_at_once), a first layer of WHOLE_ROWS_MIN_OUTPUTS outputs or more
    takes whole rows, not column pieces. Depends on those only, never on
    the thread count. (A fresh, writable copy: a read-only array would be
    another type to the kernels.)"""
    return task_list(tuple(int(size) for size in layer_sizes), bool(whole_rows)).copy()


def sums_at_once(batch_size, amx):
    """Whether a workspace of batch_size rows sums each batch's gradients at
    once (gradients.gradient_cut; packed bfloat16 products always do): its
    tasks then take whole rows (make_tasks)."""
    return amx or batch_size <= MAX_SUM_ROWS


@functools.lru_cache(maxsize=64)
def task_list(layer_sizes, whole_rows):
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
                  and -(-fan_out // rows) < FEW_ROW_GROUPS
                  and not (whole_rows and fan_out >= WHOLE_ROWS_MIN_OUTPUTS) else 1)
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


@kernel
def task_first(net, task):
    # where a task's parameters start in the flat vector (task: its row of
    # the task list): its first weight row, or its layer's biases
    l = task[0]
    if task[1] == WEIGHT_TASK:
        return net.w_off[l] + task[2] * net.sizes[l]
    return net.b_off[l]


def task_block_values(layer_sizes, whole_rows=False):
    """Values of the largest gradient block of a task (its weight rows
    times fan_in, or a layer's biases; make_tasks' list), rounded up to a
    multiple of 16 (a float32 cache line): the scratch each thread computes
    a task's gradient into (Work.task_grads)."""
    largest = 0
    for layer, kind, j0, j1, _, _ in make_tasks(layer_sizes, whole_rows):
        if kind == WEIGHT_TASK:
            largest = max(largest, (j1 - j0) * layer_sizes[layer])
        elif kind == BIAS_TASK:
            largest = max(largest, layer_sizes[layer + 1])
    return -(-largest // 16) * 16


@kernel
def task_work(net, tasks, t, halves):
    # a task's estimated cost, in compiled code: the weights it computes (a
    # bias task sums a batch of deltas per bias: cheap; task_cost, which
    # deals the tasks into bins, counts it as nothing). With halves (the
    # update of gradients summed by halves: part_halves), a weight task
    # stands for every column of its rows (gradients_region), and the rows'
    # other column pieces for nothing.
    if tasks[t, 1] == WEIGHT_TASK:
        if halves:
            return 0 if tasks[t, 4] > 0 else (tasks[t, 3] - tasks[t, 2]) * net.sizes[tasks[t, 0]]
        return (tasks[t, 3] - tasks[t, 2]) * (tasks[t, 5] - tasks[t, 4])
    if tasks[t, 1] == BIAS_TASK:
        return net.sizes[tasks[t, 0] + 1]
    return 0


@kernel
def task_owner(balance, net, tasks, t, parts, threads, own):
    # the part that runs task t whatever the tasks' shares: for the weights
    # of a column layer, the part that computes their outputs forward as
    # balance's column shares cut them now, by the task's middle row (W1's
    # tasks of rows 0:24 and 24:50 go to the parts of outputs 0:25 and
    # 25:50); -1 for every other task
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
def shared_work(balance, net, tasks, t, parts, threads, own, halves):
    # task_work of a task the parts share out by speed (0 for one that has
    # its owner)
    return (task_work(net, tasks, t, halves)
            if task_owner(balance, net, tasks, t, parts, threads, own) < 0 else 0)


@kernel
def total_work(balance, net, tasks, parts, threads, own, halves):
    # the estimated cost of the tasks shared out by speed
    total = 0
    for t in range(tasks.shape[0]):
        total += shared_work(balance, net, tasks, t, parts, threads, own, halves)
    return total


@kernel
def share_first_task(balance, net, tasks, total, part, parts, threads, own, halves):
    # the first task of part `part`'s share of the task list (the list's
    # length for part = parts): the first whose cost midpoint lies at or
    # past the part's point on the cumulative cost of the shared tasks (of
    # `total` in all)
    T = tasks.shape[0]
    if part >= parts:
        return T
    point = share_point(balance[GRADIENTS], part, parts) * total
    before = 0
    for t in range(T):
        cost = shared_work(balance, net, tasks, t, parts, threads, own, halves)
        if before + 0.5 * cost >= point:
            return t
        before += cost
    return T
