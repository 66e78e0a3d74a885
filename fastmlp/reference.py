"""The NumPy oracle: the same maths as the kernels, written as plainly as the
classic lesson. Tests and benchmarks compare fastmlp against it; training
never uses it.

A network is a list of weights W[l] (fan_in, fan_out) and biases b[l]; the
hidden activation is one of sigmoid, tanh, relu; the output is softmax with
mean categorical cross-entropy. uint8 inputs are scaled by the dtype's
nearest value of 1/255.
"""
import math

import numpy as np

ACTIVATION = {
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
}
# derivatives written with the activation's output a
DERIVATIVE = {
    "sigmoid": lambda a: a * (1 - a),
    "tanh": lambda a: 1 - a * a,
    "relu": lambda a: (a > 0).astype(a.dtype),
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
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def forward(weights, biases, X, activation):
    """Every layer's output: [X, A_1, ..., probabilities]."""
    dtype = weights[0].dtype
    acts = [as_input(X, dtype)]
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = acts[-1] @ W + b
        acts.append(ACTIVATION[activation](z) if l < len(weights) - 1 else softmax(z))
    return acts


def cross_entropy(probs, y, sample_weight=None):
    losses = -np.log(probs[np.arange(len(y)), y])
    if sample_weight is not None and np.sum(sample_weight) == 0:
        return 0.0  # a batch of zero weight counts for nothing
    return float(np.average(losses, weights=sample_weight))


def loss_and_gradients(weights, biases, X, y, activation, sample_weight=None):
    """(mean cross-entropy, dweights, dbiases) for the batch X, y; with
    sample_weight, the weighted mean."""
    acts = forward(weights, biases, X, activation)
    probs = acts[-1]
    n = len(y)
    onehot = np.zeros_like(probs)
    onehot[np.arange(n), y] = 1
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    # softmax + cross-entropy: probs - onehot, weighted over the batch
    share = w / w.sum() if w.sum() > 0 else np.zeros(n)  # zero weight: zero gradient
    delta = (probs - onehot) * share[:, None].astype(probs.dtype)
    dweights, dbiases = [None] * len(weights), [None] * len(weights)
    for l in range(len(weights) - 1, -1, -1):
        dweights[l] = acts[l].T @ delta
        dbiases[l] = delta.sum(axis=0)
        if l > 0:
            delta = (delta @ weights[l].T) * DERIVATIVE[activation](acts[l])
    return cross_entropy(probs, y, sample_weight), dweights, dbiases


def sgd_step(params, grads, lr, weight_decay, decays):
    for p, g, decay in zip(params, grads, decays):
        p -= lr * (g + weight_decay * decay * p)


def momentum_step(params, grads, velocity, lr, momentum, nesterov, weight_decay, decays):
    for p, g, v, decay in zip(params, grads, velocity, decays):
        g = g + weight_decay * decay * p
        v[...] = momentum * v - lr * g
        p += momentum * v - lr * g if nesterov else v


def adam_step(params, grads, m, v, t, lr, weight_decay, decays):
    """Keras's Adam, update number t (from 1)."""
    alpha = lr * math.sqrt(1 - ADAM_BETA2 ** t) / (1 - ADAM_BETA1 ** t)
    for p, g, mi, vi, decay in zip(params, grads, m, v, decays):
        g = g + weight_decay * decay * p
        mi += (g - mi) * (1 - ADAM_BETA1)
        vi += (g * g - vi) * (1 - ADAM_BETA2)
        p -= alpha * mi / (np.sqrt(vi) + ADAM_EPSILON)


def train(weights, biases, X, y, activation, batches, optimizer="sgd", lr=0.1,
          momentum=0.9, nesterov=False, weight_decay=0.0, sample_weight=None):
    """Trains the lists weights and biases in place over `batches` (a list of
    row-index arrays), one update each; returns the loss of every batch."""
    params = list(weights) + list(biases)
    decays = [1] * len(weights) + [0] * len(biases)  # no decay on biases
    state1 = [np.zeros_like(p) for p in params]
    state2 = [np.zeros_like(p) for p in params]
    losses = []
    for t, rows in enumerate(batches, start=1):
        batch_weight = None if sample_weight is None else sample_weight[rows]
        loss, dweights, dbiases = loss_and_gradients(weights, biases, X[rows], y[rows], activation,
                                                     batch_weight)
        losses.append(loss)
        grads = dweights + dbiases
        if optimizer == "sgd":
            sgd_step(params, grads, lr, weight_decay, decays)
        elif optimizer == "momentum":
            momentum_step(params, grads, state1, lr, momentum, nesterov, weight_decay, decays)
        elif optimizer == "adam":
            adam_step(params, grads, state1, state2, t, lr, weight_decay, decays)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return losses
