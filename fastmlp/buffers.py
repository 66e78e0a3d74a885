"""The arrays a step works on, grouped the way the kernels take them, so
that no kernel call spells out twenty arrays. Each group is a namedtuple
(Numba passes it as one struct): `Network` (the parameters and what lays
them out, with the activation and head codes), `Work` (the buffers of one
batch size), `Data` (the training rows and their order) and `Optimizer`
(gradients, state and hyperparameters). `fastmlp.model` builds the first
two, `fastmlp.training` the others. Kernels see a layer's block of a flat
vector as a matrix through `view2d`."""
from collections import namedtuple

import numpy as np

from .jit import inline_kernel, kernel

# params: the flat parameter vector; sizes: layer widths; w_off, b_off: where
# each layer's (fan_out, fan_in) weights and biases start in params; wt_off:
# each layer's transposed block in Work.weights_t; activation, head:
# kernels.ACTIVATIONS and heads.HEADS codes; operands: the weights the
# products read, params itself, or for bf16 (bfloat16.py) their copy
# rounded to bfloat16; amx: bf16 on AMX tiles, with the weights packed for
# them in packed_weights as laid out by packed_weights_layout
# (amx_layers.py; empty without)
Network = namedtuple("Network", ["params", "sizes", "w_off", "b_off", "wt_off", "activation",
                                 "head", "operands", "bf16", "amx", "packed_weights",
                                 "packed_weights_layout"])
# acts, deltas: every layer's (B, width) block at act_off[l]; labels (B,) or
# targets (B, K): the batch's targets; row_weights (B,); row_stats (B, 2):
# each row's weighted loss and score; target_scale (K,): see heads.py;
# tasks (T, 6): gradients_update's work list for batches of this size
# (tasks.make_tasks); task_checks (T,): the update check sums; task_grads
# (threads, 2, V): each thread's scratch for one task's gradient block, and
# for its sum over the batch's second half (gradients.gradients_update);
# second_half (P,): the shared tasks' gradients over the batch's second
# half (gradients.part_halves; empty where a workspace's batches are never
# cut in two);
# weights_t: transposed weights (kernels.kept_transposed), in panels of 64
# outputs (kernels.weight_panels); outputs_t
# (threads, V): each thread's scratch for a wide layer's transposed outputs
# (kernels.wide_forward); balance: how the parallel regions share
# work between threads (balance.py); packed, packed_layout: activations and
# deltas packed for AMX tiles (amx_layers.py; empty without); inputs
# (threads, B, C): each thread's own copy of the batch's input rows, for a
# first layer split between threads by its outputs (column_layers.own_inputs; (0, 0,
# C) without); exchange (1,): how the update writes the transposed weights
# that other threads read, PLAIN or STREAMED (training.ExchangeChoice)
Work = namedtuple("Work", ["acts", "deltas", "act_off", "labels", "targets", "row_weights",
                           "row_stats", "target_scale", "tasks", "task_checks", "task_grads",
                           "weights_t", "outputs_t", "balance", "packed", "packed_layout",
                           "inputs", "second_half", "exchange"])
# work.exchange[0]: plain stores, or non-temporal ones
# (kernels.transposed_panels_streamed)
PLAIN, STREAMED = 0, 1
# X: the (N, C) rows' raw bytes, (N, C * x_bytes) uint8, where x_bytes is
# 1, 4 or 8 for uint8, float32 or float64 rows; labels (N,) int32 for
# softmax, else targets (N, K) (the other one has no rows); sample_weight
# (N,), or empty where every row weighs 1 (row_weight); idx: the epoch's
# row order; scale: 1/255 for uint8 rows, else 1.
# Every input dtype and head gives one Data type per model dtype, so the
# step kernels compile once for all of them (make_data).
Data = namedtuple("Data", ["X", "x_bytes", "labels", "targets", "sample_weight", "idx",
                           "scale"])
# grads, state1, state2: flat like params; hyper: optimizers.make_hyper;
# code: optimizers.OPTIMIZERS code (NONE computes gradients only); schedule:
# schedules.kernel_state, the per-step learning-rate schedule; betas: Adam's
# beta_1 and beta_2 in float64, for its step size (optimizers.adam_alpha)
Optimizer = namedtuple("Optimizer", ["grads", "state1", "state2", "hyper", "code", "nesterov",
                                     "schedule", "betas"])
# How each step's batch is formed and summed: `size` rows, split into
# `ranks` shards of which this process (MPI rank `rank`) trains one. With
# MPI (distributed.py), allreduce and wtime are the addresses of
# MPI_Allreduce and MPI_Wtime, datatype, op and comm its handles, reduced
# the receive buffer (like Optimizer.grads) and tally the flags and
# counts of distributed.TALLY; for a single process allreduce is 0.
Batches = namedtuple("Batches", ["size", "rank", "ranks", "allreduce", "wtime", "datatype", "op",
                                 "comm", "reduced", "tally"])


def make_data(X, y, sample_weight, idx, dtype):
    """Data for a model of dtype: X as check_X returns it (C-contiguous
    uint8, float32 or float64), y as heads.check_targets does. Its arrays
    are read-only views (the kernels only read them; Numba types a read-only
    array apart, and a memory-mapped dataset is one), over the same memory:
    idx may still be shuffled in place."""
    scale = dtype.type(1.0 / 255.0) if X.dtype == np.uint8 else dtype.type(1.0)
    if y.ndim == 1:
        labels, targets = y, np.zeros((0, 1), dtype)
    else:
        labels, targets = np.zeros(0, np.int32), y
    if np.all(sample_weight == 1):  # (no weight to look up: row_weight)
        sample_weight = sample_weight[:0]
    return Data(read_only(X.view(np.uint8)), np.int64(X.itemsize), read_only(labels),
                read_only(targets), read_only(sample_weight), read_only(idx), scale)


@kernel
def row_weight(sample_weight, row):
    # the weight of dataset row `row` (Data.sample_weight: 1 if empty, as
    # make_data leaves it where every weight is 1: then a step's total
    # weight is its row count, not the sum of a gather of 200 random
    # weights that took each thread 1.1-1.3 us of the regression
    # benchmark's step on Zen 4)
    return sample_weight[row] if sample_weight.shape[0] > 0 else sample_weight.dtype.type(1.0)


def read_only(array):
    """A view of array that cannot be written through."""
    view = array.view()
    view.flags.writeable = False
    return view


@inline_kernel
def view2d(flat, offsets, index, rows, cols):
    # flat[offsets[index]:...] seen as a (rows, cols) matrix
    start = offsets[index]
    return flat[start:start + rows * cols].reshape((rows, cols))
