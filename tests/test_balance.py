"""Work shared between threads by their measured speed (balance.py): every
row and task is covered once whatever the speeds, faster threads get more,
and the parameters stay bit-identical to one thread's."""
import numba
import numpy as np
import pytest

import fastmlp
from fastmlp import amx
from fastmlp.balance import (
    COLUMN_LAYERS,
    CYCLES,
    DONE,
    FORWARD,
    GRADIENTS,
    HALF_SUMS,
    MIN_SHARE,
    SPEED,
    fold_timings,
    make_balance,
    share_rows,
)
from fastmlp.kernels import MAX_SUM_ROWS
from fastmlp.buffers import Optimizer, make_data
from fastmlp.distributed import local_batches
from fastmlp.model import Workspace
from fastmlp.optimizers import OPTIMIZERS, adam_betas, make_hyper
from fastmlp.column_layers import column_cut, column_delta, column_layer, own_inputs
from fastmlp.forward_backward import COLUMNS, GATHER, packed_block_rows, region_plan
from fastmlp.gradients import half_stretch, shared_rows
from fastmlp.step import train_steps
from fastmlp.tasks import (WEIGHT_TASK, make_tasks, share_first_task, task_owner, task_work,
                           total_work)

from conftest import random_problem

SPEEDS = [[1.0, 1.0], [1.0, 1.4], [1.4, 1.0], [3.0, 1.0], [1.0, 100.0],
          [1.0, 2.0, 3.0, 0.5], [0.0, 1.0, 1.0]]


def balance_with(phase, speeds):
    balance = make_balance(4)
    balance[phase, SPEED, :len(speeds)] = speeds
    return balance


@pytest.mark.parametrize("speeds", SPEEDS)
@pytest.mark.parametrize("nrows", [1, 3, 4, 17, 100, 200, 1021])
@pytest.mark.parametrize("block", [0, 32])
def test_rows_are_cut_once_at_tiles_in_proportion_to_speed(speeds, nrows, block):
    parts = len(speeds)
    balance = balance_with(FORWARD, speeds)
    cuts = [share_rows(balance[FORWARD], nrows, p, parts, block) for p in range(parts)]
    assert cuts[0][0] == 0 and cuts[-1][1] == nrows
    for (_, end), (start, _) in zip(cuts[:-1], cuts[1:]):
        assert end == start
        assert start % 4 == 0 or start == nrows
    rows = np.array([r1 - r0 for r0, r1 in cuts])
    assert (rows >= 0).all()
    slack = 4 + min(block // 2, nrows // (5 * parts))  # a tile, and a snap to a block
    if nrows >= 200 and min(speeds) > 0:
        weights = np.clip(np.array(speeds) * parts / sum(speeds), MIN_SHARE, 1 / MIN_SHARE)
        want = nrows * weights / weights.sum()
        assert np.abs(rows - want).max() <= slack
    if min(speeds) <= 0:  # a part not timed yet: equal shares, to a tile
        assert rows.max() - rows.min() <= 2 * slack - 4 + (-nrows % 4)


def test_a_model_on_packed_products_cuts_its_rows_at_their_blocks():
    # W3's batch of 128 on two parts whose speeds are 10% or 50% apart:
    # 64 + 64 rows where the products go in blocks of 32 rows (a cut at 60
    # or 52 leaves a part a block mostly empty), else 60 + 68 and 52 + 76;
    # 100 rows (W1) stay cut at 48 or 52, 12 to 16 rows from a block (a
    # fifth of a share is 10)
    for speeds, at in (([1.0, 1.1], 60), ([1.0, 1.5], 52)):
        balance = balance_with(FORWARD, speeds)
        cuts = {block: [share_rows(balance[FORWARD], 128, p, 2, block) for p in range(2)]
                for block in (0, amx.BLOCK)}
        assert cuts == {0: [(0, at), (at, 128)], amx.BLOCK: [(0, 64), (64, 128)]}
    for speeds, at in (([1.0, 1.1], 48), ([1.1, 1.0], 52)):
        balance = balance_with(FORWARD, speeds)
        assert share_rows(balance[FORWARD], 100, 0, 2, amx.BLOCK) == (0, at)
    for dtype in ("bfloat16", "float32"):
        model = fastmlp.MLP([20, 40, 3], dtype=dtype)
        assert packed_block_rows(model.network()) == (amx.BLOCK if model.amx else 0)


def bfloat16_kind(dtype, monkeypatch):
    # "emulated bfloat16": bfloat16 on float32 FMAs, whatever the CPU has
    if dtype == "emulated bfloat16":
        monkeypatch.setenv("FASTMLP_AMX", "0")
        return "bfloat16"
    return dtype


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("dtype", ["float32", "emulated bfloat16", "bfloat16"])
def test_wide_layers_are_column_layers_off_packed_products(dtype, monkeypatch):
    """W3 on 2 threads: both wide layers split by outputs, the first
    gathering its own copy of the batch in its region, and the second's
    input delta by columns; in float32 and in emulated bfloat16, not on
    packed bfloat16 products (where the CPU has them), which take the
    batch by rows in one region and keep no copy."""
    model = fastmlp.MLP([784, 512, 512, 10], dtype=bfloat16_kind(dtype, monkeypatch))
    net = model.network()
    work = Workspace(model.layer_sizes, 128, model.dtype, amx=model.amx, input_bytes=1).work
    plan = region_plan(work, net, 2, True)
    own = own_inputs(work, net, 2)
    if model.amx:
        assert not own and work.inputs.size == 0
        assert not any(column_layer(net, l, 2, own) for l in range(3))
        assert plan[:, COLUMNS].tolist() == [0] and plan[0, GATHER]
    else:
        assert own and work.inputs.shape == (numba.config.NUMBA_NUM_THREADS, 128, 784)
        assert [column_layer(net, l, 2, own) for l in range(3)] == [True, True, False]
        assert column_delta(net, 1, 2, own)
        assert plan[:, COLUMNS].tolist() == [1, 1, 0, 1] and plan[0, GATHER]


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("speeds", SPEEDS)
@pytest.mark.parametrize("sizes", [[784, 50, 10], [100, 128, 64, 2], [3, 1, 7, 2]])
def test_tasks_are_cut_into_contiguous_shares_by_cost(speeds, sizes, halves):
    model, _, _ = random_problem(sizes, 8, "relu", np.float32, seed=0)
    net = model.network()
    tasks = make_tasks(sizes)
    parts = len(speeds)
    balance = balance_with(GRADIENTS, speeds)
    total = total_work(balance, net, tasks, parts, 1, False, halves)
    firsts = [share_first_task(balance, net, tasks, total, p, parts, 1, False, halves)
              for p in range(parts + 1)]
    assert firsts[0] == 0 and firsts[-1] == len(tasks)
    assert firsts == sorted(firsts)
    if min(speeds) > 0:
        # each cut lies within half a task of its ideal point
        costs = np.array([task_work(net, tasks, t, halves) for t in range(len(tasks))])
        done = np.array([costs[a:b].sum() for a, b in zip(firsts[:-1], firsts[1:])])
        weights = np.clip(np.array(speeds) * parts / sum(speeds), MIN_SHARE, 1 / MIN_SHARE)
        want = costs.sum() * weights / weights.sum()
        assert (np.abs(done - want) <= costs.max()).all()


# layer sizes, batch size, bytes of an input value, and which layers are
# column layers on several threads: wide hidden layers, and a narrow first
# layer whose weights outweigh the batch's input rows (column_layers.narrow_columns)
COLUMN_CASES = [
    ([784, 512, 512, 10], 8, 4, [True, True, False]),
    ([130, 300, 50, 260, 7], 8, 4, [True, False, True, False]),
    ([784, 50, 10], 32, 1, [True, False]),  # W2
    ([784, 50, 10], 100, 1, [True, False]),  # W1
    ([784, 50, 10], 100, 4, [False, False]),  # W1 on float32 rows
    ([784, 50, 50, 10], 32, 4, [True, False, False]),
    ([784, 100, 10], 100, 1, [True, False]),  # cut within the transposed block
    ([784, 100, 10], 200, 4, [False, False]),  # MLPClassifier's float32 fit
    ([64, 32, 10], 8, 1, [False, False]),  # too small to pay
]


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("speeds", SPEEDS)
@pytest.mark.parametrize("sizes, batch, input_bytes, expected", COLUMN_CASES)
def test_column_layers_weights_go_to_the_thread_that_computes_their_outputs(
        speeds, sizes, batch, input_bytes, expected, halves):
    """On several threads, the weight tasks of a column layer (split between
    threads by its outputs) run on the thread that computes those outputs
    forward, whatever the speeds; the other tasks are shared out by speed;
    every task runs once."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("a first column layer needs a workspace for 2 threads")
    model, _, _ = random_problem(sizes, 8, "relu", np.float32, seed=0)
    net = model.network()
    work = Workspace(sizes, batch, np.float32, input_bytes=input_bytes).work
    tasks = work.tasks
    parts = len(speeds)
    threads = max(2, parts)
    T = len(tasks)
    own = own_inputs(work, net, threads)
    # (column layers cut by the speeds too)
    balance = balance_with(GRADIENTS, speeds)
    balance[COLUMN_LAYERS] = balance[GRADIENTS]
    owners = [task_owner(balance, net, tasks, t, parts, threads, own) for t in range(T)]
    for t, (layer, kind, j0, j1, _, _) in enumerate(tasks):
        if kind == WEIGHT_TASK and column_layer(net, layer, threads, own):
            OC = sizes[layer + 1]
            middle = (j0 + j1 - 1) // 2
            assert (column_cut(balance[COLUMN_LAYERS], OC, owners[t], parts) <= middle
                    < column_cut(balance[COLUMN_LAYERS], OC, owners[t] + 1, parts))
            assert task_work(net, tasks, t, False) > 0
        else:
            assert owners[t] == -1
    assert [column_layer(net, l, threads, own) for l in range(len(sizes) - 1)] == expected
    total = total_work(balance, net, tasks, parts, threads, own, halves)
    firsts = [share_first_task(balance, net, tasks, total, p, parts, threads, own, halves)
              for p in range(parts + 1)]
    assert firsts[0] == 0 and firsts[-1] == T and firsts == sorted(firsts)
    shared = [t for t in range(T) if owners[t] < 0]
    assert total == sum(task_work(net, tasks, t, halves) for t in shared) > 0
    # what each part runs (gradients_update): its own tasks and its share
    runs = [t for p in range(parts) for t in range(T)
            if owners[t] == p or (owners[t] < 0 and firsts[p] <= t < firsts[p + 1])]
    assert sorted(runs) == list(range(T))
    # on one thread nothing is owned: every task is shared out
    assert all(task_owner(balance, net, tasks, t, 1, 1, own_inputs(work, net, 1)) == -1
               for t in range(T))


def test_timings_become_smoothed_speeds():
    balance = make_balance(2)
    balance[FORWARD, DONE] = [100, 100]
    balance[FORWARD, CYCLES] = [1000, 2000]
    fold_timings(balance[FORWARD], 2)
    assert balance[FORWARD, SPEED].tolist() == [100 / 1000, 100 / 2000]
    assert (balance[FORWARD, DONE] == 0).all() and (balance[FORWARD, CYCLES] == 0).all()
    balance[FORWARD, DONE] = [100, 0]  # part 1 had no rows: its speed stays
    balance[FORWARD, CYCLES] = [500, 0]
    fold_timings(balance[FORWARD], 2)
    assert balance[FORWARD, SPEED].tolist() == [0.5 * 0.2 + 0.5 * 0.1, 100 / 2000]
    assert (balance[GRADIENTS] == 0).all()


def run_steps(threads, speeds, steps=6, batch=40, sizes=(30, 70, 64, 5), dtype="float32"):
    """Parameters after `steps` Adam steps of `batch` rows, with the
    workspace's balance state preset to `speeds` in every phase."""
    model, X, y = random_problem(list(sizes), steps * batch, "tanh", np.float32, seed=3)
    if dtype == "bfloat16":
        bf16 = fastmlp.MLP(model.layer_sizes, activation="tanh", dtype=dtype)
        bf16.params[:] = model.params
        model = bf16
    ws = Workspace(model.layer_sizes, batch, model.dtype, amx=model.amx)
    ws.work.balance[:, SPEED, :len(speeds)] = speeds
    grads, m, v = (np.zeros_like(model.params) for _ in range(3))
    optimizer = Optimizer(grads, m, v, make_hyper(model.dtype, 0.01, 0.9, 0.0),
                          OPTIMIZERS["adam"], False, np.zeros(5), adam_betas())
    data = make_data(X, y.astype(np.int32), np.ones(len(X), model.dtype), np.arange(len(X)),
                     model.dtype)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        status = train_steps(ws.work, model.network(), optimizer, data,
                             local_batches(batch, model.dtype), 0, steps, 0, threads)[3]
    finally:
        numba.set_num_threads(previous)
    assert status == 0
    return model.params.copy(), ws.work.balance.copy()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("speeds", [[1.0, 4.0], [4.0, 1.0], [1.0, 1.0]])
@pytest.mark.parametrize("batch", [40, 200])
@pytest.mark.parametrize("sizes", [(30, 70, 64, 5), (40, 300, 260, 5)])
@pytest.mark.parametrize("dtype", ["float32", "emulated bfloat16"])
def test_any_cut_trains_bit_identical_parameters(speeds, batch, sizes, dtype, monkeypatch):
    # (at 200 rows the batch is summed in halves, cut between the threads
    # by speed: part_halves; 300 and 260 outputs make column layers, their
    # outputs, deltas and weight tasks cut by speed too)
    dtype = bfloat16_kind(dtype, monkeypatch)
    one, _ = run_steps(1, [1.0], batch=batch, sizes=sizes, dtype=dtype)
    two, balance = run_steps(2, speeds, batch=batch, sizes=sizes, dtype=dtype)
    assert np.array_equal(one, two)
    # every step timed both threads' shares, in every phase it has
    phases = ([FORWARD, GRADIENTS] + ([HALF_SUMS] if batch > MAX_SUM_ROWS else [])
              + ([COLUMN_LAYERS] if max(sizes) >= 256 else []))
    assert (balance[phases, SPEED, :2] > 0).all()
    assert (balance[phases, SPEED, :2] != speeds).all()  # (timed, not the preset speeds)
    # and one step of different training differs: the comparison can fail
    assert not np.array_equal(one, run_steps(1, [1.0], steps=5, batch=batch, sizes=sizes,
                                             dtype=dtype)[0])


@pytest.mark.parametrize("speeds", SPEEDS)
@pytest.mark.parametrize("OC", [50, 100, 300, 512])
def test_column_layers_are_cut_by_speed_at_their_granularity(speeds, OC):
    """A column layer's outputs (column_layers.column_cut): cut once each, at 16s
    where the layer has transposed outputs, else at any output; a wide
    layer's in proportion to speed within half a unit of 16, a narrow
    first layer's evenly whatever the speeds."""
    parts = len(speeds)
    table = balance_with(COLUMN_LAYERS, speeds)[COLUMN_LAYERS]
    cuts = [column_cut(table, OC, p, parts) for p in range(parts + 1)]
    assert cuts[0] == 0 and cuts[-1] == OC and cuts == sorted(cuts)
    unit = 1 if OC < 64 else 16
    assert all(c % unit == 0 for c in cuts[:-1])
    OCT = OC // 64 * 64  # kernels.transposed_outputs
    if OC < 256:
        even = [column_cut(balance_with(COLUMN_LAYERS, [1.0] * parts)[COLUMN_LAYERS], OC, p,
                           parts) for p in range(parts + 1)]
        assert cuts == even
    elif min(speeds) > 0:
        weights = np.clip(np.array(speeds) * parts / sum(speeds), MIN_SHARE, 1 / MIN_SHARE)
        want = np.cumsum(weights / weights.sum())[:-1] * OCT
        assert np.abs(np.array(cuts[1:-1]) - want).max() <= unit / 2 + 1e-9
        if parts == 2 and speeds[0] != speeds[1]:  # the faster part takes more of 0:OCT
            assert (cuts[1] > OCT - cuts[1]) == (speeds[0] > speeds[1])
    if speeds == [1.0, 1.0]:
        assert cuts[1] == {50: 25, 100: 48, 300: 128, 512: 256}[OC]


def test_halves_are_cut_by_speed_and_cover_every_weight_once():
    """part_halves's stretches: both halves' shared weights, each row of
    each half summed by one part, the faster part taking more; each half's
    biases by one part."""
    sizes = [30, 70, 64, 5]
    total = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    for speeds in ([1.0, 1.0], [1.0, 3.0], [3.0, 1.0], [1.0, 2.0, 3.0]):
        parts = len(speeds)
        table = balance_with(HALF_SUMS, speeds)[HALF_SUMS]
        covered = {}
        bias_parts = [[], []]
        for p in range(parts):
            for half in range(2):
                lo, hi, biases = half_stretch(table, total, p, parts, half)
                if biases:
                    bias_parts[half].append(p)
                before = 0
                for l in range(len(sizes) - 1):
                    C, OC = sizes[l], sizes[l + 1]
                    for row in range(shared_rows(lo, before, C, OC),
                                     shared_rows(hi, before, C, OC)):
                        assert (half, l, row) not in covered
                        covered[half, l, row] = p
                    before += C * OC
        assert len(covered) == 2 * sum(sizes[1:])
        assert bias_parts[1] == [parts - 1] and len(bias_parts[0]) == 1
        rows = [sum(1 for p in covered.values() if p == q) for q in range(parts)]
        fastest, slowest = int(np.argmax(speeds)), int(np.argmin(speeds))
        assert rows[fastest] >= rows[slowest]
        if speeds[fastest] > speeds[slowest]:
            assert rows[fastest] > rows[slowest]
