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


def make_hyper(dtype, lr, momentum, weight_decay):
    hyper = np.zeros(N_HYPER, dtype=dtype)
    hyper[LR] = lr
    hyper[MOMENTUM_COEF] = momentum
    hyper[BETA1] = ADAM_BETA1
    hyper[BETA2] = ADAM_BETA2
    hyper[EPSILON] = ADAM_EPSILON
    hyper[DECAY] = weight_decay
    return hyper


@kernel
def adam_alpha(lr, step):
    # Keras's bias-corrected step size for update number `step` (from 1),
    # in float64, the same expression as the oracle's.
    return lr * math.sqrt(1.0 - math.pow(ADAM_BETA2, step)) / (1.0 - math.pow(ADAM_BETA1, step))


# Each update returns the sum of (new value * 0) over its range: 0 when every
# new parameter is finite, NaN otherwise. It costs one multiply-add per value
# in a loop that is memory-bound anyway, and it cannot be folded away because
# the fastmath flags keep NaN and inf semantics.
#
# Each updates params[p0:p1] from the gradients at grads[g0:g0 + p1 - p0]:
# the optimizer's flat gradient vector (g0 = p0), or the block a gradient
# task has just computed (step.py).
#
# The loops run over slices [p0:p1] from index 0: with a start that may be
# negative as far as LLVM knows, Numba's wraparound indexing keeps it from
# vectorizing the loop (measured: 10x slower for Adam).

@kernel
def sgd_update(params, grads, p0, p1, g0, lr, decay):
    w_ = params[p0:p1]
    g_ = grads[g0:g0 + (p1 - p0)]
    check = ZERO
    for i in range(w_.shape[0]):
        w = w_[i] - lr * (g_[i] + decay * w_[i])
        w_[i] = w
        check += w * ZERO
    return check


@kernel
def momentum_update(params, grads, velocity, p0, p1, g0, lr, mu, decay, nesterov):
    # v <- mu v - lr g; w <- w + v  (Nesterov: w <- w + mu v - lr g)
    w_ = params[p0:p1]
    g_ = grads[g0:g0 + (p1 - p0)]
    v_ = velocity[p0:p1]
    check = ZERO
    for i in range(w_.shape[0]):
        g = g_[i] + decay * w_[i]
        v = mu * v_[i] - lr * g
        v_[i] = v
        w = w_[i] + (mu * v - lr * g if nesterov else v)
        w_[i] = w
        check += w * ZERO
    return check


@kernel
def adam_update(params, grads, m, v, p0, p1, g0, alpha, beta1, beta2, eps, decay):
    # m <- m + (g - m)(1 - b1); v <- v + (g^2 - v)(1 - b2);
    # w <- w - alpha m / (sqrt(v) + eps), alpha from adam_alpha
    w_ = params[p0:p1]
    g_ = grads[g0:g0 + (p1 - p0)]
    m_ = m[p0:p1]
    v_ = v[p0:p1]
    check = ZERO
    for i in range(w_.shape[0]):
        g = g_[i] + decay * w_[i]
        mi = m_[i] + (g - m_[i]) * (ONE - beta1)
        vi = v_[i] + (g * g - v_[i]) * (ONE - beta2)
        m_[i] = mi
        v_[i] = vi
        w = w_[i] - alpha * mi / (math.sqrt(vi) + eps)
        w_[i] = w
        check += w * ZERO
    return check
