"""Checks and conversions at the Python boundary: kernels see only clean
arrays and scalars, and bad input gets a ValueError that names the problem."""
import numbers
import os
import sys

import numpy as np

from .kernels import ACTIVATIONS
from .tabular import not_one_hot

DTYPES = {"float32": np.float32, "float64": np.float64}
INPUT_DTYPES = (np.uint8, np.float32, np.float64)
FINITE_CHECK_ROWS = 8192  # rows per block when scanning for NaN/inf


def check_dtype(dtype, bfloat16=False):
    """The numpy dtype of a model's buffers for `dtype`: float32 or float64,
    and with bfloat16=True also "bfloat16" (float32 buffers, see
    fastmlp/bfloat16.py)."""
    if bfloat16 and isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(np.float32)
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        choices = "'float32', 'float64' or 'bfloat16'" if bfloat16 else "'float32' or 'float64'"
        raise ValueError(f"dtype must be {choices}, got {dtype!r}")
    return np.dtype(DTYPES[name])


def check_activation(activation):
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(choices)}")
    return value


def check_int(name, value, minimum=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name, value, minimum=None, maximum=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_adam(beta_1, beta_2, epsilon):
    """Adam's constants as floats: betas in [0, 1), epsilon > 0."""
    betas = [check_float(name, value, minimum=0.0)
             for name, value in (("beta_1", beta_1), ("beta_2", beta_2))]
    for name, value in zip(("beta_1", "beta_2"), betas):
        if value >= 1:
            raise ValueError(f"{name} must be < 1, got {value}")
    epsilon = check_float("epsilon", epsilon, minimum=0.0)
    if epsilon == 0:
        raise ValueError("epsilon must be > 0, got 0.0")
    return (*betas, epsilon)


def check_layer_sizes(layer_sizes, output="softmax"):
    try:
        sizes = list(layer_sizes)
    except TypeError:
        raise ValueError(f"layer_sizes must be a sequence of integers, got {layer_sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError("layer_sizes needs at least an input and an output size, "
                         f"got {sizes!r}")
    for size in sizes:
        check_int("every layer size", size, minimum=1)
    if output == "softmax" and sizes[-1] < 2:
        raise ValueError(f"the output layer needs at least 2 classes, got {sizes[-1]}")
    return tuple(int(s) for s in sizes)


def check_X(X, n_features, name="X"):
    """A 2-D C-contiguous array of uint8, float32 or float64 with n_features
    columns and finite values. uint8 and float arrays that are already
    C-contiguous are used as they are (no copy); a SciPy sparse matrix or
    array is made dense (dense_rows)."""
    if is_sparse(X):
        X = dense_rows(X, n_features, name)
    if not isinstance(X, np.ndarray):
        X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise ValueError(f"{name} must hold numbers, got dtype {X.dtype}")
    if np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real, got dtype {X.dtype}")
    check_shape(X.shape, n_features, name)
    if X.dtype.type not in INPUT_DTYPES or not X.dtype.isnative:
        X = X.astype(np.float64 if X.dtype.itemsize > 4 else np.float32)
    X = np.ascontiguousarray(X)
    if X.dtype != np.uint8:
        for start in range(0, X.shape[0], FINITE_CHECK_ROWS):
            block = X[start:start + FINITE_CHECK_ROWS]
            if not np.isfinite(block).all():
                row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise ValueError(f"{name} contains NaN or inf (first in row {row})")
    return X


def check_shape(shape, n_features, name):
    """shape is that of rows (samples, n_features), and some."""
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: it has no samples")
    if shape[1] != n_features:
        raise ValueError(f"{name} has {shape[1]} features but the model expects {n_features}")


def is_sparse(X):
    """Whether X is a SciPy sparse matrix or array (SciPy is not imported
    for this: without it, nothing is)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(X)


def dense_rows(X, n_features, name):
    """A sparse X as a dense array, as the kernels train on (as one-hot
    columns from OneHotEncoder or ColumnTransformer come). Refused, naming
    the sizes, where the dense copy would take more than half the memory
    available."""
    check_shape(X.shape, n_features, name)
    needed = X.shape[0] * X.shape[1] * max(X.dtype.itemsize, 4)
    available = available_memory()
    if available is not None and needed > available // 2:
        raise ValueError(
            f"{name} is a sparse {X.shape[0]} x {X.shape[1]} matrix; fastmlp trains on dense "
            f"rows, which would take {needed / 2**30:.1f} GiB of the "
            f"{available / 2**30:.1f} GiB available. Keep fewer columns (a vectorizer's "
            "max_features, SelectKBest, TruncatedSVD) or train on fewer rows at a time "
            "(partial_fit).")
    return X.toarray()


def available_memory():
    """Bytes of memory available (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_y(y, n_samples, n_classes, name="y"):
    """Integer class labels in 0..n_classes-1, as a contiguous int32 array.
    Also taken: a column of labels (n, 1), and one-hot rows (n, n_classes)
    as Keras's to_categorical makes them."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] == n_classes:
        y = one_hot_labels(y, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must hold one label per sample, shape (n,), or one-hot rows, "
                         f"shape (n, {n_classes}); got shape {y.shape}")
    if y.shape[0] != n_samples:
        raise ValueError(f"X has {n_samples} samples but {name} has {y.shape[0]} labels")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.number):
        hint = ("; np.unique(y, return_inverse=True) numbers text labels, and "
                "fastmlp.MLPClassifier takes them as they are"
                if y.dtype.kind in "OUS" else "")
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}{hint}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name} must hold integer class labels; found non-integer values")
    if y.size:
        low, high = y.min(), y.max()
        if low < 0 or high >= n_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} has label {bad.item()!r} outside 0..{n_classes - 1} "
                             f"(the model has {n_classes} classes)")
    return np.ascontiguousarray(y, dtype=np.int32)


def one_hot_labels(y, name):
    """The labels of one-hot rows (n, K): exactly one 1 per row, the rest 0."""
    if (y.dtype != bool and not np.issubdtype(y.dtype, np.number)) or np.iscomplexobj(y):
        raise ValueError(f"{name} must hold integer class labels or one-hot rows, got dtype "
                         f"{y.dtype}")
    bad = not_one_hot(y)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} has {y.shape[1]} columns, so it must be one-hot: a single 1 "
                         f"per row, the rest 0 (soft labels are not supported); row {row} is "
                         f"{y[row].tolist()}")
    return np.argmax(y == 1, axis=1)


def check_sample_weight(sample_weight, n_samples, dtype):
    """Non-negative finite weights, one per sample, not all zero, as a
    contiguous array of the model's dtype; None means all ones."""
    if sample_weight is None:
        return np.ones(n_samples, dtype)
    w = np.asarray(sample_weight)
    if w.ndim != 1 or w.shape[0] != n_samples:
        raise ValueError(f"sample_weight must hold one weight per sample ({n_samples}), "
                         f"got shape {w.shape}")
    if w.dtype == object or not np.issubdtype(w.dtype, np.number) or np.iscomplexobj(w):
        raise ValueError(f"sample_weight must hold real numbers, got dtype {w.dtype}")
    w = np.ascontiguousarray(w, dtype=dtype)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample_weight must be finite and non-negative")
    if not w.sum() > 0:
        raise ValueError("sample_weight sums to zero: nothing to learn from")
    return w
