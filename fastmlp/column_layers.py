"""Column layers: the layers a step splits between threads by their
outputs rather than by batch rows, where it cuts them, and whose deltas
follow that cut. Both phases of a step decide by these kernels
(forward_backward.py runs the regions, gradients.py gives each thread
the weight tasks of its outputs).

Split by rows, every thread reads every weight of a layer, half of them
just written by the other core in the last update: on a 2-core Xeon, that
traffic took W3's step from 1,337 to 1,614 us, and the split by outputs
took it back to 1,490 (both measured, docs/performance.md). Each output is
computed by the same instructions either way, so no value depends on the
cut.
"""
from .balance import share_point
from .jit import kernel
from .kernels import MAX_SUM_ROWS, NARROW_COLUMNS, transposed_outputs, wide_layer


@kernel
def column_layer(net, l, threads, own):
    # whether layer l runs forward split between threads by its outputs
    # (a region of its own in forward_backward), not by batch rows: on more
    # than one thread, a wide hidden layer, or with own (own_inputs) a
    # narrow first one (narrow_columns). Each thread then reads only the
    # weights it updates itself (gradients_update gives it their tasks),
    # where a split by rows has every thread read every weight, half of them
    # just written by another core (W3's step 1.12x faster, measured: see
    # the module's docstring). Not in a model on packed bfloat16 products
    # (amx_layers.py), which packs each part's rows: a version packing
    # each part's outputs ran W3's step on Zen 4 1.02-1.04x slower with
    # the two cores near, 0.88-0.98 far (docs/performance.md). Emulated
    # bfloat16 runs float32's kernels and splits as float32 does.
    L = net.sizes.shape[0] - 1
    if threads < 2 or l >= L - 1 or net.amx:
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


def own_inputs_shape(layer_sizes, batch_size, threads, itemsize, input_bytes, amx):
    """The shape of Work.inputs: each thread's own copy of the batch's
    input rows where the first layer may be a column layer (a wide hidden
    layer, or a narrow one by narrow_columns, on 2 or more threads, in a
    model off packed products: amx), else none."""
    C = int(layer_sizes[0])
    if threads >= 2 and len(layer_sizes) > 2 and not amx and (
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
