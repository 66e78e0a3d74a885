"""The NumPy oracle: the same maths as the kernels, written as plainly as the
classic lesson. Tests and benchmarks compare fastmlp against it; training
never uses it.

A network is a list of weights W[l] (fan_in, fan_out) and biases b[l]; the
hidden activation is one of sigmoid, tanh, relu; the output is one of the
heads of fastmlp.heads (softmax with cross-entropy, linear with squared
error, sigmoid with binary cross-entropy), whose oracle twins are defined
there next to their kernels. uint8 inputs are scaled by the dtype's nearest
value of 1/255.
"""
import math

import numpy as np

from .bfloat16 import round_array
from .heads import oracle_loss_and_delta, oracle_output

ACTIVATION = {
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "identity": lambda z: z,
}
# derivatives written with the activation's output a
DERIVATIVE = {
    "sigmoid": lambda a: a * (1 - a),
    "tanh": lambda a: 1 - a * a,
    "relu": lambda a: (a > 0).astype(a.dtype),
    "identity": np.ones_like,
}

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7


def as_input(X, dtype):
    X = np.asarray(X)
    if X.dtype == np.uint8:
        return X.astype(dtype) * dtype.type(1.0 / 255.0)
    return X.astype(dtype)


def softmax(z):
    return oracle_output("softmax", z)


def operand_rounding(bfloat16):
    """What a product's operands go through: rounding to bfloat16, or nothing."""
    return round_array if bfloat16 else (lambda a: a)


def forward(weights, biases, X, activation, output="softmax", logits=None, bfloat16=False):
    """Every layer's output: [X, A_1, ..., the head's outputs]. logits, a
    list, receives the last layer's pre-activations. bfloat16: the products
    read the input, hidden activations and weights rounded to bfloat16, as
    the kernels do (fastmlp/bfloat16.py)."""
    dtype = weights[0].dtype
    low = operand_rounding(bfloat16)
    acts = [low(as_input(X, dtype))]
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = acts[-1] @ low(W) + b
        if l < len(weights) - 1:
            acts.append(low(ACTIVATION[activation](z)))
        else:
            acts.append(oracle_output(output, z))
            if logits is not None:
                logits.append(z)
    return acts


def loss_and_gradients(weights, biases, X, y, activation, sample_weight=None,
                       output="softmax", bfloat16=False):
    """(mean loss, dweights, dbiases) for the batch X, y under the output
    head's loss; with sample_weight, the weighted mean. bfloat16: products
    of values rounded to bfloat16 (inputs, activations, weights, deltas),
    as in forward."""
    low = operand_rounding(bfloat16)
    logits = []
    acts = forward(weights, biases, X, activation, output, logits, bfloat16)
    n = len(y)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    share = w / w.sum() if w.sum() > 0 else np.zeros(n)  # zero weight: zero gradient
    losses, delta = oracle_loss_and_delta(output, logits[0], acts[-1], y, share)
    delta = low(delta)
    dweights, dbiases = [None] * len(weights), [None] * len(weights)
    for l in range(len(weights) - 1, -1, -1):
        dweights[l] = acts[l].T @ delta
        dbiases[l] = delta.sum(axis=0)
        if l > 0:
            delta = low((delta @ low(weights[l]).T) * DERIVATIVE[activation](acts[l]))
    if sample_weight is not None and np.sum(sample_weight) == 0:
        return 0.0, dweights, dbiases  # a batch of zero weight counts for nothing
    return float(np.average(losses, weights=sample_weight)), dweights, dbiases


def sgd_step(params, grads, lr, weight_decay, decays):
    for p, g, decay in zip(params, grads, decays):
        p -= lr * (g + weight_decay * decay * p)


def momentum_step(params, grads, velocity, lr, momentum, nesterov, weight_decay, decays):
    for p, g, v, decay in zip(params, grads, velocity, decays):
        g = g + weight_decay * decay * p
        v[...] = momentum * v - lr * g
        p += momentum * v - lr * g if nesterov else v


def adam_step(params, grads, m, v, t, lr, weight_decay, decays, beta_1=ADAM_BETA1,
              beta_2=ADAM_BETA2, epsilon=ADAM_EPSILON):
    """Keras's Adam, update number t (from 1)."""
    alpha = lr * math.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    for p, g, mi, vi, decay in zip(params, grads, m, v, decays):
        g = g + weight_decay * decay * p
        mi += (g - mi) * (1 - beta_1)
        vi += (g * g - vi) * (1 - beta_2)
        p -= alpha * mi / (np.sqrt(vi) + epsilon)


def train(weights, biases, X, y, activation, batches, optimizer="sgd", lr=0.1,
          momentum=0.9, nesterov=False, weight_decay=0.0, sample_weight=None,
          output="softmax", bfloat16=False, beta_1=ADAM_BETA1, beta_2=ADAM_BETA2,
          epsilon=ADAM_EPSILON):
    """Trains the lists weights and biases in place over `batches` (a list of
    row-index arrays), one update each; returns the loss of every batch. lr
    is one learning rate, or a list of one per batch (a schedule). bfloat16:
    float32 weights and updates, bfloat16 products (see forward); beta_1,
    beta_2, epsilon: Adam's constants."""
    lrs = list(lr) if np.ndim(lr) else [lr] * len(batches)
    params = list(weights) + list(biases)
    decays = [1] * len(weights) + [0] * len(biases)  # no decay on biases
    state1 = [np.zeros_like(p) for p in params]
    state2 = [np.zeros_like(p) for p in params]
    losses = []
    for t, (rows, lr) in enumerate(zip(batches, lrs), start=1):
        batch_weight = None if sample_weight is None else sample_weight[rows]
        loss, dweights, dbiases = loss_and_gradients(weights, biases, X[rows], y[rows], activation,
                                                     batch_weight, output, bfloat16)
        losses.append(loss)
        grads = dweights + dbiases
        if optimizer == "sgd":
            sgd_step(params, grads, lr, weight_decay, decays)
        elif optimizer == "momentum":
            momentum_step(params, grads, state1, lr, momentum, nesterov, weight_decay, decays)
        elif optimizer == "adam":
            adam_step(params, grads, state1, state2, t, lr, weight_decay, decays, beta_1, beta_2,
                      epsilon)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return losses
