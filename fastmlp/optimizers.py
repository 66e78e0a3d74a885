"""Optimizers: names, hyperparameters, and their fused update kernels.

Optimizer state (velocity, Adam's moments) is flat and mirrors the parameter
vector, so an update is one loop over a flat range [p0, p1) that does not care
about layers. The formulas are Keras's: the oracle in `reference.py` spells
the same ones in NumPy.

Weight decay is L2 added to the gradient of weights (not biases):
g <- g + weight_decay * w, i.e. loss + weight_decay/2 * sum(w**2).
"""
import math

import numpy as np

from .buffers import Optimizer
from .jit import kernel
from .kernels import ONE, ZERO

NONE = 0  # gradients only
SGD = 1
MOMENTUM = 2
ADAM = 3
OPTIMIZERS = {"sgd": SGD, "momentum": MOMENTUM, "adam": ADAM}

DEFAULT_LR = {"sgd": 0.01, "momentum": 0.01, "adam": 0.001}
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7

# Slots of the `hyper` array: the model's dtype, so kernels read scalars of
# the right precision and a float32 update never runs in float64.
LR, MOMENTUM_COEF, BETA1, BETA2, EPSILON, DECAY, ADAM_ALPHA = range(7)
N_HYPER = 7


def make_hyper(dtype, lr, momentum, weight_decay, beta_1=ADAM_BETA1, beta_2=ADAM_BETA2,
               epsilon=ADAM_EPSILON):
    hyper = np.zeros(N_HYPER, dtype=dtype)
    hyper[LR] = lr
    hyper[MOMENTUM_COEF] = momentum
    hyper[BETA1] = beta_1
    hyper[BETA2] = beta_2
    hyper[EPSILON] = epsilon
    hyper[DECAY] = weight_decay
    return hyper


def gradients_only(grads):
    """A buffers.Optimizer that makes gradients_update write the gradients
    into grads and update nothing (model.gradients, full_batch)."""
    empty = np.zeros(0, grads.dtype)
    return Optimizer(grads, empty, empty, make_hyper(grads.dtype, 0.0, 0.0, 0.0), NONE, False,
                     np.zeros(5), adam_betas())


def adam_betas(beta_1=ADAM_BETA1, beta_2=ADAM_BETA2):
    """buffers.Optimizer.betas: Adam's betas in float64, for adam_alpha."""
    return np.array([beta_1, beta_2], np.float64)


@kernel
def adam_alpha(lr, step, beta1, beta2):
    # Keras's bias-corrected step size for update number `step` (from 1),
    # in float64, the same expression as the oracle's.
    return lr * math.sqrt(1.0 - math.pow(beta2, step)) / (1.0 - math.pow(beta1, step))


# Each update returns the sum of (new value * 0) over its values: 0 when
# every new parameter is finite, NaN otherwise. It costs one multiply-add per
# value in a loop that is memory-bound anyway, and it cannot be folded away
# because the fastmath flags keep NaN and inf semantics.
#
# Each updates `rows` ranges of parameters: params[p + k0:p + k1] for
# p = p0, p0 + stride, ..., from the gradients at the same offsets from g0
# (the optimizer's flat gradient vector, g0 = p0, or the block a gradient
# task has just computed, gradients.py): a gradient task's weight rows, or one
# range of biases.
#
# Indices are unsigned: with an index that may be negative as far as LLVM
# knows, Numba's wraparound indexing keeps it from vectorizing the loop
# (measured: 10x slower for Adam). A slice per row instead costs Numba's
# reference counting per row: 32 rows of 64 took 2.5 us that way, 1.5 us
# this way (Adam, float32, Zen 3). Whole rows (k0 = 0, k1 = stride) are one
# contiguous range, updated as one row (one_range): a loop over rows of 100
# spent a third of its time on each row's last 36 values, which fill no
# whole 64-value turn of the vectorized loop (Adam on 32 rows of 100: 1.34
# us by rows, 0.91 us as one range; Zen 4, one core).


@kernel
def one_range(rows, stride, k0, k1):
    # (rows, k1) of an update over whole rows as one range: (1, rows *
    # stride) when k0 == 0 and k1 == stride, else unchanged
    if k0 == 0 and k1 == stride:
        return 1, rows * stride
    return rows, k1


@kernel
def sgd_update(params, grads, p0, g0, rows, stride, k0, k1, lr, decay):
    rows, k1 = one_range(rows, stride, k0, k1)
    check = ZERO
    for i in range(rows):
        p = np.uint64(p0 + i * stride + k0)
        g = np.uint64(g0 + i * stride + k0)
        for c in range(np.uint64(k1 - k0)):
            w = params[p + c] - lr * (grads[g + c] + decay * params[p + c])
            params[p + c] = w
            check += w * ZERO
    return check


@kernel
def momentum_update(params, grads, velocity, p0, g0, rows, stride, k0, k1, lr, mu, decay,
                    nesterov):
    # v <- mu v - lr g; w <- w + v  (Nesterov: w <- w + mu v - lr g)
    rows, k1 = one_range(rows, stride, k0, k1)
    check = ZERO
    for i in range(rows):
        p = np.uint64(p0 + i * stride + k0)
        gi = np.uint64(g0 + i * stride + k0)
        for c in range(np.uint64(k1 - k0)):
            g = grads[gi + c] + decay * params[p + c]
            v = mu * velocity[p + c] - lr * g
            velocity[p + c] = v
            w = params[p + c] + (mu * v - lr * g if nesterov else v)
            params[p + c] = w
            check += w * ZERO
    return check


@kernel
def adam_update(params, grads, m, v, p0, g0, rows, stride, k0, k1, alpha, beta1, beta2, eps,
                decay):
    # m <- m + (g - m)(1 - b1); v <- v + (g^2 - v)(1 - b2);
    # w <- w - alpha m / (sqrt(v) + eps), alpha from adam_alpha
    rows, k1 = one_range(rows, stride, k0, k1)
    check = ZERO
    for i in range(rows):
        p = np.uint64(p0 + i * stride + k0)
        gi = np.uint64(g0 + i * stride + k0)
        for c in range(np.uint64(k1 - k0)):
            g = grads[gi + c] + decay * params[p + c]
            mi = m[p + c] + (g - m[p + c]) * (ONE - beta1)
            vi = v[p + c] + (g * g - v[p + c]) * (ONE - beta2)
            m[p + c] = mi
            v[p + c] = vi
            w = params[p + c] - alpha * mi / (math.sqrt(vi) + eps)
            params[p + c] = w
            check += w * ZERO
    return check
