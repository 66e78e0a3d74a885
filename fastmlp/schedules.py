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
- `Plateau(factor=0.1, patience=10, monitor=None, min_delta=1e-4,
  cooldown=0, min_lr=0.0)` or "plateau": Keras's ReduceLROnPlateau, with
  its defaults. After each epoch it looks at `monitor` (default 'val_loss'
  with validation data, else 'loss'; the head's metric, 'accuracy' or 'r2',
  counts up): once `patience` epochs in a row have not improved on the best
  value by more than min_delta, the rate is multiplied by `factor` (not
  below min_lr), and `cooldown` epochs pass before epochs count again.
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


class Plateau:
    def __init__(self, factor=0.1, patience=10, monitor=None, min_delta=1e-4, cooldown=0,
                 min_lr=0.0, *, scale=1.0, best=None, wait=0, cooling=0):
        if not (isinstance(factor, (int, float)) and 0 < factor < 1):
            raise ValueError(f"Plateau factor must be a number > 0 and < 1, got {factor!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown), ("wait", wait),
                            ("cooling", cooling)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < (1 if name == "patience" else 0):
                raise ValueError(f"Plateau {name} must be an integer >= "
                                 f"{1 if name == 'patience' else 0}, got {value!r}")
        for name, value in (("min_delta", min_delta), ("min_lr", min_lr)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"Plateau {name} must be a finite number >= 0, got {value!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"Plateau monitor must be a metric's name, got {monitor!r}")
        self.factor, self.patience, self.monitor = float(factor), int(patience), monitor
        self.min_delta, self.cooldown, self.min_lr = float(min_delta), int(cooldown), float(min_lr)
        # what the epochs so far left: the rate is lr * scale (not below
        # min_lr); best is the monitored value to beat (None: no epoch yet)
        self.scale, self.best, self.wait, self.cooling = float(scale), best, int(wait), int(cooling)

    def start(self, monitor):
        """Fixes the metric watched, when it was left to fit (saved after)."""
        if self.monitor is None:
            self.monitor = monitor

    def epoch_lr(self, lr, epoch):
        return max(lr * self.scale, self.min_lr) if self.scale != 1.0 else lr

    def end_epoch(self, lr, logs):
        """Keras's ReduceLROnPlateau.on_epoch_end, for an epoch trained at
        epoch_lr(lr) whose metrics are `logs`."""
        value = float(logs[self.monitor])
        rising = not self.monitor.endswith("loss")  # accuracy, r2
        if self.cooling > 0:
            self.cooling -= 1
            self.wait = 0
        if self.best is None or (value > self.best + self.min_delta if rising
                                 else value < self.best - self.min_delta):
            self.best = value
            self.wait = 0
        elif self.cooling == 0:
            self.wait += 1
            if self.wait >= self.patience:
                if self.epoch_lr(lr, None) > self.min_lr:
                    self.scale *= self.factor
                    self.cooling = self.cooldown
                self.wait = 0

    def to_json(self):
        return {"name": "plateau", "factor": self.factor, "patience": self.patience,
                "monitor": self.monitor, "min_delta": self.min_delta,
                "cooldown": self.cooldown, "min_lr": self.min_lr, "scale": self.scale,
                "best": self.best, "wait": self.wait, "cooling": self.cooling}

    def __repr__(self):
        return (f"Plateau(factor={self.factor:g}, patience={self.patience}, "
                f"monitor={self.monitor!r}, min_delta={self.min_delta:g}, "
                f"cooldown={self.cooldown}, min_lr={self.min_lr:g})")


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
    if spec == "plateau":
        return Plateau()
    if isinstance(spec, (Step, Cosine, Plateau, Function)):
        return spec
    if callable(spec):
        return Function(spec)
    raise ValueError(f"unknown lr_schedule {spec!r}; expected 'constant', 'step', 'cosine', "
                     "'plateau', a fastmlp.schedules.Step, Cosine or Plateau, or a callable "
                     "epoch -> lr")


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
    if data.get("name") == "plateau":
        best = data["best"]
        if best is not None and not (isinstance(best, (int, float)) and math.isfinite(best)):
            raise ValueError(f"bad Plateau best {best!r}")
        scale = data["scale"]
        if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
            raise ValueError(f"bad Plateau scale {scale!r}")
        return Plateau(data["factor"], data["patience"], data["monitor"], data["min_delta"],
                       data["cooldown"], data["min_lr"], scale=scale, best=best,
                       wait=data["wait"], cooling=data["cooling"])
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
