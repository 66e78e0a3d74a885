"""fastmlp.MLPClassifier: scikit-learn's MLPClassifier interface on fastmlp's
kernels. Switch with one changed import; it works wherever a scikit-learn
classifier does (Pipeline, GridSearchCV, cross_val_score, joblib)."""
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .model import MLP
from .training import fit

ACTIVATION_NAMES = {"logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """A multi-layer perceptron classifier with scikit-learn's parameter
    names and defaults where they overlap; `dtype`, `threads` and
    `class_weight` are fastmlp's own.

    Differences from scikit-learn: the output is a softmax over all classes
    (binary problems too), Adam's epsilon is Keras's 1e-7, and `alpha` (L2)
    is applied as weight decay `alpha / batch_size` on the mean gradient of
    each batch, which is scikit-learn's penalty for full batches. Solver
    'lbfgs' and learning-rate schedules other than constant are not offered.
    """

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate_init=0.001, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, dtype="float32", threads=None,
                 class_weight=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.dtype = dtype
        self.threads = threads
        self.class_weight = class_weight

    # ------------------------------------------------------------------
    # fitting

    def fit(self, X, y, sample_weight=None):
        """Trains from scratch (or, with warm_start, from the current model)
        for up to max_iter epochs."""
        return self._fit(X, y, sample_weight, epochs=self.max_iter, classes=None,
                         incremental=self.warm_start, stopping=True)

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch over X, y; the first call needs `classes`."""
        if self.solver not in ("sgd", "adam"):
            raise AttributeError("partial_fit is only available for solvers 'sgd' and 'adam'")
        first = not hasattr(self, "classes_")
        if first and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit")
        return self._fit(X, y, sample_weight, epochs=1, classes=classes, incremental=not first,
                         stopping=False)

    def _fit(self, X, y, sample_weight, epochs, classes, incremental, stopping):
        self._check_params()
        reset = not (incremental and hasattr(self, "model_"))
        X, y = validate_data(self, X, y, reset=reset, dtype=[np.float32, np.float64],
                             y_numeric=False, multi_output=False)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if reset:
            self.classes_ = unique_labels(y if classes is None else classes)
        elif classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"classes {classes!r} differ from the first call's {self.classes_!r}")
        if len(self.classes_) < 2:
            raise ValueError("The number of classes has to be greater than one; got "
                             f"{len(self.classes_)} class")
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"y contains labels not in classes: {unknown!r}")
        labels = np.searchsorted(self.classes_, y)
        weights = self._sample_weight(y, sample_weight)
        if reset:
            sizes = [X.shape[1], *self._hidden(), len(self.classes_)]
            self.model_ = MLP(sizes, activation=ACTIVATION_NAMES[self.activation],
                              dtype=self.dtype, init="xavier", seed=self._seed())
            self.t_ = 0
            self.loss_curve_ = []
            self.validation_scores_ = [] if self.early_stopping else None
            self.best_loss_ = np.inf
            self.best_validation_score_ = None
            self.n_iter_ = 0

        validation = None
        if stopping and self.early_stopping:
            X, X_val, labels, y_val, weights, _ = train_test_split(
                X, labels, weights, test_size=self.validation_fraction,
                random_state=self._seed(), stratify=labels)
            validation = (X_val, y_val)
        batch_size = self._batch_size(X.shape[0])
        optimizer = "adam" if self.solver == "adam" else ("momentum" if self.momentum > 0 else "sgd")
        history = fit(
            self.model_, X, labels, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
            lr=self.learning_rate_init, momentum=self.momentum,
            nesterov=bool(self.nesterovs_momentum), weight_decay=self.alpha / batch_size,
            shuffle=self.shuffle, validation_data=validation, sample_weight=weights,
            seed=self._seed() if reset else None, threads=self.threads, verbose=int(self.verbose),
            patience=self.n_iter_no_change if stopping else None, min_delta=self.tol,
            monitor="val_accuracy" if validation is not None else "loss",
            restore_best_weights=validation is not None)
        self._record(history, X.shape[0], validation is not None)
        if stopping and history.stopped_epoch is None and self.n_iter_ >= self.max_iter \
                and self.max_iter > 0:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                          "and the optimization hasn't converged yet.", ConvergenceWarning)
        return self

    def _record(self, history, n_samples, validating):
        epochs = len(history.epoch)
        self.n_iter_ += epochs
        self.t_ += epochs * n_samples
        self.loss_curve_ += history.history["loss"]
        if self.loss_curve_:
            self.loss_ = self.loss_curve_[-1]
        if validating:
            self.validation_scores_ += history.history["val_accuracy"]
            self.best_validation_score_ = max(self.validation_scores_)
            self.best_loss_ = None
        elif self.loss_curve_:
            self.best_loss_ = min(self.loss_curve_)

    def _sample_weight(self, y, sample_weight):
        weights = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        if self.class_weight is not None:
            by_class = compute_sample_weight(self.class_weight, y)
            weights = by_class if weights is None else weights * by_class
        return weights if weights is not None else np.ones(len(y))

    def _check_params(self):
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"The activation '{self.activation}' is not supported. Supported "
                             f"activations are {sorted(ACTIVATION_NAMES)}.")
        if self.solver not in ("sgd", "adam"):
            raise ValueError(f"The solver '{self.solver}' is not supported by fastmlp; "
                             "use 'sgd' or 'adam'.")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 0):
            raise ValueError(f"max_iter must be a non-negative integer, got {self.max_iter!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in (0, 1), "
                             f"got {self.validation_fraction!r}")
        if self.n_iter_no_change < 1:
            raise ValueError(f"n_iter_no_change must be >= 1, got {self.n_iter_no_change!r}")
        if self.alpha < 0 or self.learning_rate_init <= 0 or self.tol < 0:
            raise ValueError("alpha and tol must be >= 0 and learning_rate_init > 0")

    def _hidden(self):
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if np.isscalar(sizes) else list(sizes)
        if any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {sizes!r}")
        return [int(s) for s in sizes]

    def _batch_size(self, n_samples):
        if self.batch_size == "auto":
            return min(200, n_samples)
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be 'auto' or a positive integer, "
                             f"got {self.batch_size!r}")
        return min(int(self.batch_size), n_samples)

    def _seed(self):
        """A fixed seed from random_state (an int, a RandomState or None)."""
        state = self.random_state
        if state is None or isinstance(state, (int, np.integer)):
            return None if state is None else int(state)
        return int(state.randint(np.iinfo(np.int32).max))

    # ------------------------------------------------------------------
    # fitted attributes and prediction

    @property
    def coefs_(self):
        check_is_fitted(self, "model_")
        return self.model_.weights

    @property
    def intercepts_(self):
        check_is_fitted(self, "model_")
        return self.model_.biases

    @property
    def n_layers_(self):
        check_is_fitted(self, "model_")
        return len(self.model_.layer_sizes)

    @property
    def n_outputs_(self):
        check_is_fitted(self, "model_")
        return len(self.classes_)

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self.model_.predict_proba(X).astype(np.float64)

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        probs = self.predict_proba(X)
        return self.classes_[np.argmax(probs, axis=1)]
