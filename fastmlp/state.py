"""The state a model keeps between fits and in its files: the optimizer's
(name, settings, state vectors mirroring the parameters, updates, schedule)
and training's (epochs, steps into the current one, shuffling generator,
batch size). Below both `model`/`training` and `modelfile`, which share it."""
import numpy as np

from .model import aligned_copy, aligned_zeros
from .optimizers import (ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, OPTIMIZERS, adam_betas,
                         make_hyper)


class OptimizerState:
    """Optimizer name, hyperparameters and flat state vectors mirroring the
    model's params; kept on the model so that a second fit continues."""

    def __init__(self, name, dtype, n_params, lr, momentum, nesterov, weight_decay,
                 beta_1=ADAM_BETA1, beta_2=ADAM_BETA2, epsilon=ADAM_EPSILON):
        self.name = name
        self.code = OPTIMIZERS[name]
        self.nesterov = nesterov
        self.hyper = make_hyper(dtype, lr, momentum, weight_decay, beta_1, beta_2, epsilon)
        self.betas = adam_betas(beta_1, beta_2)
        n_state = {"sgd": (0, 0), "momentum": (n_params, 0), "adam": (n_params, n_params)}[name]
        self.state1 = aligned_zeros(n_state[0], dtype)
        self.state2 = aligned_zeros(n_state[1], dtype)
        self.updates = 0  # updates done so far (Adam's t)
        self.settings = (lr, momentum, nesterov, weight_decay, beta_1, beta_2, epsilon)
        # a schedules object, None (constant), or "callable" for a callable
        # schedule read from a model file (it must be passed again)
        self.schedule = None

    def __setstate__(self, state):
        state.setdefault("schedule", None)  # pickled by fastmlp 0.1
        if len(state["settings"]) == 4:  # pickled before Adam's constants were settings
            state["settings"] = (*state["settings"], ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON)
            state["betas"] = adam_betas()
        self.__dict__.update(state)
        self.state1 = aligned_copy(self.state1)
        self.state2 = aligned_copy(self.state2)
        self.hyper = self.hyper.copy()  # written in training (a schedule's rate)
        self.betas = np.array(self.betas)  # writable, as the compiled step takes it


class TrainingState:
    """Where training stands, kept on the model (and in its files) so that
    training can stop anywhere and resume bit for bit: completed epochs,
    steps done in the current epoch, the shuffling generator's state at
    the start of the current epoch (from which its row order is drawn again),
    and the batch size of the last fit (None before any)."""

    def __init__(self, seed=None):
        self.epoch = 0
        self.step = 0
        self.batch_size = None
        self.rng_state = np.random.default_rng(seed).bit_generator.state

    def __setstate__(self, state):
        state.setdefault("batch_size", None)  # pickled by fastmlp 0.1
        self.__dict__.update(state)

    def generator(self):
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = self.rng_state
        return rng
