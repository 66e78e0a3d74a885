"""fit: validates once, allocates once, then runs each epoch as a few calls
into compiled code (`step.train_steps`), each many steps long."""
import contextlib
import mmap
import platform
import signal
import threading
import time

import numba
import numpy as np

from . import compile_ahead, distributed, jit, schedules
from .buffers import PLAIN, STREAMED, Optimizer, make_data
from .cores import cpu_quota
from .heads import VALUE_HEADS, score, target_scale
from .history import History
from .model import Workspace, aligned_zeros
from .state import OptimizerState, TrainingState
from .optimizers import ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, DEFAULT_LR, LR, OPTIMIZERS
from .progress import Callback, CompileNotice, ProgressPrinter
from .step import (
    INTERRUPT_ASKED,
    INTERRUPTED,
    LOSS_NOT_FINITE,
    PARAMS_NOT_FINITE,
    REDUCE_ERROR,
    REDUCE_FAILED,
    REDUCE_SECONDS,
    STEPS_DONE,
    TAIL,
    train_steps,
)
from .validation import (
    check_adam,
    check_choice,
    check_float,
    check_int,
    check_sample_weight,
    check_X,
)

SAMPLINGS = ("epoch", "replacement")
CALLBACK_METHODS = [name for name in vars(Callback) if name.startswith("on_")]
# An epoch runs as calls into compiled code of about CHUNK_SECONDS each (and
# at least CHUNKS_PER_EPOCH of them; one, if the epoch is shorter than
# CHUNK_SECONDS): progress, Ctrl-C and a memory map's page release act
# between two calls. A call costs some 50 us more than its steps (its
# arguments, the transposed weights made again, a first batch not
# prefetched): with 50 calls an epoch, chunks of 16 steps of 0.26 ms made the
# MLPRegressor benchmark's fit 1.04x slower than chunks of a whole epoch.
CHUNKS_PER_EPOCH = 4
CHUNK_SECONDS = 0.05
# With a memory-mapped X, the pages a chunk touched are released after it:
# a chunk reads at most this many rows, which bounds the resident set. (The
# kernel may map a whole large folio of page cache, up to megabytes, for one
# row read at random, so the bound has to be in rows, and small.)
MAPPED_CHUNK_ROWS = 256


@contextlib.contextmanager
def thread_count(threads):
    # Numba's thread count set to `threads` (if given) inside, restored after
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


# fit without `threads` times PROBE_ROUNDS rounds of runs of PROBE_STEPS
# steps on each count of thread_ladder (EpochLoop.fastest_threads); a count
# whose steps take longer than PROBE_RUN_SECONDS / PROBE_STEPS runs fewer,
# at least one (W3's 3 ms steps: one a run; its probe took 41-74 ms, 3-5%
# of an epoch)
PROBE_STEPS = 16
PROBE_ROUNDS = 3
PROBE_RUN_SECONDS = 0.0025
# fewer threads than all are kept only when their median step is at least
# this much faster than all threads'
FEWER_THREADS_GAIN = 1.05


# fit without `threads` keeps, for each count the probe timed, the seconds
# a step of its last whole epoch (the probe's until it has run one) and
# trains each epoch on the count fastest_count picks from them (ThreadChoice).
# A process that takes a core makes two threads' spin barriers wait for one
# that is not running: beside a busy loop the regression benchmark's epochs
# took 0.2-0.8 s on two threads, 0.11 alone, while a probe's short runs
# (PROBE_RUN_SECONDS) may still time two threads faster. A count above the
# current one is tried again for an epoch, since its time may date from a
# process that has left (or a moment the host kept the CPUs apart): once
# what that epoch would cost over one on the current count, at the times
# known, is at most RETRY_SHARE of the training since the count last ran,
# and at the latest after RETRY_SECONDS of it, so that retries cost at
# most that share. A count a tenth slower gets an epoch again after about
# 3; the regression benchmark's 2 threads beside a busy loop (epochs of
# 0.2-0.8 s against 0.11) after 3-23 s. (A compare.py turn of bfloat16 W3
# on Zen 4 kept the probe's 1 thread, 1.1x faster while the host kept the
# CPUs apart, for all its 6 epochs of 1 s, where 2 threads ran 1.8x
# faster minutes later.)
RETRY_SECONDS = 30.0
RETRY_SHARE = 0.03


class ThreadChoice:
    """fit's thread count, epoch by epoch, when it was given none (see
    RETRY_SECONDS and RETRY_SHARE). probe_times: {count: seconds a step};
    count: the probe's pick."""

    def __init__(self, probe_times, count):
        self.times = dict(probe_times)
        self.count = count
        self.trained = 0.0  # seconds of training so far
        self.last_run = {count: 0.0 for count in self.times}  # `trained` when each last ran

    def after_epoch(self, steps, seconds):
        """The count for the next epoch, after one of `steps` steps in
        `seconds` on the current count."""
        self.trained += seconds
        if steps:
            self.times[self.count] = seconds / steps
            self.last_run[self.count] = self.trained
        above = [count for count in self.times if count > self.count]
        stale = min(above, key=self.last_run.get, default=None)
        if (stale is not None
                and self.trained - self.last_run[stale] >= self.retry_wait(stale, steps)):
            self.count = stale
        else:
            self.count = fastest_count({count: [time] for count, time in self.times.items()})
        return self.count

    def retry_wait(self, count, steps):
        """The seconds of training after which `count` gets an epoch again
        (see RETRY_SHARE), epochs being of `steps` steps: RETRY_SECONDS
        unless its last time was slower than the current count's (if it
        was faster, fastest_count picks it anyway)."""
        extra = steps * (self.times[count] - self.times[self.count])
        if extra <= 0:
            return RETRY_SECONDS
        return min(RETRY_SECONDS, extra / RETRY_SHARE)


def thread_ladder(every):
    """The thread counts fit's probe times: every (Numba's count), then the
    powers of two below it, down to 1. Where Numba starts more threads than
    the process gets cores (a container's CPU quota, a shared host), the
    step's spin barriers wait for threads that are not running: on a 2-core
    Zen 3 with 8 Numba threads, W1 took 654 us a step on 8 threads, 366 on
    4, 165 on 2 and 260 on 1 (measured; docs/performance.md)."""
    counts = [every]
    while counts[-1] > 1:
        counts.append(1 << ((counts[-1] - 1).bit_length() - 1))  # the power of two below
    return counts


def fastest_count(times, gain=None):
    """The thread count to train on from the probe's times {count: [seconds
    a step, by run]}: the count of the lowest median, if it beats the largest
    count's median by `gain` (FEWER_THREADS_GAIN), else the largest."""
    gain = FEWER_THREADS_GAIN if gain is None else gain
    medians = {count: float(np.median(seconds)) for count, seconds in times.items()}
    every = max(medians)
    best = min(medians, key=lambda count: (medians[count], -count))
    return best if medians[best] * gain < medians[every] else every


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) sets a flag instead of raising at a random point; fit
    checks it between chunks of steps, when the model and its optimizer and
    training state agree, and raises TrainingInterrupted there. Only in the
    main thread (elsewhere signals cannot be handled)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def epochs_done_on_interrupt(history, stopper):
    """A TrainingInterrupted that leaves fit carries the epochs completed
    (history) and, for early stopping that restores them, the best
    epoch's parameters (or None)."""
    try:
        yield
    except TrainingInterrupted as stop:
        stop.history = history
        stop.best_params = (stopper.best_params if stopper is not None and
                            stopper.best_epoch is not None else None)
        raise


def epoch_order(idx, rng, n, shuffle, sampling):
    """Fills idx with the epoch's rows in training order, drawn from rng."""
    if sampling == "replacement":
        idx[:] = rng.integers(0, n, size=n)
    elif shuffle:
        idx[:] = rng.permutation(n)
    else:
        idx[:] = np.arange(n)


def fit(model, X, y, epochs=1, batch_size=100, optimizer="sgd", lr=None, momentum=0.9,
        nesterov=False, weight_decay=0.0, shuffle=True, sampling="epoch",
        validation_data=None, seed=None, threads=None, verbose=0, callbacks=(),
        sample_weight=None, patience=None, min_delta=0.0, monitor=None,
        restore_best_weights=True, comm=None, lr_schedule=None, beta_1=ADAM_BETA1,
        beta_2=ADAM_BETA2, epsilon=ADAM_EPSILON, validation_split=0.0, class_weight=None):
    """Train `model` in place and return a History.

    X: (n, features) uint8 pixels (scaled by 1/255 while gathered, never
    copied) or float32/float64 (used as is); y: the head's targets, integer
    labels (softmax), floats (n,) or (n, K) (linear) or a 0/1 (n, K) matrix
    (sigmoid). Each epoch
    takes ceil(n / batch_size) steps; the last, partial batch is trained on.
    shuffle=False takes rows in order; sampling="replacement" draws every
    row of every batch uniformly with replacement (the classic lesson's
    np.random.choice). lr=None takes the optimizer's Keras default.
    sample_weight: one non-negative weight per row; each step then minimises
    its batch's weighted mean loss (and History's loss is weighted too).
    class_weight (softmax): {label: weight} (labels left out weigh 1) or
    "balanced" (n / (classes x the class's rows), scikit-learn's, over the
    rows trained on), which multiplies each row's sample weight, as in Keras.
    validation_split: as Keras's, the last fraction of the rows (before any
    shuffling) is held out as validation_data instead of trained on.

    A second fit continues where the first stopped: the optimizer state
    (when its settings are the same) and, unless a seed is given, the
    shuffling generator; an interrupted epoch is finished first, in the same
    row order, and counts as one of `epochs`. Ctrl-C stops after the current
    chunk of steps with everything consistent, then raises TrainingInterrupted
    (a KeyboardInterrupt).
    callbacks: fastmlp.progress.Callback objects; verbose=1 adds a
    Keras-style ProgressPrinter. Without one, a fit that must compile the
    kernels first says so on stderr (progress.CompileNotice).

    Early stopping: with patience=N, training stops once `monitor` (default
    'val_loss' with validation data, else 'loss'; also the head's metric,
    'accuracy' or 'r2', or 'val_' and the metric) has not improved by more
    than min_delta for N epochs in a row; with restore_best_weights the
    model then gets the parameters of its best epoch back (also when all
    epochs ran). History.best_epoch and History.stopped_epoch tell what
    happened.

    lr_schedule: "constant", "step", "cosine", "plateau", a
    fastmlp.schedules.Step, Cosine or Plateau, or a callable epoch -> lr
    (see fastmlp.schedules); None keeps the schedule the model's optimizer
    state has (constant for a new one).
    History records each epoch's starting lr under 'lr'.

    beta_1, beta_2, epsilon: Adam's constants, Keras's defaults (scikit-learn's
    epsilon is 1e-8).

    comm: an mpi4py communicator (e.g. MPI.COMM_WORLD) for data-parallel
    training: every rank calls fit with the same data and settings, trains
    its shard of every batch and takes part in one Allreduce per step (see
    fastmlp.distributed); the result is that of one process with the same
    batch_size. Rank 0's model and training state are broadcast first;
    threads default to the cores each rank has to itself; only rank 0 shows
    progress with verbose=1 (callbacks run on every rank).
    """
    X = check_X(X, model.n_features)
    flat_targets = np.ndim(y) == 1
    y = model.check_targets(y, X.shape[0])
    sample_weight = check_sample_weight(sample_weight, X.shape[0], model.dtype)
    X, y, sample_weight, validation_data = training_rows(
        model, X, y, sample_weight, class_weight, validation_split, validation_data)
    epochs = check_int("epochs", epochs, minimum=0)
    batch_size = min(check_int("batch_size", batch_size, minimum=1), X.shape[0])
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("sampling", sampling, SAMPLINGS)
    lr = DEFAULT_LR[optimizer] if lr is None else check_float("lr", lr, minimum=0.0)
    settings = (lr, check_float("momentum", momentum, minimum=0.0, maximum=1.0),
                bool(nesterov), check_float("weight_decay", weight_decay, minimum=0.0),
                *check_adam(beta_1, beta_2, epsilon))
    threads = check_threads(threads)
    validation = check_validation(model, validation_data)
    callbacks = check_callbacks(callbacks)
    if comm is None or comm.rank == 0:
        if verbose:
            callbacks.append(ProgressPrinter())
        elif not any(isinstance(callback, ProgressPrinter) for callback in callbacks):
            callbacks.append(CompileNotice())
    stopper = early_stopping(model, patience, monitor, min_delta, restore_best_weights,
                             validation is not None)

    state = optimizer_state(model, optimizer, settings, lr_schedule)
    if seed is not None or model.training_state is None:
        model.training_state = TrainingState(seed)
    if comm is not None:
        threads = join_ranks(comm, model, y, sample_weight, threads, dict(
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, settings=settings,
            shuffle=bool(shuffle), sampling=sampling, validation=validation is not None,
            patience=patience, monitor=stopper.monitor if stopper else None))
    if model.output in VALUE_HEADS:
        model.flat_targets = flat_targets
    if isinstance(state.schedule, schedules.Cosine):
        state.schedule.start(epochs, -(-X.shape[0] // batch_size), state.updates)
    if isinstance(state.schedule, schedules.Plateau):
        plateau_monitor(model, state.schedule, validation is not None)
    loop = EpochLoop(model, state, X, y, sample_weight, batch_size, shuffle, sampling, comm)
    history = History(model.metric)

    with thread_count(threads), deferred_interrupt() as interrupt, \
            epochs_done_on_interrupt(history, stopper):
        history.compile_time = loop.compile(callbacks, interrupt)
        choice = None
        if threads is None and comm is None:
            count, probe_times = loop.fastest_threads()
            numba.set_num_threads(count)
            if probe_times is not None:
                choice = ThreadChoice(probe_times, count)
        history.threads = numba.get_num_threads()
        total_epochs = model.training_state.epoch + epochs
        for callback in callbacks:
            callback.on_train_begin(history.compile_time)
        for epoch_index in range(epochs):
            logs, done = loop.epoch(callbacks, total_epochs, interrupt)
            epoch = model.training_state.epoch - 1
            record_epoch(history, model, epoch, logs, loop.elapsed, validation)
            if isinstance(state.schedule, schedules.Plateau):
                state.schedule.end_epoch(loop.lr, logs)
            asked = [callback.on_epoch_end(epoch, done, loop.elapsed, logs)
                     for callback in callbacks]
            if any(asked) or (stopper is not None and stopper.should_stop(epoch, logs)):
                history.stopped_epoch = epoch
                break
            if choice is not None and epoch_index + 1 < epochs:
                numba.set_num_threads(choice.after_epoch(done, loop.elapsed))
                history.threads = numba.get_num_threads()
        if stopper is not None:
            history.best_epoch = stopper.finish()
        if comm is not None:
            history.allreduce_time = float(loop.batches.tally[REDUCE_SECONDS])
            history.allreduce_steps = loop.steps
        if interrupt[loop.stop_key]:  # arrived after the last chunk
            raise TrainingInterrupted
    return history


def training_rows(model, X, y, sample_weight, class_weight, validation_split,
                  validation_data):
    """(X, y, sample_weight, validation_data) after validation_split and
    class_weight (on the rows trained on): Keras's ways to hold out and
    weigh rows."""
    if validation_split:
        X, y, sample_weight, validation_data = split_validation(
            X, y, sample_weight, validation_split, validation_data)
    if class_weight is not None:
        sample_weight = sample_weight * class_weights(model, y, class_weight)[y]
    if (validation_split or class_weight is not None) and not sample_weight.sum() > 0:
        raise ValueError("the training rows' weights sum to zero: nothing to learn from")
    return X, y, sample_weight, validation_data


def class_weights(model, y, class_weight):
    """Each class's weight (model dtype) for fit's class_weight; y holds the
    checked labels."""
    if model.output != "softmax":
        raise ValueError(f"class_weight weighs classes: this model's output is {model.output}")
    n_classes = model.n_outputs
    if isinstance(class_weight, str):
        check_choice("class_weight", class_weight, ("balanced",))
        return balanced_class_weights(y, n_classes).astype(model.dtype)
    if not isinstance(class_weight, dict):
        raise ValueError("class_weight must be a dict {label: weight} or 'balanced', got "
                         f"{type(class_weight).__name__}")
    weights = np.ones(n_classes)
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                or not 0 <= label < n_classes:
            raise ValueError(f"class_weight has label {label!r}; the model's labels are "
                             f"0..{n_classes - 1}")
        weights[label] = check_float(f"class_weight[{label}]", weight, minimum=0.0)
    return weights.astype(model.dtype)


def balanced_class_weights(labels, n_classes):
    """Each class's weight n / (classes present x its rows), as scikit-learn's
    compute_sample_weight("balanced"); 0 for a class with no rows."""
    counts = np.bincount(labels, minlength=n_classes)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def split_validation(X, y, sample_weight, validation_split, validation_data):
    """(X, y, sample_weight, validation_data) with the last validation_split
    of the rows held out, as Keras's fit does."""
    split = check_float("validation_split", validation_split, minimum=0.0)
    if not split < 1:
        raise ValueError(f"validation_split must be < 1, got {validation_split!r}")
    if validation_data is not None:
        raise ValueError("give validation_data or validation_split, not both")
    cut = int(X.shape[0] * (1 - split))
    if cut < 1 or cut == X.shape[0]:
        raise ValueError(f"validation_split={validation_split} of {X.shape[0]} rows leaves "
                         f"{'no rows to train on' if cut < 1 else 'no rows to validate on'}")
    # the held-out targets as checked (check_validation takes that form too)
    return X[:cut], y[:cut], sample_weight[:cut], (X[cut:], y[cut:])


def check_threads(threads):
    max_threads = numba.config.NUMBA_NUM_THREADS
    threads = check_int("threads", threads, minimum=1, allow_none=True)
    if threads is not None and threads > max_threads:
        raise ValueError(f"threads must be <= {max_threads} (NUMBA_NUM_THREADS), got {threads}")
    return threads


def check_callbacks(callbacks):
    """callbacks as a list, each with every method of progress.Callback."""
    callbacks = list(callbacks)
    for callback in callbacks:
        missing = [name for name in CALLBACK_METHODS
                   if not callable(getattr(callback, name, None))]
        if missing:
            raise TypeError(
                f"callbacks must be fastmlp.progress.Callback objects; {callback!r} has no "
                f"{', '.join(missing)} (subclass Callback and override the methods you need; "
                "its methods take other arguments than Keras's)")
    return callbacks


def check_validation(model, validation_data):
    """(X_val, y_val) checked for the model, or None."""
    if validation_data is None:
        return None
    if len(validation_data) != 2:
        raise ValueError("validation_data must be a pair (X_val, y_val)")
    X_val = check_X(validation_data[0], model.n_features, "validation X")
    return X_val, model.check_targets(validation_data[1], X_val.shape[0], "validation y")


def early_stopping(model, patience, monitor, min_delta, restore_best_weights, validating):
    """fit's EarlyStopping, or None without patience."""
    if patience is None:
        return None
    monitor = monitor or ("val_loss" if validating else "loss")
    check_choice("monitor", monitor, monitors(model.metric))
    if monitor.startswith("val_") and not validating:
        raise ValueError(f"monitor={monitor!r} needs validation_data")
    return EarlyStopping(model, check_int("patience", patience, minimum=1), monitor,
                         check_float("min_delta", min_delta, minimum=0.0),
                         bool(restore_best_weights))


def plateau_monitor(model, schedule, validating):
    """Fixes and checks the metric a Plateau schedule watches, as early
    stopping's."""
    schedule.start("val_loss" if validating else "loss")
    check_choice("Plateau monitor", schedule.monitor, monitors(model.metric))
    if schedule.monitor.startswith("val_") and not validating:
        raise ValueError(f"the Plateau schedule watches {schedule.monitor!r}, which needs "
                         "validation_data")


def optimizer_state(model, optimizer, settings, lr_schedule):
    """The model's optimizer state, kept when the settings are the same (a
    second fit continues), with the schedule that fit asks for."""
    state = model.optimizer_state
    if state is None or state.name != optimizer or state.settings != settings:
        state = OptimizerState(optimizer, model.dtype, model.n_params, *settings)
        model.optimizer_state = state
    if lr_schedule is not None:
        state.schedule = schedules.make(lr_schedule)
    elif state.schedule == "callable":
        raise ValueError("the model was trained with a callable lr_schedule, which model files "
                         "cannot hold: pass it again")
    return state


def join_ranks(comm, model, y, sample_weight, threads, settings):
    """With MPI: checks that every rank runs the same job, gives every rank
    rank 0's state, and returns the threads of this rank."""
    distributed.check_same_job(comm, dict(
        rows=len(y), layer_sizes=list(model.layer_sizes), activation=model.activation,
        dtype=model.dtype.name, output=model.output, labels=distributed.data_digest(y),
        weighted=bool(np.any(sample_weight != 1)), **settings))
    distributed.broadcast_state(comm, model)
    if threads is None:
        threads = min(numba.config.NUMBA_NUM_THREADS, distributed.rank_threads(comm))
    return threads


def record_epoch(history, model, epoch, logs, elapsed, validation):
    """Appends the epoch's metrics to history (and the validation ones to logs)."""
    history.epoch.append(epoch)
    history.history["loss"].append(float(logs["loss"]))
    history.history[model.metric].append(float(logs[model.metric]))
    history.history["epoch_time"].append(elapsed)
    history.history["lr"].append(logs.pop("lr"))
    if validation is not None:
        for key, value in zip(("val_loss", f"val_{model.metric}"), model.evaluate(*validation)):
            logs[key] = float(value)
            history.history.setdefault(key, []).append(float(value))


# How an update writes the transposed weights that the other threads read
# next (work.exchange): plain stores leave each line in this core's cache,
# where the other core's next read leaves a copy, so this core's next write
# must take the line back from it first; non-temporal stores
# (kernels.transposed_panels_streamed) send the lines to memory, where
# every core then reads them, this one too. Near cores gain nothing by it
# (the float64 regression step 1.03x as long streamed, float32 1.06x), far
# ones much (0.83x, 0.95x; 2-core Zen 4 guest, docs/performance.md). So
# fit measures: every EXCHANGE_TRY_EVERY-th call (one of EXCHANGE_MIN_STEPS
# steps or more) runs the form it does not use, and each call after runs
# the faster of the two by their last seconds a step (a change of form
# only for one EXCHANGE_GAIN faster). One thread reads only its own
# weights: plain; so do MPI ranks, and machines other than X86 (where
# kernels.store_fence orders nothing).
EXCHANGE_TRY_EVERY = 8
EXCHANGE_MIN_STEPS = 16
EXCHANGE_GAIN = 1.02
X86 = ("x86_64", "amd64", "i386", "i686")


def other_form(form):
    """STREAMED for PLAIN, PLAIN for STREAMED (work.exchange)."""
    return STREAMED if form == PLAIN else PLAIN


class ExchangeChoice:
    """fit's choice of work.exchange (PLAIN or STREAMED), call by call, for
    each thread count (see EXCHANGE_TRY_EVERY); PLAIN throughout unless
    `enabled`."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.times = {}  # {(threads, form): seconds a step of its last call}
        self.current = {}  # {threads: the form in use}
        self.calls = 0

    def next_form(self, threads, steps):
        """The form for a call of `steps` steps on `threads` threads."""
        if threads < 2 or not self.enabled:
            return PLAIN
        current = self.current.setdefault(threads, PLAIN)
        if steps < EXCHANGE_MIN_STEPS:
            return current
        self.calls += 1
        other = other_form(current)
        if (threads, current) in self.times and (
                (threads, other) not in self.times or self.calls % EXCHANGE_TRY_EVERY == 0):
            return other
        return current

    def record(self, threads, form, steps, seconds):
        """A call's time: the form in use from now on is the faster (the
        other only if EXCHANGE_GAIN faster)."""
        if threads < 2 or not self.enabled or steps < EXCHANGE_MIN_STEPS:
            return
        self.times[threads, form] = seconds / steps
        current = self.current.setdefault(threads, PLAIN)
        other = other_form(current)
        if ((threads, other) in self.times and (threads, current) in self.times
                and self.times[threads, other] * EXCHANGE_GAIN < self.times[threads, current]):
            self.current[threads] = other


class EpochLoop:
    """fit's training loop: the workspace and buffers of one fit, its compile,
    and its epochs run as calls into compiled code of about CHUNK_SECONDS
    each (`step.train_steps`, with MPI too)."""

    def __init__(self, model, state, X, y, sample_weight, batch_size, shuffle, sampling, comm):
        self.model, self.state, self.comm = model, state, comm
        self.progress = model.training_state
        self.shuffle, self.sampling, self.batch_size = shuffle, sampling, batch_size
        self.n = n = X.shape[0]
        self.n_steps = -(-n // batch_size)
        self.progress.batch_size = batch_size
        if self.progress.step >= self.n_steps:
            raise ValueError(f"the model stopped at step {self.progress.step} of an epoch, but "
                             f"this data and batch_size give epochs of {self.n_steps} steps")
        self.max_chunk = -(-self.n_steps // CHUNKS_PER_EPOCH)
        self.whole_epoch = self.n_steps
        ranks = 1 if comm is None else comm.size
        self.workspace = Workspace(model.layer_sizes, -(-batch_size // ranks), model.dtype,
                                   amx=model.amx, input_bytes=X.itemsize)
        self.workspace.work.target_scale[:] = target_scale(model.output, y, model.n_outputs,
                                                           model.dtype)
        # with MPI, the step's loss, score and interrupt flag travel behind
        # the gradients in the one Allreduce
        grads = aligned_zeros(model.n_params + (0 if comm is None else TAIL),
                              model.dtype)
        self.idx = np.empty(n, dtype=np.int64)
        self.data = make_data(X, y, sample_weight, self.idx, model.dtype)
        self.lr = state.settings[0]
        self.buffers = Optimizer(grads, state.state1, state.state2, state.hyper, state.code,
                                 state.nesterov, schedules.kernel_state(state.schedule, self.lr),
                                 state.betas)
        self.batches = (distributed.local_batches(batch_size, model.dtype) if comm is None else
                        distributed.mpi_batches(comm, batch_size, model.dtype, model.n_params))
        self.steps = 0  # steps run (History.allreduce_steps with MPI)
        self.mapping = mapped_file(X)
        if self.mapping is not None:
            # random rows: no read-ahead, so that a chunk makes resident little
            # more than the pages of its own rows
            self.mapping.madvise(mmap.MADV_SEQUENTIAL if not shuffle and sampling == "epoch"
                                 else mmap.MADV_RANDOM)
            self.max_chunk = max(1, min(self.max_chunk, MAPPED_CHUNK_ROWS // batch_size))
            self.whole_epoch = self.max_chunk
        # where a diverged epoch is replayed from (costs a copy per epoch)
        self.saved = [np.empty_like(a) for a in (model.params, state.state1, state.state2)]
        self.elapsed = 0.0
        self.chunk = 1  # steps in the next call: then as many as take about CHUNK_SECONDS
        self.exchange = ExchangeChoice(comm is None and platform.machine().lower() in X86)

    def next_chunk(self, per_step):
        """Steps in the next call: a whole epoch when one takes less than
        CHUNK_SECONDS (a call costs some 50 us: MLPClassifier fits of the
        digits, 9 steps an epoch, took 1.07x as long in 3 calls an epoch),
        else about CHUNK_SECONDS' worth, in at least CHUNKS_PER_EPOCH calls
        an epoch."""
        if per_step * self.n_steps < CHUNK_SECONDS:
            return self.whole_epoch
        return int(min(self.max_chunk, max(1, CHUNK_SECONDS / max(per_step, 1e-9))))

    def step_arguments(self, step0, step1):
        return (self.workspace.work, self.model.network(), self.buffers, self.data, self.batches,
                step0, step1, self.state.updates, numba.get_num_threads())

    def fastest_threads(self):
        """(The thread count to train on when fit was given none, the
        probe's median seconds a step by count or None without a probe):
        the fastest of thread_ladder's counts from every core (Numba's
        current count) in a short probe on this data (fastest_count). Small steps may run
        faster on one core than split across two (W2's batches of 32 on a
        2-core Intel Xeon: 10.46 against 9.62 epochs/s), and steps on more
        threads than the process has cores run far slower (thread_ladder).
        No value depends on the thread count, and the probe's updates are
        undone. Never more threads than the process's CPU quota (cpu_quota)."""
        every = numba.get_num_threads()
        most = min(every, cpu_quota() or every)
        if most < 2 or self.n_steps < PROBE_STEPS:
            return most, None
        state = self.state
        # kept where epoch() keeps its replay point (it copies them anew)
        live = (self.model.params, state.state1, state.state2)
        for copy, source in zip(self.saved, live):
            np.copyto(copy, source)
        hyper = state.hyper.copy()
        self.idx[:] = np.arange(self.n)  # (the first epoch orders its rows anew)
        counts = thread_ladder(most)[::-1]  # the fewest first (below)
        times = {count: [] for count in counts}
        try:
            # Every run begins with a step untimed: the first touches the
            # pages, and steps just after a change of thread count are slow.
            # Rounds run the fewest threads first: a run just after one on
            # more threads than cores is slowed down too. (With 8 Numba
            # threads on 2 cores, W1 on 2 threads stepped up to 4x slower in
            # the probe than in training; on 8 threads down to 1, the probe
            # picked 1 thread in 4 of 8 probes, where 2 threads run 1.6x
            # faster; fewest first, 2 threads in 39 of 40 probes of W1 and
            # W2, measured.)
            def seconds_a_step(threads, steps):
                numba.set_num_threads(threads)
                train_steps(*self.step_arguments(0, 1))
                start = time.perf_counter()
                train_steps(*self.step_arguments(0, steps))
                return max(time.perf_counter() - start, 1e-9) / steps

            # a count's run: its steps, from one timed step
            steps = {threads: int(min(PROBE_STEPS, max(1, PROBE_RUN_SECONDS
                                                       / seconds_a_step(threads, 1))))
                     for threads in counts}
            for _ in range(PROBE_ROUNDS):
                for threads in counts:
                    times[threads].append(seconds_a_step(threads, steps[threads]))
        finally:  # the probe's updates undone
            for live_array, copy in zip(live, self.saved):
                np.copyto(live_array, copy)
            np.copyto(state.hyper, hyper)
            numba.set_num_threads(every)
        return fastest_count(times), {count: float(np.median(runs))
                                      for count, runs in times.items()}

    def compile(self, callbacks, interrupt):
        """Compiles (or loads from the cache) without training; returns the
        seconds it took."""
        # with MPI, only an interrupt that every rank has heard of counts
        self.stop_key = "set" if self.comm is None else "agreed"
        interrupt["agreed"] = False
        self.interrupt = interrupt
        cached = jit.ready(train_steps, self.step_arguments(0, 0))
        for callback in callbacks:
            callback.on_compile_begin(cached)
        start = time.perf_counter()
        if self.comm is not None:  # collective: every rank takes part
            compile_ahead.step_kernels_on_ranks(self.comm, cached, *self.step_arguments(0, 0)[:4])
        elif not cached:
            compile_ahead.step_kernels(*self.step_arguments(0, 0)[:4])
        self.run(0, 0)
        return time.perf_counter() - start

    def run(self, step0, step1):
        """Steps step0..step1 in compiled code (train_steps' results). With
        MPI, tells the other ranks of an interrupt on this one, and returns
        STEPS_DONE at the step where the ranks agreed to stop."""
        tally = self.batches.tally
        tally[INTERRUPT_ASKED] = 1.0 if self.interrupt["set"] else 0.0
        *sums, status, at = train_steps(*self.step_arguments(step0, step1))
        self.steps += at - step0
        if status == REDUCE_FAILED:
            raise RuntimeError(f"MPI_Allreduce failed at step {at + 1} with MPI error code "
                               f"{int(tally[REDUCE_ERROR])}")
        if status == INTERRUPTED:
            self.interrupt["agreed"] = True
            status = STEPS_DONE
        return (*sums, status, at)

    def epoch(self, callbacks, total_epochs, interrupt):
        """Trains the rest of the current epoch; returns its logs (loss, the
        head's metric, lr) and the steps it ran."""
        model, state, progress = self.model, self.state, self.progress
        n, n_steps, batch_size = self.n, self.n_steps, self.batch_size
        rng = progress.generator()
        epoch_order(self.idx, rng, n, self.shuffle, self.sampling)
        epoch_lr = (self.lr if state.schedule is None
                    else state.schedule.epoch_lr(self.lr, progress.epoch))
        state.hyper[LR] = epoch_lr
        for callback in callbacks:
            callback.on_epoch_begin(progress.epoch, total_epochs, n_steps)
        first = progress.step
        for copy, source in zip(self.saved, (model.params, state.state1, state.state2)):
            np.copyto(copy, source)
        first_update = state.updates
        rows = loss_sum = weight_sum = score_sum = 0
        self.elapsed = 0.0
        step0 = first
        while step0 < n_steps:
            step1 = min(step0 + self.chunk, n_steps)
            threads = numba.get_num_threads()
            form = self.exchange.next_form(threads, step1 - step0)
            self.workspace.work.exchange[0] = form
            start = time.perf_counter()
            chunk_loss, chunk_weight, chunk_score, status, at = self.run(step0, step1)
            seconds = time.perf_counter() - start
            self.elapsed += seconds
            self.exchange.record(threads, form, at - step0, seconds)
            if status != STEPS_DONE:
                diverged(model, state, progress, self.run, self.saved, first, first_update,
                         status, at, step0, n_steps, state.name, self.lr)
            step1 = at  # sooner than asked when MPI ranks agreed to stop
            state.updates += step1 - step0
            progress.step = step1
            rows += min(step1 * batch_size, n) - step0 * batch_size
            loss_sum += chunk_loss
            weight_sum += chunk_weight
            score_sum += chunk_score
            logs = {"loss": loss_sum / weight_sum if weight_sum else 0.0,
                    model.metric: score(model.output, score_sum, rows)}
            if self.mapping is not None:  # keep only this chunk's pages resident
                self.mapping.madvise(mmap.MADV_DONTNEED)
            for callback in callbacks:
                callback.on_steps(step1, n_steps, logs)
            if interrupt[self.stop_key]:
                if step1 == n_steps:
                    end_epoch(progress, rng)
                raise TrainingInterrupted
            self.chunk = self.next_chunk(seconds / (step1 - step0))
            step0 = step1
        end_epoch(progress, rng)
        if self.comm is not None:
            distributed.check_params_agree(self.comm, model.params, progress.epoch - 1)
        logs["lr"] = epoch_lr
        return logs, n_steps - first


MONITORS = ("loss", "accuracy", "r2", "val_loss", "val_accuracy", "val_r2")


def monitors(metric):
    """What early stopping can watch for a head whose metric is `metric`."""
    return ("loss", metric, "val_loss", f"val_{metric}")


class EarlyStopping:
    """Tracks the monitored metric for fit; keeps a copy of the best epoch's
    parameters when they are to be restored."""

    def __init__(self, model, patience, monitor, min_delta, restore_best_weights):
        self.model, self.patience, self.monitor = model, patience, monitor
        self.min_delta = min_delta
        self.sign = 1.0 if monitor.endswith("loss") else -1.0  # lower is better for losses
        self.best = np.inf
        self.best_epoch = None
        self.wait = 0
        self.best_params = np.empty_like(model.params) if restore_best_weights else None

    def should_stop(self, epoch, logs):
        value = self.sign * logs[self.monitor]
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.best_params is not None:
                np.copyto(self.best_params, self.model.params)
            return False
        self.wait += 1
        return self.wait >= self.patience

    def finish(self):
        """Restores the best parameters if asked; returns the best epoch."""
        if self.best_params is not None and self.best_epoch is not None:
            np.copyto(self.model.params, self.best_params)
        return self.best_epoch


class TrainingInterrupted(KeyboardInterrupt):
    """fit stopped at Ctrl-C (or, with MPI, when any rank had one): the model,
    its optimizer and training state agree and can be saved and resumed.
    `history` holds the epochs completed; with early stopping that restores
    the best weights, `best_params` holds them (else None)."""
    history = None
    best_params = None


class TrainingDiverged(ValueError):
    """The loss or a parameter became NaN or inf. The model keeps the
    parameters from before the step that diverged; `epoch` and `step` (from
    0) name that step."""

    def __init__(self, message, epoch, step):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


def diverged(model, state, progress, run, saved, first, first_update, status, at, step0,
             n_steps, optimizer, lr):
    """Leaves the model as it was before step `at` and raises TrainingDiverged.
    A loss that is not finite stops before its update; a parameter that is
    not finite is undone by replaying the epoch from its start up to `at`
    (training is deterministic, so the replay gives the very same values)."""
    if status == PARAMS_NOT_FINITE:
        for copy, target in zip(saved, (model.params, state.state1, state.state2)):
            np.copyto(target, copy)
        state.updates = first_update
        step0 = first
        if run(first, at)[3] != STEPS_DONE:
            raise RuntimeError("replaying the steps before the divergence diverged too")
    state.updates += at - step0
    progress.step = at
    what = ("the loss became NaN or inf" if status == LOSS_NOT_FINITE
            else "a parameter became NaN or inf")
    raise TrainingDiverged(
        f"training diverged at epoch {progress.epoch + 1}, step {at + 1} of {n_steps}: {what}; "
        f"the model keeps its parameters from before that step. Try a smaller learning rate "
        f"than {optimizer} lr={lr:g}.", progress.epoch, at)


def mapped_file(X):
    """The mmap behind X when X is (a view of) a shared numpy.memmap, whose
    pages fit may release, else None. A copy-on-write map (mode 'c') is left
    alone: releasing its pages would discard the changes made to it."""
    while X is not None:
        if isinstance(getattr(X, "_mmap", None), mmap.mmap):
            return X._mmap if getattr(X, "mode", "c") != "c" else None
        X = getattr(X, "base", None)
    return None


def end_epoch(progress, rng):
    progress.epoch += 1
    progress.step = 0
    progress.rng_state = rng.bit_generator.state
