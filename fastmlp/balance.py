"""Sharing a parallel region's work between threads by their measured speed.

Both phases of a step cut their work into one contiguous share per thread:
`forward_backward` the batch's rows (at 4-row tiles), or a wide column
layer's outputs (column_layers.column_cut, at 16 outputs: its weight tasks then go
to the thread that computes their outputs), and `gradients_update` its
task list (by the tasks' estimated cost), and before it, for a batch
summed in two halves, the weights of both halves (gradients.part_halves). Equal
shares assume equal cores, which a user's CPU need not have (performance and
efficiency cores), nor a virtual machine's (a core shared with another guest
ran the same forward pass 1.4x slower than its sibling, measured with
`taskset`, and which core was slow changed from minute to minute).

So each share is timed (the CPU's cycle counter, at its start and end) and
the next region of the same phase cuts its shares in proportion to each
thread's speed over the last ones (work per cycle, smoothed). No computed
value depends on the cut: rows are independent, and a task's result does not
depend on the thread that runs it. With one thread nothing changes.

`balance` (make_balance) holds, per phase and per part: its smoothed speed,
and the cycles and work of its last run (folded into the speed when the
next region of that phase starts). The kernels take one phase's table,
balance[phase] (3, max_parts). W3's step (784-512-512-10) with a third of
one core taken by another process: 0.81-0.88 of the time with its column
layers cut by speed, against evenly (docs/performance.md).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import kernel

# the phases: forward_backward's regions by rows, gradients_update's
# tasks, the halves of a batch (gradients.part_halves), and the column regions
# (column_layers.column_cut)
FORWARD, GRADIENTS, HALF_SUMS, COLUMN_LAYERS = range(4)
SPEED, CYCLES, DONE = range(3)
# the newest speed's weight in the smoothed one
SMOOTHING = 0.5
# no share is cut smaller than this fraction of an equal one, nor larger than
# its inverse: a thread stalled once (preempted) gets work back soon
MIN_SHARE = 0.25


def make_balance(max_parts):
    """The balance state of a workspace, for up to max_parts threads."""
    return np.zeros((4, 3, max_parts), np.float64)


@intrinsic
def cycles(typingctx):
    # the CPU's cycle counter (rdtsc on x86), as an int64
    def codegen(context, builder, signature, args):
        counter = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(64), []), "llvm.readcyclecounter")
        return builder.call(counter, [])
    return types.int64(), codegen


@kernel
def fold_timings(table, parts):
    # before a region: each part's last run, if any, into its smoothed speed
    for p in range(min(parts, table.shape[1])):
        done = table[DONE, p]
        spent = table[CYCLES, p]
        if done > 0 and spent > 0:
            speed = done / spent
            old = table[SPEED, p]
            table[SPEED, p] = speed if old <= 0 else (
                SMOOTHING * speed + (1.0 - SMOOTHING) * old)
        table[DONE, p] = 0.0
        table[CYCLES, p] = 0.0


@kernel
def share_weight(table, p, parts):
    # part p's share of the work relative to an equal one's 1.0: its speed
    # over the mean speed, clamped; 1.0 until every part has been timed
    if parts > table.shape[1]:
        return 1.0
    total = 0.0
    for q in range(parts):
        speed = table[SPEED, q]
        if speed <= 0:
            return 1.0
        total += speed
    weight = table[SPEED, p] * parts / total
    return min(max(weight, MIN_SHARE), 1.0 / MIN_SHARE)


@kernel
def share_point(table, q, parts):
    # where part q's share starts on the unit interval (1.0 for q = parts).
    # Both neighbours of a cut call this with the same q: the same value.
    if q >= parts:
        return 1.0
    before = 0.0
    total = 0.0
    for i in range(parts):
        weight = share_weight(table, i, parts)
        if i < q:
            before += weight
        total += weight
    return before / total


@kernel
def cut_row(table, nrows, q, parts, block):
    # where part q's rows of a batch of nrows start: at a 4-row tile, moved
    # to the nearest multiple of `block` rows (if block > 0) when that is
    # at most a fifth of an equal share away (and half a block). Both
    # neighbours of a cut ask for the same q.
    tiles = (nrows + 3) // 4
    row = min(nrows, int(share_point(table, q, parts) * tiles + 0.5) * 4)
    if block > 0 and 0 < row < nrows:
        near = (row + block // 2) // block * block
        if abs(row - near) <= min(block // 2, nrows // (5 * parts)) and near <= nrows:
            row = near
    return row


@kernel
def share_rows(table, nrows, part, parts, block):
    # rows [r0, r1) of part `part` of a batch of nrows (cut_row)
    return (cut_row(table, nrows, part, parts, block),
            cut_row(table, nrows, part + 1, parts, block))


@kernel
def record(table, part, started, done):
    # after part `part` ran `done` units of work from cycle `started`
    if part < table.shape[1]:
        table[CYCLES, part] = cycles() - started
        table[DONE, part] = done
