"""Learning-rate schedules for `fit(..., lr_schedule=...)`.

- "constant" (or None): the optimizer's lr throughout.
- `Step(factor=0.1, every=10)` or "step": lr * factor ** (epoch // every),
  set before each epoch (epochs count over the model's life, so a resumed
  fit continues the staircase).
- `Cosine(epochs=None, min_lr=0.0)` or "cosine": per step, inside the
  compiled loop, min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2, where t
  counts the updates since the schedule started and T is `epochs` (default:
  the epochs of the fit that starts it) times the steps of an epoch; after
  T steps it stays at min_lr.
- a callable `schedule(epoch) -> lr`, evaluated before each epoch.

A schedule is kept with the optimizer state and saved in model files (a
callable cannot be saved: a resumed fit needs it passed again), so resuming
is bit-identical. The kernel side is one float64 array, `state`:
[kind, base lr, min_lr, total steps T, first update].
"""
import math

import numpy as np

from .jit import kernel

CONSTANT = 0
COSINE = 1
KIND, BASE_LR, MIN_LR, TOTAL_STEPS, FIRST_UPDATE = range(5)


class Step:
    def __init__(self, factor=0.1, every=10):
        if not (isinstance(factor, (int, float)) and 0 < factor and math.isfinite(factor)):
            raise ValueError(f"Step factor must be a finite number > 0, got {factor!r}")
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"Step every must be an integer >= 1, got {every!r}")
        self.factor, self.every = float(factor), int(every)

    def epoch_lr(self, lr, epoch):
        return lr * self.factor ** (epoch // self.every)

    def to_json(self):
        return {"name": "step", "factor": self.factor, "every": self.every}

    def __repr__(self):
        return f"Step(factor={self.factor:g}, every={self.every})"


class Cosine:
    def __init__(self, epochs=None, min_lr=0.0, total_steps=None, first_update=None):
        if epochs is not None and (not isinstance(epochs, (int, np.integer)) or epochs < 1):
            raise ValueError(f"Cosine epochs must be an integer >= 1, got {epochs!r}")
        if not (isinstance(min_lr, (int, float)) and min_lr >= 0 and math.isfinite(min_lr)):
            raise ValueError(f"Cosine min_lr must be a finite number >= 0, got {min_lr!r}")
        self.epochs, self.min_lr = epochs, float(min_lr)
        # fixed when a fit starts the schedule, and saved
        self.total_steps, self.first_update = total_steps, first_update

    def start(self, fit_epochs, steps_per_epoch, updates):
        if self.total_steps is None:
            self.total_steps = (self.epochs or max(fit_epochs, 1)) * steps_per_epoch
            self.first_update = updates

    def epoch_lr(self, lr, epoch):
        return lr  # set per step by the compiled loop

    def to_json(self):
        return {"name": "cosine", "epochs": self.epochs, "min_lr": self.min_lr,
                "total_steps": self.total_steps, "first_update": self.first_update}

    def __repr__(self):
        return f"Cosine(epochs={self.epochs}, min_lr={self.min_lr:g})"


class Function:
    def __init__(self, function):
        self.function = function

    def epoch_lr(self, lr, epoch):
        value = self.function(epoch)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating,
                                                             np.integer)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"lr_schedule({epoch}) returned {value!r}; a schedule must "
                             "return a finite learning rate >= 0")
        return float(value)

    def to_json(self):
        return {"name": "callable"}

    def __repr__(self):
        return f"Function({self.function!r})"


def make(spec):
    """A schedule object from fit's lr_schedule (None for constant)."""
    if spec is None or spec == "constant":
        return None
    if spec == "step":
        return Step()
    if spec == "cosine":
        return Cosine()
    if isinstance(spec, (Step, Cosine, Function)):
        return spec
    if callable(spec):
        return Function(spec)
    raise ValueError(f"unknown lr_schedule {spec!r}; expected 'constant', 'step', 'cosine', "
                     "a fastmlp.schedules.Step or Cosine, or a callable epoch -> lr")


def from_json(data):
    """The schedule a model file records (a callable comes back as None: it
    must be passed again)."""
    if data is None or data.get("name") == "callable":
        return None
    if data.get("name") == "step":
        return Step(data["factor"], data["every"])
    if data.get("name") == "cosine":
        return Cosine(data.get("epochs"), data["min_lr"], data["total_steps"],
                      data["first_update"])
    raise ValueError(f"unknown schedule {data!r}")


def kernel_state(schedule, lr):
    """The compiled loop's view of a schedule: see the module docstring."""
    state = np.zeros(5, np.float64)
    state[BASE_LR] = lr
    if isinstance(schedule, Cosine):
        state[KIND] = COSINE
        state[MIN_LR] = schedule.min_lr
        state[TOTAL_STEPS] = schedule.total_steps
        state[FIRST_UPDATE] = schedule.first_update
    return state


@kernel
def step_lr(state, update):
    # the learning rate of update number `update` (from 1) under a per-step
    # schedule, in float64
    t = min(max(update - 1 - state[FIRST_UPDATE], 0.0), state[TOTAL_STEPS])
    return state[MIN_LR] + (state[BASE_LR] - state[MIN_LR]) * 0.5 * (
        1.0 + math.cos(math.pi * t / state[TOTAL_STEPS]))
