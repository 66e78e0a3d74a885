"""Output heads: what the last layer's outputs mean, their loss and metric.

Each head is defined here whole: its kernels (the output's forward, the
per-row loss and score, the delta of the output layer's pre-activation),
their NumPy oracle twins, the validation of its targets, and its metric.

- softmax: class probabilities, mean categorical cross-entropy, integer
  labels; the metric is accuracy.
- linear: the outputs themselves, mean squared error (averaged over rows
  and outputs, as Keras's "mse"), float targets (n,) or (n, K); the metric
  is R², averaged uniformly over the outputs (sklearn's r2_score).
- sigmoid: one independent probability per output, binary cross-entropy
  averaged over outputs (Keras's "binary_crossentropy"), a 0/1 target
  matrix; the metric is subset accuracy (every label of a row right).
- poisson: counts or rates, the mean exp(z) of a Poisson distribution per
  output (a log link), half the Poisson deviance t log(t / mu) - t + mu
  averaged over outputs (zero for a perfect fit; Keras's "poisson" plus a
  term of the targets alone), non-negative float targets (n,) or (n, K);
  the metric is R², as for linear.

Kernel contract (rows r0:r1 of a (B, K) batch): `head_forward` turns the
last layer's pre-activations `out` into the head's outputs and writes
row_stats[b] = (row weight * row loss, row score), where the row score sums
to the metric: 1 or 0 per row for accuracies; for linear and poisson, the
row's squared errors over outputs, each times target_scale[k] = 1 / (K *
variance of output k), so that R² = 1 - (sum of row scores) / rows.
`head_backward` writes the loss gradient of the row's pre-activations,
scaled by row weight / the batch's total weight (inv_total).
"""
import math

import numpy as np

from .expf import fast_exp
from .jit import kernel

SOFTMAX = 0
LINEAR = 1
SIGMOID = 2
POISSON = 3
HEADS = {"softmax": SOFTMAX, "linear": LINEAR, "sigmoid": SIGMOID, "poisson": POISSON}
METRICS = {"softmax": "accuracy", "linear": "r2", "sigmoid": "accuracy", "poisson": "r2"}
# heads whose outputs are predicted values, in the targets' shape, rather
# than probabilities
VALUE_HEADS = ("linear", "poisson")

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
TWO = np.float32(2.0)
HALF = np.float32(0.5)


# ----------------------------------------------------------------------------
# kernels

@kernel
def copy_targets(labels_out, targets_out, labels, targets, idx, start, r0, r1):
    # labels_out is (B,), targets_out (B, K); labels (N,) or targets (N, K),
    # whichever has rows (buffers.Data); idx is (>=start+r1,)
    # Batch row b's target from dataset row idx[start + b], for rows r0:r1:
    # its integer label for softmax, its row of floats for the other heads.
    if labels.shape[0] > 0:
        for b in range(r0, r1):
            labels_out[b] = labels[idx[start + b]]
    else:
        for b in range(r0, r1):
            i = idx[start + b]
            for k in range(targets.shape[1]):
                targets_out[b, k] = targets[i, k]


@kernel
def softmax_crossentropy_forward(probs, row_stats, labels, weights, r0, r1):
    # probs is (B, K), holding logits on entry and probabilities on exit;
    # row_stats is (B, 2), labels and weights are (B,). For rows r0:r1,
    # row_stats[b] = (weight * -log p[label] in float64, 1.0 if the argmax is
    # the label else 0.0): callers sum them in row order.
    K = probs.shape[1]
    for b in range(r0, r1):
        p = probs[b]
        top = p[0]
        best = 0
        for j in range(1, K):
            if p[j] > top:
                top = p[j]
                best = j
        label_logit = p[labels[b]]
        total = ZERO
        for j in range(K):
            e = fast_exp(p[j] - top)
            p[j] = e
            total += e
        inv = ONE / total
        for j in range(K):
            p[j] *= inv
        # -log softmax(z)[y] = log(sum exp(z - max)) - (z_y - max), stable
        row_stats[b, 0] = weights[b] * (math.log(total) - (label_logit - top))
        row_stats[b, 1] = 1.0 if best == labels[b] else 0.0


@kernel
def softmax_crossentropy_backward(dlogits, probs, labels, weights, inv_total, r0, r1):
    # dlogits is (B, K), probs is (B, K), labels and weights are (B,)
    # Softmax and cross-entropy together have the plain derivative
    # probs - onehot(label): the softmax Jacobian cancels against d(-log p).
    # weight / inv_total (the batch's total weight) makes it the gradient
    # of the batch's weighted mean.
    K = probs.shape[1]
    for b in range(r0, r1):
        p = probs[b]
        d = dlogits[b]
        scale = weights[b] * inv_total
        for j in range(K):
            d[j] = p[j] * scale
        d[labels[b]] -= scale


@kernel
def squared_error_forward(out, row_stats, targets, weights, target_scale, r0, r1):
    # out and targets are (B, K), weights (B,), target_scale (K,), row_stats
    # (B, 2). The outputs are the predictions (no activation).
    K = out.shape[1]
    for b in range(r0, r1):
        loss = 0.0
        score = 0.0
        for k in range(K):
            error = float(out[b, k] - targets[b, k])
            loss += error * error
            score += error * error * target_scale[k]
        row_stats[b, 0] = weights[b] * loss / K
        row_stats[b, 1] = score


@kernel
def squared_error_backward(dout, out, targets, weights, inv_total, r0, r1):
    # dout, out and targets are (B, K), weights (B,)
    # d mean_k (out - t)^2 = 2 (out - t) / K
    K = out.shape[1]
    width = out.dtype.type(K)  # K as a float of the kernel's type: no float64
    for b in range(r0, r1):
        scale = TWO * weights[b] * inv_total / width
        for k in range(K):
            dout[b, k] = (out[b, k] - targets[b, k]) * scale


@kernel
def sigmoid_crossentropy_forward(probs, row_stats, targets, weights, r0, r1):
    # probs and targets are (B, K), holding logits on entry and
    # probabilities on exit; weights (B,), row_stats (B, 2).
    # Per output: max(z, 0) - z t + log(1 + exp(-|z|)), stable for any z.
    K = probs.shape[1]
    for b in range(r0, r1):
        loss = 0.0
        right = 1.0
        for k in range(K):
            z = probs[b, k]
            t = targets[b, k]
            e = fast_exp(-abs(z))
            loss += float(max(z, ZERO) - z * t) + math.log1p(float(e))
            # sigmoid(z) from e = exp(-|z|), without overflow
            p = ONE / (ONE + e) if z >= ZERO else e / (ONE + e)
            probs[b, k] = p
            if (p >= HALF) != (t >= HALF):
                right = 0.0
        row_stats[b, 0] = weights[b] * loss / K
        row_stats[b, 1] = right


@kernel
def output_minus_target_backward(dz, out, targets, weights, inv_total, r0, r1):
    # dz, out and targets are (B, K), weights (B,)
    # For an output and loss that pair up canonically, d/dz = out - t (over
    # K outputs): sigmoid with binary cross-entropy, exp with the Poisson
    # deviance.
    K = out.shape[1]
    width = out.dtype.type(K)
    for b in range(r0, r1):
        scale = weights[b] * inv_total / width
        for k in range(K):
            dz[b, k] = (out[b, k] - targets[b, k]) * scale


@kernel
def poisson_forward(out, row_stats, targets, weights, target_scale, r0, r1):
    # out and targets are (B, K), holding log-means on entry and means
    # mu = exp(z) on exit; weights (B,), target_scale (K,), row_stats (B, 2).
    # Per output, half the Poisson deviance, t log t - t z - t + mu (t log t
    # = 0 at t = 0); the score is linear's.
    K = out.shape[1]
    for b in range(r0, r1):
        loss = 0.0
        score = 0.0
        for k in range(K):
            z = out[b, k]
            t = targets[b, k]
            mu = fast_exp(z)
            out[b, k] = mu
            loss += float(mu - t * z)
            if t > ZERO:
                loss += float(t) * (math.log(float(t)) - 1.0)
            error = float(mu - t)
            score += error * error * target_scale[k]
        row_stats[b, 0] = weights[b] * loss / K
        row_stats[b, 1] = score


@kernel
def head_forward(out, row_stats, labels, targets, weights, target_scale, head, r0, r1):
    # out is (B, K): the last layer's pre-activations in, the head's outputs
    # out; labels (B,) for softmax, targets (B, K) for the others
    if head == SOFTMAX:
        softmax_crossentropy_forward(out, row_stats, labels, weights, r0, r1)
    elif head == LINEAR:
        squared_error_forward(out, row_stats, targets, weights, target_scale, r0, r1)
    elif head == SIGMOID:
        sigmoid_crossentropy_forward(out, row_stats, targets, weights, r0, r1)
    else:
        poisson_forward(out, row_stats, targets, weights, target_scale, r0, r1)


@kernel
def head_backward(dout, out, labels, targets, weights, inv_total, head, r0, r1):
    # dout is (B, K): the loss gradient of the last layer's pre-activations
    if head == SOFTMAX:
        softmax_crossentropy_backward(dout, out, labels, weights, inv_total, r0, r1)
    elif head == LINEAR:
        squared_error_backward(dout, out, targets, weights, inv_total, r0, r1)
    else:  # sigmoid, poisson
        output_minus_target_backward(dout, out, targets, weights, inv_total, r0, r1)


# ----------------------------------------------------------------------------
# Python side: targets, scores and the oracle's twins

def check_targets(output, y, n_samples, n_outputs, dtype, name="y"):
    """y as the kernels take it: int32 labels (n,) for softmax, a contiguous
    (n, K) array of dtype for the others. Anything else is a ValueError that
    names the problem."""
    if output == "softmax":
        from .validation import check_y
        return check_y(y, n_samples, n_outputs, name)
    y = np.asarray(y)
    if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) \
            or np.iscomplexobj(y):
        raise ValueError(f"{name} must hold real numbers for the {output} output, got dtype "
                         f"{y.dtype}")
    if y.ndim == 1 and n_outputs == 1:
        y = y.reshape(-1, 1)
    if y.ndim != 2 or y.shape[1] != n_outputs:
        shapes = f"({n_samples},) or ({n_samples}, 1)" if n_outputs == 1 else \
            f"({n_samples}, {n_outputs})"
        raise ValueError(f"{name} must have shape {shapes} for a model with {n_outputs} "
                         f"outputs, got {y.shape}")
    if y.shape[0] != n_samples:
        raise ValueError(f"X has {n_samples} samples but {name} has {y.shape[0]} rows")
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf (first in row {row})")
    if output == "sigmoid" and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be a 0/1 indicator matrix for the sigmoid output; it "
                         f"holds {np.setdiff1d(np.unique(y), (0, 1))[0].item()!r}")
    if output == "poisson" and (y < 0).any():
        row = int(np.flatnonzero((y < 0).any(axis=1))[0])
        raise ValueError(f"{name} must be >= 0 for the poisson output (counts or rates); row "
                         f"{row} holds {y[row][y[row] < 0][0].item()!r}")
    return np.ascontiguousarray(y, dtype=dtype)


def target_scale(output, y, n_outputs, dtype):
    """The kernels' target_scale: 1 / (K * variance) per output for the R²
    heads (0 for a constant output, which then counts as perfectly
    predicted), zeros otherwise."""
    scale = np.zeros(n_outputs, dtype)
    if METRICS[output] == "r2" and len(y):
        variance = np.var(np.asarray(y, np.float64), axis=0)
        scale[variance > 0] = 1.0 / (n_outputs * variance[variance > 0])
    return scale


def score(output, score_sum, rows):
    """The metric from the row scores' sum."""
    if METRICS[output] == "r2":
        return 1.0 - score_sum / rows
    return score_sum / rows


def predictions(output, outputs, flat):
    """predict's answer from the head's outputs: class indices, values
    ((n,) when flat), or a 0/1 label matrix."""
    if output == "softmax":
        return np.argmax(outputs, axis=1)
    if output in VALUE_HEADS:
        return outputs[:, 0].copy() if flat else outputs
    return (outputs >= 0.5).astype(np.int64)


def oracle_output(output, z):
    """The head's outputs from pre-activations z (NumPy, float64-exact where
    the dtype is)."""
    if output == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if output == "linear":
        return z
    if output == "poisson":
        return np.exp(z)
    return 1.0 / (1.0 + np.exp(-z))


def oracle_loss_and_delta(output, z, out, y, share):
    """(per-row losses, delta of the pre-activations) from the pre-activations
    z and the head's outputs out; share is each row's weight over the batch's
    total weight."""
    n, K = out.shape
    if output == "softmax":
        onehot = np.zeros_like(out)
        onehot[np.arange(n), y] = 1
        losses = -np.log(out[np.arange(n), y])
        return losses, (out - onehot) * share[:, None].astype(out.dtype)
    y = np.asarray(y, out.dtype).reshape(n, K)
    if output == "linear":
        losses = ((out - y) ** 2).mean(axis=1)
        return losses, 2 * (out - y) / K * share[:, None].astype(out.dtype)
    if output == "poisson":
        y_log_y = y * np.log(np.where(y > 0, y, 1))  # 0 at y = 0
        losses = (y_log_y - y * z - y + out).mean(axis=1)
        return losses, (out - y) / K * share[:, None].astype(out.dtype)
    losses = (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean(axis=1)
    return losses, (out - y) / K * share[:, None].astype(out.dtype)
