"""fit: validates once, allocates once, then runs each epoch as one call into
compiled code (`step.train_steps`)."""
import contextlib
import time

import numba
import numpy as np

from .optimizers import DEFAULT_LR, OPTIMIZERS, make_hyper
from .model import Workspace
from .step import train_steps
from .validation import check_choice, check_float, check_int, check_Xy, input_scale

SAMPLINGS = ("epoch", "replacement")


class History:
    """Per-epoch metrics, Keras style: `history` maps 'loss', 'accuracy',
    'val_loss', 'val_accuracy' (with validation data) and 'epoch_time' to
    lists with one value per epoch. `compile_time` is the JIT compilation
    time of this fit (near zero when Numba's cache is warm), kept out of
    epoch_time."""

    def __init__(self):
        self.history = {"loss": [], "accuracy": [], "epoch_time": []}
        self.epoch = []
        self.compile_time = 0.0

    def __repr__(self):
        last = {k: v[-1] for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


class OptimizerState:
    """Optimizer name, hyperparameters and flat state vectors mirroring the
    model's params; kept on the model so that a second fit continues."""

    def __init__(self, name, dtype, n_params, lr, momentum, nesterov, weight_decay):
        self.name = name
        self.code = OPTIMIZERS[name]
        self.nesterov = nesterov
        self.hyper = make_hyper(dtype, lr, momentum, weight_decay)
        n_state = {"sgd": (0, 0), "momentum": (n_params, 0), "adam": (n_params, n_params)}[name]
        self.state1 = np.zeros(n_state[0], dtype)
        self.state2 = np.zeros(n_state[1], dtype)
        self.updates = 0  # updates done so far (Adam's t)
        self.settings = (lr, momentum, nesterov, weight_decay)


@contextlib.contextmanager
def thread_count(threads):
    if threads is None:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def fit(model, X, y, epochs=1, batch_size=100, optimizer="sgd", lr=None, momentum=0.9,
        nesterov=False, weight_decay=0.0, shuffle=True, sampling="epoch",
        validation_data=None, seed=None, threads=None, verbose=0):
    """Train `model` in place and return a History.

    X: (n, features) uint8 pixels (scaled by 1/255 while gathered, never
    copied) or float32/float64 (used as is); y: integer labels. Each epoch
    takes ceil(n / batch_size) steps; the last, partial batch is trained on.
    shuffle=False takes rows in order; sampling="replacement" draws every
    row of every batch uniformly with replacement (the classic lesson's
    np.random.choice). lr=None takes the optimizer's Keras default.
    A second fit with the same optimizer settings continues its state.
    """
    X, y = check_Xy(X, y, model.n_features, model.n_classes)
    epochs = check_int("epochs", epochs, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("sampling", sampling, SAMPLINGS)
    lr = DEFAULT_LR[optimizer] if lr is None else check_float("lr", lr, minimum=0.0)
    momentum = check_float("momentum", momentum, minimum=0.0, maximum=1.0)
    weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)
    max_threads = numba.config.NUMBA_NUM_THREADS
    threads = check_int("threads", threads, minimum=1, allow_none=True)
    if threads is not None and threads > max_threads:
        raise ValueError(f"threads must be <= {max_threads} (NUMBA_NUM_THREADS), got {threads}")
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("validation_data must be a pair (X_val, y_val)")
        X_val, y_val = check_Xy(*validation_data, model.n_features, model.n_classes,
                                names=("validation X", "validation y"))

    state = model.optimizer_state
    settings = (lr, momentum, bool(nesterov), weight_decay)
    if state is None or state.name != optimizer or state.settings != settings:
        state = OptimizerState(optimizer, model.dtype, model.n_params, *settings)
        model.optimizer_state = state

    n = X.shape[0]
    batch_size = min(batch_size, n)
    n_steps = -(-n // batch_size)
    workspace = Workspace(model.layer_sizes, batch_size, model.dtype)
    grads = np.zeros_like(model.params)
    idx = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    scale = input_scale(X, model.dtype)
    history = History()

    def run(step0, step1):
        return train_steps(model.params, grads, state.state1, state.state2, workspace.acts,
                           workspace.deltas, workspace.labels, workspace.chunk_stats, X, y,
                           idx, n, step0, step1, state.updates, scale, model._sizes,
                           model.w_off, model.b_off, workspace.act_off, model._tasks,
                           model.activation_code, state.code, state.hyper, state.nesterov)

    with thread_count(threads):
        start = time.perf_counter()
        run(0, 0)  # compiles (or loads from cache) without training
        history.compile_time = time.perf_counter() - start
        for epoch in range(epochs):
            if sampling == "replacement":
                idx[:] = rng.integers(0, n, size=n)
            elif shuffle:
                rng.shuffle(idx)
            start = time.perf_counter()
            loss_sum, correct = run(0, n_steps)
            elapsed = time.perf_counter() - start
            state.updates += n_steps
            history.epoch.append(epoch)
            history.history["loss"].append(loss_sum / n)
            history.history["accuracy"].append(correct / n)
            history.history["epoch_time"].append(elapsed)
            if validation_data is not None:
                val_loss, val_accuracy = model.evaluate(X_val, y_val)
                history.history.setdefault("val_loss", []).append(val_loss)
                history.history.setdefault("val_accuracy", []).append(val_accuracy)
            if verbose:
                metrics = " - ".join(f"{k}: {v[-1]:.4f}" for k, v in history.history.items()
                                     if k != "epoch_time")
                print(f"Epoch {epoch + 1}/{epochs} - {elapsed:.2f}s - {metrics}", flush=True)
    return history
