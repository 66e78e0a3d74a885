"""Phase 2 of a step (step.py): the gradient of every parameter over the
batch, and the optimizer's update.

Weight gradients are sums over the batch, so they are split by
*parameter*: each task (tasks.py) owns a block of weight rows and columns
(or one layer's biases), sums over all rows of the batch in row order into
its thread's scratch block, and then applies the optimizer update from
there while the block is hot in cache. One writer per parameter: no
atomics, and the result is bit-identical for any thread count. The tasks
of a column layer's weights go to the thread that computes their outputs;
each thread runs a contiguous share of the other tasks, sized by its
measured speed.

A batch of more than 128 rows is summed in two halves, each parameter's
gradient the sum over the first half plus the sum over the second
(gradient_cut), whatever the thread count. Those halves are summed first,
in a stage of their own (part_halves): on two threads of equal speed, each
thread the half of the batch that it ran forward, for every weight row
outside the column layers, so that no thread reads deltas and inputs
another wrote (a faster thread also sums some of the other half's
weights). The tasks then add the halves and update (the 784-100-10 Adam
step at batch 200, float32 rows, 0.89 of the time; the regression
benchmark's 0.90).
"""
import numpy as np
from numba import prange

from .amx import COMPILED as AMX_COMPILED
from .amx_layers import amx_layer
# (each a call that does nothing for a model off AMX tiles: see amx_layers.py)
from .amx_layers import step_amx_backward_weight as amx_backward_weight
from .amx_layers import step_pack_weights as pack_weights
from .balance import COLUMN_LAYERS, GRADIENTS, HALF_SUMS, cycles, fold_timings, record, share_point
from .buffers import STREAMED, view2d
from .column_layers import column_cut, column_layer, own_inputs
from .fpenv import flush_subnormals, write_fp_control
from .jit import driver_kernel, inline_kernel, kernel, parallel_kernel
from .kernels import (MAX_SUM_ROWS, dense_backward_bias, dense_backward_weight, kept_transposed,
                      round_columns, streamable, transpose_to_panels, transposed_panels_streamed,
                      weight_panels)
from .optimizers import (ADAM, ADAM_ALPHA, BETA1, BETA2, DECAY, EPSILON, LR, MOMENTUM,
                         MOMENTUM_COEF, NONE, SGD, adam_update, momentum_update, sgd_update)
from .tasks import (NO_TASK, WEIGHT_TASK, share_first_task, task_first, task_owner, task_work,
                    total_work)


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
    tasks = work.tasks
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
        add_blocks(grads, g_first, grads, g_first, spare, np.int64(0), net, tasks[t],
                   tasks[t, 4], tasks[t, 5])


@inline_kernel
def rows_gradient(grads, g_first, task, dout, inp):
    # the sum over the rows of dout (R, fan_out) and inp (R, fan_in) of the
    # gradient of a task's parameters (task: its row of work.tasks), into
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
def add_blocks(out, o_first, a, a_first, b, b_first, net, task, k0, k1):
    # out = a + b over a task's block (task: its row of work.tasks), each
    # from its first value in rows_gradient's layout: its weight rows'
    # columns k0:k1, or its biases (out may be a)
    l = task[0]
    if task[1] == WEIGHT_TASK:
        rows = task[3] - task[2]
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


@driver_kernel
def task_update(work, net, opt, t, grads, g_first, whole_rows, scratch):
    # applies the optimizer to task t's parameters (its weight rows, or its
    # layer's biases) from their gradients in grads, laid out as
    # task_gradient writes them from g_first; with whole_rows, to every
    # column of its weight rows, not only its own; returns the update's
    # check sum (NaN when a new value is not finite). scratch: the part's
    # spare buffer, for the transposed weights' streamed copy
    # (work.exchange: kernels.transposed_panels_streamed)
    tasks = work.tasks
    sizes = net.sizes
    params = net.params
    hyper = opt.hyper
    l = tasks[t, 0]
    if tasks[t, 1] == NO_TASK:
        return 0.0
    first = task_first(net, tasks[t])
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
            panels = weight_panels(work.weights_t, net.wt_off[l], C, OCT)
            weight = view2d(net.operands, net.w_off, l, OC, C)
            j1 = min(tasks[t, 3], OCT)
            if work.exchange[0] == STREAMED and streamable(panels, j0, j1, k0, k1, scratch):
                transposed_panels_streamed(panels, weight, scratch, j0, j1)
            else:
                transpose_to_panels(panels, weight, j0, j1, k0, k1)
    return check


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
    tasks = work.tasks
    total = total_work(work.balance, net, tasks, parts, threads, own, halves)
    fused = gradients and update
    T = tasks.shape[0]
    grads = work.task_grads[part, 0] if fused else opt.grads
    spare = work.task_grads[part, 1]
    # (its own copy, read only by the tasks it owns: own_inputs)
    inputs = (work.inputs[part] if own
              else view2d(work.acts, work.act_off, np.int64(0), B, net.sizes[0]))
    t0 = share_first_task(work.balance, net, tasks, total, part, parts, threads, own, halves)
    t1 = share_first_task(work.balance, net, tasks, total, part + 1, parts, threads, own,
                          halves)
    done = np.int64(0)
    started = cycles()
    owned = np.int64(0)  # cycles of the owned tasks, not timed for the shares
    for t in range(T):
        owner = task_owner(work.balance, net, tasks, t, parts, threads, own)
        if owner == part or (owner < 0 and t0 <= t < t1):
            owned_from = cycles() if owner >= 0 else np.int64(0)
            check = 0.0
            # (with halves, a later column piece is its rows' first piece's)
            if tasks[t, 1] != NO_TASK and not (halves and tasks[t, 4] > 0):
                first = task_first(net, tasks[t])
                g_first = np.int64(0) if fused else first
                if halves:
                    add_blocks(grads, g_first, opt.grads, first, work.second_half, first, net,
                               tasks[t], np.int64(0), net.sizes[tasks[t, 0]])
                elif gradients:
                    task_gradient(grads, g_first, spare, work, net, t, nrows, inputs)
                if update:
                    check = task_update(work, net, opt, t, grads, g_first, halves, spare)
            work.task_checks[t] = check
            if owner >= 0:
                owned += cycles() - owned_from
            else:
                done += task_work(net, tasks, t, halves)
    write_fp_control(fp_control)
    record(shares, part, started + owned, done)
