"""The fused minibatch step, and the loop that runs many steps in compiled code.

A step is two phases:

1. `forward_backward` (forward_backward.py): the batch, cut into one part
   of rows per thread (sized by speed: balance.py), runs forward through
   every layer, the output head, and every delta backward. Column layers
   (column_layers.py) are split by their outputs instead.
2. `gradients_update` (gradients.py): the gradients, split by parameter
   into tasks (tasks.py), each summed over the batch and applied by the
   optimizer while it is in cache. One writer per parameter, so results
   are bit-identical for any thread count.

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
import numpy as np
from numba import prange

from .balance import fold_timings
from .collective import allreduce, wall_time
from .column_layers import own_inputs
from .forward_backward import (compiled_run_regions, region_part, region_parts, region_plan,
                               transpose_weights)
from .gradients import (HALVES, TASKS, TASKS_AFTER_HALVES, compiled_gradients_update,
                        gradient_parts, gradients_part, sum_halves)
from .jit import allocating_driver_kernel, driver_kernel, kernel, parallel_kernel
from .kernels import finite
from .optimizers import ADAM, ADAM_ALPHA, LR, adam_alpha
from .schedules import COSINE, KIND, step_lr
from .sync import (ABORTED, START, START_TIMEOUT_CYCLES, SYNC_WORDS, all_started, arrive,
                   end_barrier)


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
    # total sample weight of rows idx[start:start + nrows], in float64 (with
    # every weight 1, buffers.row_weight: nrows, what the sum gives)
    if sample_weight.shape[0] == 0:
        return float(nrows)
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


@allocating_driver_kernel
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
            region_cut = region_parts(work, plan[i], nrows, next_rows, threads)
            if part < region_cut:
                region_part(work, net, data, first, nrows, inv_total, true, next_rows, threads,
                            plan[i], part, region_cut)
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
