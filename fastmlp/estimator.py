"""fastmlp.MLPClassifier and fastmlp.MLPRegressor: scikit-learn's interface
on fastmlp's kernels. Switch with one changed import; they work wherever a
scikit-learn estimator does (Pipeline, GridSearchCV, cross_val_score,
joblib)."""
import warnings

import numba
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .full_batch import minimize_lbfgs
from .model import MLP
from .progress import Callback
from .training import TrainingDiverged, TrainingInterrupted, fit, thread_count
from .validation import check_int

ACTIVATION_NAMES = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
LEARNING_RATES = ("constant", "invscaling", "adaptive")
SOLVERS = ("lbfgs", "sgd", "adam")
SPARSE_FORMATS = ["csr", "csc"]  # as scikit-learn's; others are converted to CSR
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def stochastic_solver(estimator):
    """Whether partial_fit exists: for solvers 'sgd' and 'adam' only."""
    if estimator.solver == "lbfgs":
        raise AttributeError("partial_fit is only available for solvers 'sgd' and 'adam'")
    return True


def sklearn_gradient_scale(output, n_outputs):
    """How many times steeper scikit-learn's loss is than the head's: its
    squared loss has the gradient of half the squared error summed over
    outputs (the linear head's is the mean over outputs), and its binary log
    loss and Poisson loss sum over outputs (the heads' average)."""
    return {"softmax": 1.0, "linear": n_outputs / 2}.get(output, float(n_outputs))


def sklearn_loss(output, n_outputs, loss):
    """The loss scikit-learn reports for the head's mean loss: half the mean
    squared error, or binary log loss or half Poisson deviance summed over
    outputs."""
    return loss * {"softmax": 1.0, "linear": 0.5}.get(output, float(n_outputs))


class InvScaling:
    """scikit-learn's 'invscaling': learning_rate_init / (t + 1) ** power_t
    for the epoch that starts after t samples."""

    def __init__(self, lr, power_t, n_samples):
        self.lr, self.power_t, self.n_samples = lr, power_t, n_samples

    def __call__(self, epoch):
        return self.lr / (epoch * self.n_samples + 1) ** self.power_t


class NoImprovement(Callback):
    """What scikit-learn's stochastic solvers do after each epoch: the loss
    they report (loss_curve_: the head's loss on scikit-learn's scale, plus
    the L2 term), with verbose 'Iteration N, loss = L' and 'Validation
    score: S', and the count of epochs without a tol improvement of the
    training loss (or, with early_stopping, of the validation score, whose
    best epoch's parameters it keeps). After more than n_iter_no_change such
    epochs training stops, or for learning_rate 'adaptive' (this object is
    then the schedule too) the rate is divided by 5, and training stops once
    it is at most 1e-6. The best value and the count carry over from the
    estimator's previous fits, as there."""

    def __init__(self, estimator, lr, scale, adaptive, validating, penalty):
        self.estimator, self.model = estimator, estimator.model_
        self.lr, self.scale, self.adaptive = lr, scale, adaptive
        self.validating, self.penalty = validating, penalty
        self.count = getattr(estimator, "_no_improvement_count", 0)
        if validating:
            best = estimator.best_validation_score_
            self.best = -np.inf if best is None else best
            self.best_params = getattr(estimator, "_best_params", None)
        else:
            self.best = estimator.best_loss_ if estimator.best_loss_ is not None else np.inf
        self.losses, self.scores = [], []

    def __call__(self, epoch):
        return self.lr

    def on_epoch_end(self, epoch, n_steps, epoch_time, logs):
        model, estimator = self.model, self.estimator
        tol, patience, verbose = estimator.tol, estimator.n_iter_no_change, estimator.verbose
        weights = sum(float(np.sum(w * w, dtype=np.float64)) for w in model.weights)
        loss = sklearn_loss(model.output, model.n_outputs, logs["loss"]) + self.penalty * weights
        self.losses.append(loss)
        if verbose:
            print(f"Iteration {len(self.losses)}, loss = {loss:.8f}")
        if self.validating:
            score = logs[f"val_{model.metric}"]
            self.scores.append(score)
            if verbose:
                print(f"Validation score: {score:f}")
            self.count = self.count + 1 if score < self.best + tol else 0
            if score > self.best:
                self.best, self.best_params = score, model.params.copy()
        else:
            self.count = self.count + 1 if loss > self.best - tol else 0
            self.best = min(self.best, loss)
        if self.count <= patience:
            return False
        message = (f"{'Validation score' if self.validating else 'Training loss'} did not "
                   f"improve more than tol={tol:f} for {patience} consecutive epochs.")
        if self.adaptive and self.lr / self.scale > 1e-6:  # (scikit-learn's rate)
            self.lr /= 5
            self.count = 0
            if verbose:
                print(f"{message} Setting learning rate to {self.lr / self.scale:f}")
            return False
        if verbose:
            print(f"{message}{' Learning rate too small.' if self.adaptive else ''} Stopping.")
        return True


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, fitting,
    fitted attributes."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype=None, threads=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
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
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.threads = threads

    def fit(self, X, y, sample_weight=None):
        """Trains from scratch (or, with warm_start, from the current model)
        for up to max_iter epochs."""
        return self._fit(X, y, sample_weight, epochs=self.max_iter, classes=None,
                         incremental=self.warm_start, stopping=True)

    def _fit(self, X, y, sample_weight, epochs, classes, incremental, stopping):
        self._check_params()
        reset = not (incremental and hasattr(self, "model_"))
        X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32],
                             accept_sparse=SPARSE_FORMATS,
                             y_numeric=self._regressor, multi_output=True)
        targets, output, n_outputs = self._targets(y, reset, classes)
        weights = self._sample_weight(y, sample_weight)
        if reset:
            sizes = [X.shape[1], *self._hidden(), n_outputs]
            self.model_ = MLP(sizes, activation=ACTIVATION_NAMES[self.activation],
                              dtype=self.dtype or X.dtype.name, init="xavier",
                              seed=self._seed(), output=output)
            self.t_ = 0
        scale = sklearn_gradient_scale(output, n_outputs)
        if self.solver == "lbfgs":
            return self._fit_lbfgs(X, targets, weights, scale)
        if reset or not hasattr(self, "loss_curve_"):  # (no curves after lbfgs)
            self.loss_curve_ = []
            self.validation_scores_ = [] if self.early_stopping else None
            self.best_loss_ = None if self.early_stopping else np.inf
            self.best_validation_score_ = None
            self._no_improvement_count = 0
            self._adaptive_lr = self._best_params = None
        if not stopping and self.early_stopping:
            raise ValueError("partial_fit does not support early_stopping=True")
        validation = None
        if stopping and self.early_stopping:
            stratify = self._classes_of(targets)
            X, X_val, targets, y_val, weights, _ = train_test_split(
                X, targets, weights, test_size=self.validation_fraction,
                random_state=self._seed(), stratify=stratify)
            validation = (X_val, y_val)
        batch_size = self._batch_size(X.shape[0])
        optimizer = "adam" if self.solver == "adam" else ("momentum" if self.momentum > 0 else "sgd")
        # scikit-learn's L2 term (alpha over the batch's total sample weight)
        # and steps, for a loss `scale` times as steep as the head's
        decay = self.alpha / (batch_size * weights.mean() * scale) if weights.sum() > 0 else 0.0
        lr = self.learning_rate_init
        if optimizer != "adam":
            lr *= scale
        tracker, schedule = self._tracker(lr, scale, X.shape[0], batch_size, weights,
                                          validation is not None)
        try:
            history = fit(
                self.model_, X, targets, epochs=epochs, batch_size=batch_size,
                optimizer=optimizer, lr=lr, momentum=self.momentum,
                nesterov=bool(self.nesterovs_momentum), weight_decay=decay, shuffle=self.shuffle,
                validation_data=validation, sample_weight=weights,
                seed=self._seed() if reset else None, threads=self._threads(),
                callbacks=[tracker], lr_schedule=schedule, beta_1=self.beta_1,
                beta_2=self.beta_2, epsilon=self.epsilon)
        except TrainingInterrupted:  # as scikit-learn: a warning, and the model kept
            warnings.warn("Training interrupted by user.")
            self._record(tracker, X.shape[0])
            return self
        except TrainingDiverged as diverged:  # in scikit-learn's words, and this one's settings
            raise ValueError(
                "Solver produced non-finite parameter weights. The input data may contain large "
                f"values and need to be preprocessed (the loss diverged at epoch "
                f"{diverged.epoch + 1}, step {diverged.step + 1}; or lower learning_rate_init "
                f"from {self.learning_rate_init!r}).") from None
        self._record(tracker, X.shape[0])
        if stopping and history.stopped_epoch is None and self.n_iter_ >= self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                          "and the optimization hasn't converged yet.", ConvergenceWarning)
        return self

    def _threads(self):
        """threads, capped at what this process may run: a joblib worker
        (GridSearchCV(n_jobs=2), say) is given NUMBA_NUM_THREADS=1, and the
        parameters are the same for any thread count."""
        threads = check_int("threads", self.threads, minimum=1, allow_none=True)
        return None if threads is None else min(threads, numba.config.NUMBA_NUM_THREADS)

    def _fit_lbfgs(self, X, targets, weights, scale):
        """scikit-learn's solver 'lbfgs': SciPy's L-BFGS-B on the whole data's
        loss and L2 term (alpha over the total sample weight), each
        evaluation by the training kernels (fastmlp.full_batch)."""
        def report(intermediate_result):
            print(f"Iteration {report.iteration}, loss = {intermediate_result.fun:.8f}")
            report.iteration += 1
        report.iteration = 1
        l2 = self.alpha / weights.sum() if weights.sum() > 0 else 0.0
        with thread_count(self._threads()):
            result, loss = minimize_lbfgs(self.model_, X, targets, weights, l2=l2,
                                          loss_scale=scale, max_iter=self.max_iter,
                                          max_fun=self.max_fun, tol=self.tol,
                                          callback=report if self.verbose else None)
        if not np.isfinite(self.model_.params).all():
            raise ValueError("Solver produced non-finite parameter weights. The input data may "
                             "contain large values and need to be preprocessed.")
        self.n_iter_ = min(result.nit, self.max_iter)
        weights_l2 = sum(float(np.sum(w * w, dtype=np.float64)) for w in self.model_.weights)
        self.loss_ = (sklearn_loss(self.model_.output, self.model_.n_outputs, loss) +
                      0.5 * l2 * weights_l2)
        if result.status != 0:
            warnings.warn(f"lbfgs failed to converge after {result.nit} iteration(s) "
                          f"(status={result.status}): {result.message}. Increase the number "
                          f"of iterations (max_iter={self.max_iter}, max_fun={self.max_fun}) "
                          "or scale the data.", ConvergenceWarning)
        return self

    def _classes_of(self, targets):
        """Each row's class, to stratify a validation split by (None for
        regression and multi-label targets)."""
        return None

    def _tracker(self, lr, scale, n_samples, batch_size, weights, validating):
        """(NoImprovement, lr_schedule) for scikit-learn's learning_rate, which
        (as there) applies to solver 'sgd' only. An 'adaptive' rate carries
        over from the previous fit."""
        adaptive = self.solver == "sgd" and self.learning_rate == "adaptive"
        if adaptive and getattr(self, "_adaptive_lr", None) is not None:
            lr = self._adaptive_lr
        # scikit-learn adds alpha / 2 * |W|^2 over each batch's weight to its loss
        penalty = (0.5 * self.alpha * -(-n_samples // batch_size) / (n_samples * weights.mean())
                   if weights.sum() > 0 else 0.0)
        tracker = NoImprovement(self, lr, scale, adaptive, validating, penalty)
        if adaptive:
            return tracker, tracker
        if self.solver == "sgd" and self.learning_rate == "invscaling":
            return tracker, InvScaling(lr, self.power_t, n_samples)
        return tracker, "constant"

    def _record(self, tracker, n_samples):
        """The fitted attributes after a stochastic fit of the epochs that
        tracker (NoImprovement) saw."""
        epochs = len(tracker.losses)
        self.n_iter_ = epochs  # this call's epochs, as in scikit-learn; t_ counts them all
        self.t_ += epochs * n_samples
        self.loss_curve_ += tracker.losses
        if self.loss_curve_:
            self.loss_ = self.loss_curve_[-1]
        self._no_improvement_count = tracker.count
        if tracker.adaptive:
            self._adaptive_lr = tracker.lr
        if tracker.validating:
            self.validation_scores_ += tracker.scores
            if tracker.best_params is not None:  # restored, as scikit-learn does
                np.copyto(self.model_.params, tracker.best_params)
                self.best_validation_score_ = tracker.best
                self._best_params = tracker.best_params
        else:
            self.best_loss_ = tracker.best

    def _sample_weight(self, y, sample_weight):
        weights = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        class_weight = getattr(self, "class_weight", None)
        if class_weight is not None:
            by_class = compute_sample_weight(class_weight, y)
            weights = by_class if weights is None else weights * by_class
        return weights if weights is not None else np.ones(len(y))

    def _check_params(self):
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"The activation '{self.activation}' is not supported. Supported "
                             f"activations are {sorted(ACTIVATION_NAMES)}.")
        if self.solver not in SOLVERS:
            raise ValueError(f"The solver '{self.solver}' is not supported. Supported solvers "
                             f"are {list(SOLVERS)}.")
        if self.learning_rate not in LEARNING_RATES:
            raise ValueError(f"learning rate {self.learning_rate} is not supported; expected "
                             f"one of {LEARNING_RATES}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.max_fun, (int, np.integer)) and self.max_fun >= 1):
            raise ValueError(f"max_fun must be a positive integer, got {self.max_fun!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in (0, 1), "
                             f"got {self.validation_fraction!r}")
        if self.n_iter_no_change < 1:
            raise ValueError(f"n_iter_no_change must be >= 1, got {self.n_iter_no_change!r}")
        if self.alpha < 0 or self.learning_rate_init <= 0 or self.tol < 0 or self.power_t < 0:
            raise ValueError("alpha, tol and power_t must be >= 0 and learning_rate_init > 0")
        if self.dtype not in (None, "float32", "float64", "bfloat16", np.float32, np.float64):
            raise ValueError(f"dtype must be None (the input's), 'float32', 'float64' or "
                             f"'bfloat16', got {self.dtype!r}")

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
        if self.batch_size > n_samples:  # (scikit-learn's words)
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going "
                          "to be clipped")
        return min(int(self.batch_size), n_samples)

    def _seed(self):
        """A fixed seed from random_state (an int, a RandomState or None)."""
        state = self.random_state
        if state is None or isinstance(state, (int, np.integer)):
            return None if state is None else int(state)
        return int(state.randint(np.iinfo(np.int32).max))

    def _input(self, X):
        check_is_fitted(self, "model_")
        if (type(X) is np.ndarray and X.dtype in FLOAT_DTYPES and X.ndim == 2
                and X.shape[0] > 0 and X.shape[1] == self.n_features_in_
                and not hasattr(self, "feature_names_in_")):
            # what validate_data returns for such rows (0.1-0.2 ms a call, more
            # than predicting a few rows); model_ checks their values (check_X)
            return X
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32],
                             accept_sparse=SPARSE_FORMATS)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # made dense for the kernels (validation.dense_rows)
        return tags

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
        return self.model_.n_outputs

    @property
    def out_activation_(self):
        check_is_fitted(self, "model_")
        return {"softmax": "softmax", "linear": "identity", "sigmoid": "logistic",
                "poisson": "exp"}[self.model_.output]


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multi-layer perceptron classifier with scikit-learn's parameters,
    names and defaults; `dtype` (default: the input's), `threads` and
    `class_weight` are fastmlp's own. A 0/1 indicator matrix as y trains a
    multi-label classifier (independent sigmoid outputs).

    Two classes get one logistic output, more a softmax, as scikit-learn's.
    """
    _regressor = False

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype=None, threads=None, class_weight=None):
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init, power_t=power_t,
            max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol,
            verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun, dtype=dtype,
            threads=threads)
        self.class_weight = class_weight

    @available_if(stochastic_solver)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch over X, y; the first call needs `classes`."""
        first = not hasattr(self, "classes_")
        if first and classes is None and type_of_target(y) != "multilabel-indicator":
            raise ValueError("classes must be passed on the first call to partial_fit")
        return self._fit(X, y, sample_weight, epochs=1, classes=classes, incremental=not first,
                         stopping=False)

    def _targets(self, y, reset, classes):
        if np.ndim(y) == 2 and y.shape[1] > 1 or type_of_target(y) == "multilabel-indicator":
            if type_of_target(y) != "multilabel-indicator":
                raise ValueError("a 2-D y must be a multi-label 0/1 indicator matrix")
            if reset:
                self.classes_ = np.arange(y.shape[1])
            elif len(self.classes_) != y.shape[1] or getattr(self, "_output", None) != "sigmoid":
                raise ValueError("y has other labels than the first fit's")
            self._output = "sigmoid"
            return y, "sigmoid", y.shape[1]
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if reset:
            self.classes_ = unique_labels(y if classes is None else classes)
            # two classes: one logistic output, as scikit-learn's
            self._output = "binary" if len(self.classes_) == 2 else "softmax"
        elif self._output == "sigmoid":
            raise ValueError("y has other labels than the first fit's")
        elif classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"classes {np.asarray(classes).tolist()} differ from the first call's "
                             f"{self.classes_.tolist()}")
        if len(self.classes_) < 2:
            raise ValueError("The number of classes has to be greater than one; got "
                             f"{len(self.classes_)} class")
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"y contains labels not in classes: {unknown.tolist()}")
        indices = np.searchsorted(self.classes_, y)
        if self._output == "binary":  # the second class's 0/1 indicator
            return indices.reshape(-1, 1), "sigmoid", 1
        return indices, "softmax", len(self.classes_)

    def _classes_of(self, targets):
        if self._output == "sigmoid":
            return None
        return targets.ravel()

    def predict_proba(self, X):
        X = self._input(X)
        proba = self.model_.predict_proba(X).astype(np.float64)
        if self._output == "binary":
            return np.column_stack([1 - proba[:, 0], proba[:, 0]])
        return proba

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        X = self._input(X)
        if self._output == "binary":
            return self.classes_[self.model_.predict(X)[:, 0]]
        if self._output == "sigmoid":
            return self.model_.predict(X)
        return self.classes_[self.model_.predict(X)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multi-layer perceptron regressor (linear output, squared error; or,
    with loss="poisson", exp output and Poisson deviance, for counts or
    rates) with scikit-learn's parameters, names and defaults; `dtype`
    (default: the input's) and `threads` are fastmlp's own. y may be (n,) or
    (n, k); predict returns the same shape. loss_curve_ holds scikit-learn's loss (half the mean squared error, or
    half the Poisson deviance), so the two can be compared.
    """
    _regressor = True

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype=None, threads=None):
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init, power_t=power_t,
            max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol,
            verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun, dtype=dtype,
            threads=threads)
        self.loss = loss

    @available_if(stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over X, y."""
        return self._fit(X, y, sample_weight, epochs=1, classes=None,
                         incremental=hasattr(self, "model_"), stopping=False)

    def _check_params(self):
        super()._check_params()
        if self.loss not in ("squared_error", "poisson"):
            raise ValueError(f"loss {self.loss!r} is not supported; fastmlp has "
                             "'squared_error' and 'poisson'")

    def _targets(self, y, reset, classes):
        y = np.asarray(y, np.float64)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]  # predict answers (n,) for one output, as scikit-learn's
        n_outputs = 1 if y.ndim == 1 else y.shape[1]
        if not reset and n_outputs != self.model_.n_outputs:
            raise ValueError(f"y has {n_outputs} outputs, the model {self.model_.n_outputs}")
        output = "poisson" if self.loss == "poisson" else "linear"
        if output == "poisson" and (y < 0).any():
            raise ValueError("Some value(s) of y are negative which is not allowed for "
                             "Poisson regression.")
        return y, output, n_outputs

    def predict(self, X):
        X = self._input(X)
        return self.model_.predict(X).astype(np.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
