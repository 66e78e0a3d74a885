"""The model: one flat parameter vector carved into per-layer views, and the
workspace of activation and delta buffers that the kernels run in."""
import contextlib
import threading

import numba
import numpy as np

from . import jit
from .balance import make_balance
from .amx import usable as amx_usable
from .amx_layers import layouts as amx_layouts, packed_dtype
from .buffers import PLAIN, Network, Work, make_data, read_only
from .heads import HEADS, METRICS, VALUE_HEADS, check_targets, predictions, score, target_scale
from .kernels import ACTIVATIONS
from .optimizers import gradients_only
from .column_layers import own_inputs_shape
from .forward_backward import (PLAN_WIDTH, region, region_plan, run_regions, transpose_weights,
                               transposed_layout, wide_scratch_values)
from .gradients import gradients_update
from .tasks import make_tasks, sums_at_once, task_block_values
from .validation import (
    check_activation,
    check_choice,
    check_dtype,
    check_float,
    check_layer_sizes,
    check_sample_weight,
    check_X,
)

INITS = ("normal", "xavier", "he")
# Vectors the kernels stream through start on a cache line (64 bytes), and
# so do their rows whose width is a multiple of 16 floats (784, 512...): a
# 64-byte vector load that straddles two lines costs two (forward 10-20%
# slower on unaligned float32 rows, measured).
ALIGNMENT = 64


def aligned_zeros(n, dtype):
    """A zeroed (n,) array of dtype whose data starts at a multiple of
    ALIGNMENT bytes."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + n * dtype.itemsize].view(dtype)


def aligned_copy(a):
    """a as a new aligned flat array (unpickled arrays may start anywhere)."""
    out = aligned_zeros(a.size, a.dtype)
    out[:] = a.ravel()
    return out


_LAUNCH_LOCK = threading.Lock()


def parallel_launch_guard():
    """predict and evaluate may run in several Python threads at once: each
    call has its own workspace, and the OpenMP and TBB threading layers take
    concurrent parallel launches. Numba's fallback layer, workqueue, does not,
    so there (or before any layer is chosen) launches take turns."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return contextlib.nullcontext() if layer in ("omp", "tbb") else _LAUNCH_LOCK
PREDICT_BATCH = 1024  # rows per forward call in predict/evaluate
# predict/evaluate keep their workspace for the next call when it is this
# small: a new one costs 0.1 ms, more than a forward pass of a few rows
KEEP_WORKSPACE_BYTES = 1 << 20


def parameter_layout(layer_sizes):
    """Offsets of W_0, b_0, W_1, b_1, ... in the flat vector, and its size.
    W_l is stored (fan_out, fan_in) row-major, so that kernels take dot
    products along contiguous fan_in rows; b_l is (fan_out,)."""
    w_off, b_off, offset = [], [], 0
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        w_off.append(offset)
        offset += fan_in * fan_out
        b_off.append(offset)
        offset += fan_out
    return np.array(w_off, np.int64), np.array(b_off, np.int64), offset


class Workspace:
    """Activation and delta buffers for batches of up to `batch_size` rows,
    allocated once. A_l (and D_l, the loss gradient of layer l's
    pre-activation) is a (batch_size, layer_sizes[l]) block at act_off[l];
    D_0 is never written. `work` groups them as the kernels take them
    (buffers.Work). input_bytes, the size of the training rows' values (1
    for uint8 pixels; the dtype's by default), decides whether a narrow
    first layer gets each thread's own copy of the inputs
    (column_layers.narrow_columns)."""

    def __init__(self, layer_sizes, batch_size, dtype, backward=True, amx=False,
                 input_bytes=None):
        sizes = np.asarray(layer_sizes, np.int64)
        # each block starts on a cache line (ALIGNMENT bytes = 16 values or more)
        blocks = -(-batch_size * sizes // 16) * 16
        self.batch_size = batch_size
        self.act_off = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int64)
        self.acts = aligned_zeros(int(blocks.sum()), dtype)
        self.deltas = aligned_zeros(self.acts.size if backward else 0, dtype)
        n_outputs = int(sizes[-1])
        # the weights of layers with 64 to WIDE_OUTPUTS outputs transposed,
        # and each thread's scratch for the outputs of wider ones, for dense_forward
        n_transposed = transposed_layout(layer_sizes)[1]
        threads = numba.config.NUMBA_NUM_THREADS
        # the gradient tasks of its batches (a first layer in whole rows where
        # they are summed at once: tasks.make_tasks)
        at_once = sums_at_once(batch_size, amx)
        tasks = make_tasks(layer_sizes, at_once)
        block = task_block_values(layer_sizes, at_once) if backward else 0
        wide = wide_scratch_values(layer_sizes)
        (packed_layout, packed_size), _ = amx_layouts(layer_sizes, batch_size, amx)
        itemsize = np.dtype(dtype).itemsize
        # (gradients.gradient_cut: batches of more rows are summed in two
        # halves, but on packed products, which sum every batch at once)
        halves = backward and not at_once
        n_params = parameter_layout(layer_sizes)[2]
        inputs_shape = own_inputs_shape(layer_sizes, batch_size, threads, itemsize,
                                        itemsize if input_bytes is None else input_bytes, amx)
        self.work = Work(
            acts=self.acts, deltas=self.deltas, act_off=self.act_off,
            labels=np.zeros(batch_size, np.int32),
            targets=np.zeros((batch_size, n_outputs), dtype),
            row_weights=np.zeros(batch_size, dtype),
            row_stats=np.zeros((batch_size, 2), np.float64),  # per-row loss, score
            target_scale=np.zeros(n_outputs, dtype),
            tasks=tasks, task_checks=np.zeros(len(tasks), np.float64),
            task_grads=aligned_zeros(threads * 2 * block, dtype).reshape(threads, 2, block),
            weights_t=aligned_zeros(n_transposed, dtype),
            outputs_t=aligned_zeros(threads * wide, dtype).reshape(threads, wide),
            balance=make_balance(threads),
            packed=aligned_zeros(packed_size, packed_dtype(amx)), packed_layout=packed_layout,
            inputs=aligned_zeros(int(np.prod(inputs_shape)), dtype).reshape(inputs_shape),
            second_half=aligned_zeros(n_params if halves else 0, dtype),
            exchange=np.full(1, PLAIN, np.int64))
        self.row_stats = self.work.row_stats
        start = int(self.act_off[-1])
        self.output = self.acts[start:start + batch_size * n_outputs].reshape(batch_size,
                                                                               n_outputs)
        self.nbytes = sum(a.nbytes for a in self.work if isinstance(a, np.ndarray))
        self._plans = {}

    def plan(self, net, threads, backward):
        """region_plan(work, net, threads, backward), made once per thread
        count: it depends on the buffers' shapes and the layer sizes only."""
        key = (threads, backward)
        if key not in self._plans:
            self._plans[key] = region_plan(self.work, net, threads, backward)
        return self._plans[key]


class MLP:
    """A multi-layer perceptron: dense layers with one hidden activation
    (sigmoid, tanh or relu) and an output head (heads.py): "softmax" (class
    probabilities, cross-entropy, integer labels), "linear" (regression,
    mean squared error) or "sigmoid" (multi-label, binary cross-entropy).

    `params` is one flat contiguous array; `weights[i]` (fan_in, fan_out) and
    `biases[i]` are writable views into it (weights[i] is the transpose of the
    stored (fan_out, fan_in) block, so it is Fortran-ordered).
    """

    def __init__(self, layer_sizes, activation="sigmoid", dtype="float32",
                 init="normal", init_scale=0.01, seed=None, output="softmax"):
        self.output = check_choice("output", output, HEADS)
        self.layer_sizes = check_layer_sizes(layer_sizes, output)
        check_activation(activation)
        self.activation = activation
        self.dtype = check_dtype(dtype, bfloat16=True)
        # "float32", "float64" or "bfloat16" (float32 buffers, bfloat16 products)
        self.precision = ("bfloat16" if isinstance(dtype, str) and dtype == "bfloat16"
                          else self.dtype.name)
        self.init = check_choice("init", init, INITS)
        self.init_scale = check_float("init_scale", init_scale, minimum=0.0)
        self.seed = seed

        self.w_off, self.b_off, n_params = parameter_layout(self.layer_sizes)
        self._sizes = np.array(self.layer_sizes, np.int64)
        self._wt_off = transposed_layout(self.layer_sizes)[0]
        # linear: predict returns (n,) rather than (n, 1); fit sets it from y
        self.flat_targets = self.layer_sizes[-1] == 1
        self.params = aligned_zeros(n_params, self.dtype)
        self.weights, self.biases = self.layer_views(self.params)
        self._operand_buffers()
        # set by fit and kept, so that a second fit (or a loaded file) continues
        self.optimizer_state = None
        self.training_state = None
        # set by fastmlp-train and saved: the training data (see fastmlp.sources)
        self.source = None
        self.preprocessing = None
        self._initialize(np.random.default_rng(seed))

    def _initialize(self, rng):
        # normal: init_scale * N(0, 1), the classic lesson's draw; xavier:
        # Glorot uniform, U(+-sqrt(6 / (fan_in + fan_out))); he: N(0, 2 / fan_in).
        # Biases start at zero.
        for w in self.weights:
            fan_in, fan_out = w.shape
            if self.init == "normal":
                w[...] = self.init_scale * rng.standard_normal(w.shape)
            elif self.init == "xavier":
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                w[...] = rng.uniform(-limit, limit, w.shape)
            else:
                w[...] = np.sqrt(2.0 / fan_in) * rng.standard_normal(w.shape)

    def _operand_buffers(self):
        # what the products read the weights from (buffers.Network.operands):
        # params, or for bfloat16 a rounded copy that the kernels keep
        # current; and whether bfloat16 products run on packed operands (AMX
        # tiles or vdpbf16ps) in this process, with the weights packed for
        # them (amx_layers.py)
        bfloat16 = self.precision == "bfloat16"
        self._operands = aligned_zeros(self.params.size, self.dtype) if bfloat16 else self.params
        self.amx = bfloat16 and amx_usable()
        _, (layout, size) = amx_layouts(self.layer_sizes, 0, self.amx)
        self._packed_weights = aligned_zeros(size, packed_dtype(self.amx))
        self._packed_weights_layout = layout
        for derived in ("_layout_views", "_idle_workspace"):  # made anew when needed
            self.__dict__.pop(derived, None)

    def __getstate__(self):
        # weights and biases are views of params, operands params or a copy
        # made from them: rebuilt after unpickling
        state = dict(self.__dict__)
        for key in ("weights", "biases", "_operands", "amx", "_packed_weights",
                    "_packed_weights_layout", "_idle_workspace", "_layout_views"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        for key, value in (("source", None), ("preprocessing", None), ("output", "softmax"),
                           ("flat_targets", False)):
            state.setdefault(key, value)  # pickled by an earlier fastmlp
        # the layout of the transposed weights is this version's (the
        # workspace is sized by it), not the pickling one's; an earlier
        # one's task list goes (each workspace makes its own)
        state["_wt_off"] = transposed_layout(state["layer_sizes"])[0]
        state.pop("_tasks", None)
        state.setdefault("precision", state["dtype"].name)
        self.__dict__.update(state)
        self.params = aligned_copy(self.params)
        self.weights, self.biases = self.layer_views(self.params)
        self._operand_buffers()

    def fit(self, X, y, **kwargs):
        """fastmlp.fit(self, X, y, **kwargs), spelt as Keras's model.fit:
        trains in place and returns the History."""
        from .training import fit
        return fit(self, X, y, **kwargs)

    def save(self, path):
        """Writes the model, with its optimizer and training state, to path
        as safetensors (atomically; see fastmlp.modelfile)."""
        from .modelfile import save
        save(self, path)

    def to_onnx(self, path, preprocessing=False):
        """Writes the model as an ONNX graph that takes float32 features, as
        predict_proba does; with preprocessing, raw columns or pixel values,
        scaled in the graph as the model records, and a linear model of
        your files answers in the target's units (see fastmlp.interop)."""
        from .interop import to_onnx
        to_onnx(self, path, preprocessing)

    @classmethod
    def from_torch(cls, sequential, output=None):
        """The MLP of a PyTorch nn.Sequential of Linear layers with Sigmoid,
        Tanh, ReLU or Identity between them; a final Softmax or Sigmoid gives the head,
        else `output` (default "softmax")."""
        from .interop import from_torch
        return from_torch(sequential, output)

    @classmethod
    def from_sklearn(cls, fitted):
        """The MLP of a fitted scikit-learn MLPClassifier or MLPRegressor."""
        from .interop import from_sklearn
        return from_sklearn(fitted)

    def layer_views(self, flat):
        """(weights, biases): per-layer views of a vector laid out like params."""
        fans = zip(self.layer_sizes[:-1], self.layer_sizes[1:])
        weights = [flat[w:w + i * o].reshape(o, i).T for w, (i, o) in zip(self.w_off, fans)]
        biases = [flat[b:b + o] for b, o in zip(self.b_off, self.layer_sizes[1:])]
        return weights, biases

    @property
    def n_params(self):
        return self.params.size

    @property
    def n_features(self):
        return self.layer_sizes[0]

    @property
    def n_classes(self):
        return self.layer_sizes[-1]

    @property
    def n_outputs(self):
        return self.layer_sizes[-1]

    @property
    def activation_code(self):
        return ACTIVATIONS[self.activation]

    @property
    def metric(self):
        """The name of the head's score: "accuracy" or "r2"."""
        return METRICS[self.output]

    def network(self):
        """The parameters and their layout as the kernels take them. The
        layout goes as read-only views, whether or not its arrays are (they
        are in a model that joblib loads from a memory map, as scikit-learn's
        checks do), so that one compiled step serves both (buffers.make_data)."""
        views = self.__dict__.get("_layout_views")
        if views is None:  # made once: the layout does not change
            views = self._layout_views = tuple(read_only(a) for a in (
                self._sizes, self.w_off, self.b_off, self._wt_off, self._packed_weights_layout))
        return Network(self.params, *views[:4], self.activation_code, HEADS[self.output],
                       self._operands, self.precision == "bfloat16", self.amx,
                       self._packed_weights, views[4])

    def __repr__(self):
        return (f"MLP({list(self.layer_sizes)}, activation={self.activation!r}, "
                f"output={self.output!r}, dtype={self.precision!r}, params={self.n_params})")

    def summary(self):
        """The layers as Keras's model.summary() lists them: name (activation),
        output shape and parameter count, as a string."""
        rows = [("input", f"(None, {self.layer_sizes[0]})", 0)]
        for i, (fan_in, fan_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            kind = self.activation if i < len(self.layer_sizes) - 2 else self.output
            rows.append((f"dense_{i + 1} ({kind})", f"(None, {fan_out})", fan_in * fan_out + fan_out))
        lines = [f'Model: "{"-".join(map(str, self.layer_sizes))}" ({self.precision})',
                 f"{'Layer (activation)':<24}{'Output Shape':<16}{'Param #':>10}"]
        lines += [f"{name:<24}{shape:<16}{count:>10,}" for name, shape, count in rows]
        lines.append(f"Total params: {self.n_params:,}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------
    # kernels on a whole array

    def _transpose(self, workspace, net):
        # workspace's transposed weights from params, for dense_forward
        with parallel_launch_guard():
            transpose_weights(workspace.work.weights_t, net)

    def _forward(self, data, workspace, start, nrows, backward, net):
        # forward_backward over the workspace's region plan; 1 / the rows'
        # total weight scales the output deltas: only backward needs it
        inv_total = self.dtype.type(0.0)
        if backward:
            # (every row weighs 1 where the weights are empty: buffers.row_weight)
            total = (data.sample_weight[data.idx[start:start + nrows]].sum()
                     if data.sample_weight.size else nrows)
            inv_total = self.dtype.type(1.0 / total)
        threads = numba.get_num_threads()
        with parallel_launch_guard():
            run_regions(workspace.work, net, data, start, nrows, inv_total, backward, 0, threads,
                        workspace.plan(net, threads, backward))

    def check_targets(self, y, n_samples, name="y"):
        """y as the kernels take it for this model's head (see heads.py)."""
        return check_targets(self.output, y, n_samples, self.n_outputs, self.dtype, name)

    def _forward_all(self, X, y, outputs=None):
        """(loss sum, score sum) over X (targets y, checked), in batches of
        PREDICT_BATCH rows; fills outputs if given."""
        n = X.shape[0]
        workspace = self._inference_workspace(min(n, PREDICT_BATCH))
        workspace.work.target_scale[:] = target_scale(self.output, y, self.n_outputs, self.dtype)
        data = make_data(X, y, np.ones(n, self.dtype), np.arange(n, dtype=np.int64), self.dtype)
        net = self.network()
        loss, score = 0.0, 0.0
        self._transpose(workspace, net)
        for start in range(0, n, workspace.batch_size):
            nrows = min(workspace.batch_size, n - start)
            self._forward(data, workspace, start, nrows, False, net)
            loss += workspace.row_stats[:nrows, 0].sum()
            score += workspace.row_stats[:nrows, 1].sum()
            if outputs is not None:
                outputs[start:start + nrows] = workspace.output[:nrows]
        if workspace.nbytes <= KEEP_WORKSPACE_BYTES:
            self._idle_workspace = workspace
        return loss, score

    def _inference_workspace(self, rows):
        # a forward-only workspace for batches of `rows` rows: the one the
        # last call kept if it fits, else a new one. Each call takes the kept
        # one away while it runs, so threads that predict at once never share.
        workspace = self.__dict__.pop("_idle_workspace", None)
        if workspace is None or workspace.batch_size != rows:
            workspace = Workspace(self.layer_sizes, rows, self.dtype, backward=False, amx=self.amx)
        return workspace

    def prediction_ready(self):
        """Whether predict, predict_proba and evaluate run without compiling:
        their kernels are loaded, or in the disk cache for this CPU (the
        first call of a model dtype compiles them otherwise, for about 40 s)."""
        workspace = Workspace(self.layer_sizes, 1, self.dtype, backward=False, amx=self.amx)
        X = np.zeros((1, self.n_features), self.dtype)
        data = make_data(X, self._no_targets(1), np.ones(1, self.dtype),
                         np.arange(1, dtype=np.int64), self.dtype)
        # the arguments' types as _transpose and _forward pass them
        return (jit.ready(transpose_weights, (workspace.work.weights_t, self.network())) and
                jit.ready(region, (workspace.work, self.network(), data, 0, 1,
                                   self.dtype.type(0.0), False, 0, numba.get_num_threads(),
                                   np.zeros(PLAN_WIDTH, np.int64))))  # a plan row

    def _no_targets(self, n):
        # targets for n rows that are only predicted: zeros of the head's kind
        if self.output == "softmax":
            return np.zeros(n, np.int32)
        return np.zeros((n, self.n_outputs), self.dtype)

    def _outputs(self, X):
        X = check_X(X, self.n_features)
        outputs = np.empty((X.shape[0], self.n_outputs), self.dtype)
        self._forward_all(X, self._no_targets(X.shape[0]), outputs)
        return outputs

    def predict_proba(self, X):
        """softmax: class probabilities (n_samples, n_classes); sigmoid: each
        label's probability (n_samples, n_labels)."""
        if self.output in VALUE_HEADS:
            raise ValueError(f"a regression model (output={self.output!r}) has no "
                             "probabilities; use predict")
        return self._outputs(X)

    def predict(self, X):
        """softmax: the most probable class of each row; linear, poisson: the
        predicted values, (n,) or (n, k) like the targets fit saw; sigmoid:
        a 0/1 matrix, each label present where its probability is >= 0.5."""
        return predictions(self.output, self._outputs(X), self.flat_targets)

    def evaluate(self, X, y):
        """(loss, score): the mean loss (cross-entropy, squared error or
        binary cross-entropy) and the head's metric (accuracy; R² averaged
        over outputs, as sklearn.metrics.r2_score; subset accuracy)."""
        X = check_X(X, self.n_features)
        y = self.check_targets(y, X.shape[0])
        loss, score_sum = self._forward_all(X, y)
        return float(loss / X.shape[0]), float(score(self.output, score_sum, X.shape[0]))

    def gradients(self, X, y, sample_weight=None):
        """(loss, dweights, dbiases): the head's mean loss over the batch X,
        y (weighted by sample_weight, if given) and its exact gradients, from
        the same kernels training runs."""
        X = check_X(X, self.n_features)
        y = self.check_targets(y, X.shape[0])
        n = X.shape[0]
        sample_weight = check_sample_weight(sample_weight, n, self.dtype)
        workspace = Workspace(self.layer_sizes, n, self.dtype, amx=self.amx)
        grads = aligned_zeros(self.params.size, self.dtype)
        net = self.network()
        self._transpose(workspace, net)
        data = make_data(X, y, sample_weight, np.arange(n, dtype=np.int64), self.dtype)
        self._forward(data, workspace, 0, n, True, net)
        optimizer = gradients_only(grads)
        gradients_update(workspace.work, net, optimizer, n, True, False,
                         numba.get_num_threads())
        loss = float(workspace.row_stats[:n, 0].sum() / sample_weight.sum())
        dweights, dbiases = self.layer_views(grads)
        return loss, dweights, dbiases
