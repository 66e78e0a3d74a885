"""Data-parallel training over MPI (mpi4py): what `fit(..., comm=...)` adds.

Every rank holds the same model and draws the same row order each epoch.
A step's global batch of B rows is split into contiguous shards, one per
rank; each rank runs the usual kernels on its shard only
(`step.shard_gradients`, scaled by the whole batch's total weight, so the
shards' gradients sum to the batch gradient), then one in-place `Allreduce`
sums the flat gradient buffer, and every rank applies the same update to the
same parameters (`step.apply_updates`). The result is single-process
training with batch size B, up to the order of the gradient sums.

The gradient buffer carries TAIL extra values after the P gradients: the
shard's loss sum, its score sum and its rank's Ctrl-C flag, so that the
one Allreduce per step also tells every rank the step's loss (divergence is
judged on the same number everywhere) and whether any rank was interrupted
(all ranks stop after the same step). Nothing in a step is pickled.

The updates run on every rank from the same reduced gradient; they are
bit-identical when the ranks run the same build on the same kind of CPU. fit
checks that at the end of every epoch (a CRC of the parameters on every
rank) and stops with an error rather than go on with ranks that disagree.
"""
import math
import os
import time
import zlib

import numba
import numpy as np

from .optimizers import ADAM, ADAM_ALPHA, LR, NONE, adam_alpha
from .schedules import COSINE, KIND, step_lr
from .step import (
    LOSS_NOT_FINITE,
    PARAMS_NOT_FINITE,
    STEPS_DONE,
    apply_updates,
    batch_weight,
    shard_gradients,
    transpose_weights,
)

TAIL = 3
LOSS_SLOT, SCORE_SLOT, INTERRUPT_SLOT = range(TAIL)

MISSING_MPI = ("distributed training needs mpi4py and an MPI library: pip install "
               "'fastmlp[mpi]' (plus 'mpich' where the machine has no MPI of its own), "
               "then start it with mpiexec -n N")


def world():
    """MPI.COMM_WORLD, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{MISSING_MPI} ({exc})") from None
    return MPI.COMM_WORLD


def rank_threads(comm):
    """Threads for this rank: the cores it may run on, shared with the other
    ranks of its machine whose cores overlap its own. Unbound ranks on a
    2-core machine get 1 thread each; ranks bound to 4 cores each get 4."""
    from mpi4py import MPI
    mine = os.sched_getaffinity(0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        sets = local.allgather(sorted(mine))
    finally:
        local.Free()
    sharers = sum(1 for cores in sets if mine.intersection(cores))
    return max(1, len(mine) // sharers)


def shard(nrows, rank, size):
    """Rows [lo, hi) of a batch of nrows that a rank trains on."""
    return nrows * rank // size, nrows * (rank + 1) // size


def data_digest(array):
    """A CRC of an array's values, to check that ranks hold the same labels."""
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).ravel())


def check_same_job(comm, settings):
    """Raises the same ValueError on every rank unless all ranks passed equal
    settings (a dict): a rank with other data or flags would otherwise make
    the others wait forever or train on a mix."""
    every = comm.allgather(settings)
    for rank, theirs in enumerate(every):
        for key, value in every[0].items():
            if theirs.get(key) != value:
                raise ValueError(f"MPI ranks disagree on {key}: rank 0 has {value!r}, rank "
                                 f"{rank} has {theirs.get(key)!r}; every rank must call fit "
                                 f"with the same data and settings")


def broadcast_state(comm, model):
    """Gives every rank rank 0's parameters, optimizer state and training
    state (updates, epoch, step and shuffling generator): at the start of
    fit, so that a resumed or differently seeded rank follows rank 0."""
    state, progress = model.optimizer_state, model.training_state
    meta = comm.bcast((state.updates, progress.epoch, progress.step, progress.rng_state), root=0)
    state.updates, progress.epoch, progress.step, progress.rng_state = meta
    for array in (model.params, state.state1, state.state2):
        comm.Bcast(array, root=0)


def check_params_agree(comm, params, epoch):
    digests = comm.allgather(data_digest(params))
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"MPI ranks hold different parameters after epoch {epoch + 1} (CRCs {digests}): "
            f"every rank must run the same fastmlp, Numba and CPU type")


class ShardedSteps:
    """fit's `run(step0, step1)` for MPI ranks: the same contract as
    `step.train_steps` (returns loss sum, weight sum and score sum of the
    whole global batches, a status and the step it is about), one Allreduce
    per step. When any rank was interrupted, stops after the current step on
    every rank and sets interrupt['agreed']."""

    def __init__(self, comm, model, state, workspace, optimizer, data, batch_size, interrupt):
        from mpi4py import MPI
        self.in_place, self.sum = MPI.IN_PLACE, MPI.SUM
        self.comm, self.model, self.state, self.workspace = comm, model, state, workspace
        self.optimizer, self.data, self.batch_size = optimizer, data, batch_size
        self.interrupt = interrupt
        self.tail = optimizer.grads[model.n_params:]
        self.reduce_seconds = 0.0  # spent in Allreduce, waiting for other ranks included
        self.steps = 0

    def compile(self):
        """Compiles (or loads from cache) both kernels without training: a
        shard of no rows and an update that changes nothing."""
        self._shard_gradients(0, 0, self.model.dtype.type(0.0))
        opt = self.optimizer._replace(code=NONE)
        apply_updates(self.workspace.work, self.model.network(), opt)

    def _shard_gradients(self, start, nrows, inv_total):
        return shard_gradients(self.workspace.work, self.model.network(), self.optimizer,
                               self.data, start, nrows, inv_total, numba.get_num_threads())

    def __call__(self, step0, step1):
        model, state, work = self.model, self.state, self.workspace.work
        data, grads = self.data, self.optimizer.grads
        n, B = data.idx.shape[0], self.batch_size
        loss_sum = weight_sum = score_sum = 0.0
        # params may have changed since the last call; apply_updates then
        # keeps the transposed weights current
        transpose_weights(work.weights_t, model.network())
        for s in range(step0, step1):
            start = s * B
            nrows = min(B, n - start)
            lo, hi = shard(nrows, self.comm.rank, self.comm.size)
            total = batch_weight(data.sample_weight, data.idx, start, nrows)
            inv_total = model.dtype.type(1.0 / total if total > 0 else 0.0)
            loss, right = self._shard_gradients(start + lo, hi - lo, inv_total)
            self.tail[LOSS_SLOT] = loss
            self.tail[SCORE_SLOT] = right
            self.tail[INTERRUPT_SLOT] = 1.0 if self.interrupt["set"] else 0.0
            started = time.perf_counter()
            self.comm.Allreduce(self.in_place, grads, op=self.sum)
            self.reduce_seconds += time.perf_counter() - started
            self.steps += 1
            step_loss = float(self.tail[LOSS_SLOT])
            if not math.isfinite(step_loss):
                return loss_sum, weight_sum, score_sum, LOSS_NOT_FINITE, s
            loss_sum += step_loss
            weight_sum += total
            score_sum += float(self.tail[SCORE_SLOT])
            update = state.updates + s - step0 + 1
            if self.optimizer.schedule[KIND] == COSINE:
                state.hyper[LR] = step_lr(self.optimizer.schedule, update)
            if state.code == ADAM:
                state.hyper[ADAM_ALPHA] = adam_alpha(float(state.hyper[LR]), update)
            apply_updates(work, model.network(), self.optimizer)
            if not math.isfinite(work.task_checks.sum()):
                return loss_sum, weight_sum, score_sum, PARAMS_NOT_FINITE, s
            if self.tail[INTERRUPT_SLOT] > 0:
                self.interrupt["agreed"] = True
                return loss_sum, weight_sum, score_sum, STEPS_DONE, s + 1
        return loss_sum, weight_sum, score_sum, STEPS_DONE, step1
