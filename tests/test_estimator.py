"""fastmlp.MLPClassifier and MLPRegressor against scikit-learn's own
estimator checks (every one, sample-weight equivalence included), and in
scikit-learn's machinery."""
import os
import pickle
import re
import signal
import warnings

import numba
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sparse
from sklearn.compose import make_column_transformer
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fastmlp.training
from fastmlp import MLPClassifier, MLPRegressor

from conftest import relative_error


def expected_failures(estimator):
    """Checks that scikit-learn's own estimator with the same settings fails
    too (test_lbfgs_saturates_as_scikit_learns shows it)."""
    if isinstance(estimator, MLPClassifier) and estimator.solver == "lbfgs":
        return {"check_classifiers_multilabel_output_format_predict_proba":
                "lbfgs fits the check's toy labels to logits beyond 37, whose sigmoid is 1.0 "
                "in float64; scikit-learn's MLPClassifier(solver='lbfgs') fails it alike"}
    return {}


@parametrize_with_checks([MLPClassifier(random_state=0), MLPRegressor(random_state=0),
                          MLPClassifier(solver="lbfgs", random_state=0),
                          MLPRegressor(solver="lbfgs", random_state=0)],
                         expected_failed_checks=expected_failures)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    return load_digits(return_X_y=True)


def test_grid_search_with_two_jobs_over_a_pipeline(digits):
    """joblib's workers get NUMBA_NUM_THREADS = cores // n_jobs (1 on two
    cores); threads=2 is then capped, and the scores are a serial search's."""
    X, y = digits
    grid = {"mlpclassifier__hidden_layer_sizes": [(32,), (64,)],
            "mlpclassifier__alpha": [1e-4, 1e-1]}
    scores = []
    for threads, jobs in ((2, 2), (1, 1)):
        pipe = make_pipeline(StandardScaler(),
                             MLPClassifier(max_iter=30, random_state=0, threads=threads))
        search = GridSearchCV(pipe, grid, cv=3, n_jobs=jobs, error_score="raise").fit(X, y)
        scores.append(search.cv_results_["mean_test_score"])
    assert len(scores[0]) == 4 and np.array_equal(scores[0], scores[1])
    assert search.best_score_ > 0.9
    assert cross_val_score(search.best_estimator_, X, y, cv=3).mean() > 0.9


def test_float_rows_are_predicted_without_scikit_learns_validation(digits, monkeypatch):
    """A C float array of the fitted width skips validate_data (its cost is
    more than predicting a few rows); anything else still goes through it."""
    X, y = digits
    clf = MLPClassifier(max_iter=5, random_state=0).fit(X / 16, y)
    expected = clf.predict_proba(X[:9] / 16)
    monkeypatch.setattr(fastmlp.estimator, "validate_data",
                        lambda *a, **k: pytest.fail("validated again"))
    for dtype in (np.float64, np.float32):
        rows = (X[:9] / 16).astype(dtype)
        assert np.allclose(clf.predict_proba(rows), expected, atol=1e-6)
        assert np.array_equal(clf.predict(rows), expected.argmax(axis=1))
    for other in ((X[:9] / 16).tolist(), X[:9].astype(np.int64), (X[:9] / 16)[:, :10],
                  np.zeros((0, 64))):
        with pytest.raises(pytest.fail.Exception, match="validated again"):
            clf.predict(other)
    with pytest.raises(ValueError, match="NaN"):  # the values are still checked
        clf.predict(np.full((1, 64), np.nan))


def test_threads_are_capped_at_what_the_process_allows(digits, monkeypatch):
    X, y = digits
    one = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0, threads=1)
    one.fit(X, y)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)
    for solver in ("adam", "lbfgs"):
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0, threads=64,
                            solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        if solver == "adam":
            assert np.array_equal(clf.model_.params, one.model_.params)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        MLPClassifier(threads=0).fit(X, y)


def test_fitted_attributes_and_string_labels(digits):
    X, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(40, 20), max_iter=15, random_state=0).fit(X, names)
    assert list(clf.classes_) == sorted(set(names))
    assert set(clf.predict(X[:20])) <= set(names)
    assert clf.score(X, names) > 0.9
    assert [c.shape for c in clf.coefs_] == [(64, 40), (40, 20), (20, 10)]
    assert [b.shape for b in clf.intercepts_] == [(40,), (20,), (10,)]
    assert clf.n_features_in_ == 64 and clf.n_iter_ == 15 and clf.t_ == 15 * len(X)
    assert len(clf.loss_curve_) == 15 and clf.best_loss_ == min(clf.loss_curve_)
    probs = clf.predict_proba(X[:5])
    assert np.allclose(probs.sum(axis=1), 1) and np.allclose(np.log(probs), clf.predict_log_proba(X[:5]))
    again = pickle.loads(pickle.dumps(clf))
    assert np.array_equal(again.predict_proba(X), clf.predict_proba(X))
    assert np.shares_memory(again.coefs_[0], again.model_.params)


def test_binary_problems_and_partial_fit(digits):
    X, y = digits
    X, y = X[y < 2], np.where(y[y < 2] == 1, "odd", "even")
    clf = MLPClassifier(random_state=0)
    for _ in range(15):
        clf.partial_fit(X, y, classes=["even", "odd"])
    assert clf.n_iter_ == 1 and clf.t_ == 15 * len(X) and clf.score(X, y) > 0.95
    # one logistic output, as scikit-learn's: coefs_, n_outputs_, probabilities
    assert clf.model_.output == "sigmoid" and clf.coefs_[-1].shape == (100, 1)
    assert clf.n_outputs_ == 1 and clf.out_activation_ == "logistic"
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 2) and np.allclose(proba.sum(axis=1), 1)
    assert np.array_equal(clf.predict(X), clf.classes_[(proba[:, 1] >= 0.5).astype(int)])
    from sklearn.neural_network import MLPClassifier as SklearnMLPClassifier
    theirs = SklearnMLPClassifier(random_state=0).partial_fit(X, y, classes=["even", "odd"])
    assert [c.shape for c in clf.coefs_] == [c.shape for c in theirs.coefs_]
    with pytest.raises(ValueError, match="classes must be passed"):
        MLPClassifier().partial_fit(X, y)


def sklearn_stopping(values, validating, adaptive, tol, patience):
    """(the epoch scikit-learn stops after, or None; its learning rates) for
    a series of training losses or validation scores, by its own code:
    MLPClassifier._update_no_improvement_count and SGDOptimizer."""
    from sklearn.neural_network import MLPClassifier as SklearnMLPClassifier
    from sklearn.neural_network._stochastic_optimizers import SGDOptimizer
    theirs = SklearnMLPClassifier(tol=tol, n_iter_no_change=patience)
    theirs.loss_curve_, theirs.validation_scores_ = [], []
    theirs.best_loss_, theirs.best_validation_score_ = np.inf, -np.inf
    theirs._no_improvement_count, theirs.coefs_, theirs.intercepts_ = 0, [], []
    optimizer = SGDOptimizer([np.zeros(1)], learning_rate_init=0.1,
                             lr_schedule="adaptive" if adaptive else "constant")
    rates = []
    for epoch, value in enumerate(values):
        theirs.loss_curve_.append(value)
        theirs._score = lambda X, y, sample_weight=None: value
        theirs._update_no_improvement_count(validating, None, None, None)
        rates.append(optimizer.learning_rate)
        if theirs._no_improvement_count > patience:
            if optimizer.trigger_stopping("", False):
                return epoch, rates
            theirs._no_improvement_count = 0
    return None, rates


@pytest.mark.parametrize("validating", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_stopping_and_adaptive_rates_follow_scikit_learns_code(validating, adaptive):
    """The same series of losses (or validation scores) stops training, and
    for 'adaptive' lowers the rate, after the same epochs as scikit-learn's
    own bookkeeping does."""
    from fastmlp.estimator import NoImprovement
    rng = np.random.default_rng(1)
    for trial in range(20):
        steps = rng.normal(0.02, 0.05, 300) * (1 if validating else -1)
        values = list(1.0 + np.cumsum(steps))
        estimator = MLPClassifier(tol=0.01, n_iter_no_change=3, early_stopping=validating)
        estimator.model_ = fastmlp.MLP([2, 3, 2], seed=0)
        estimator.best_loss_, estimator.best_validation_score_ = np.inf, None
        tracker = NoImprovement(estimator, 0.1, 1.0, adaptive, validating, penalty=0.0)
        ours, rates = None, []
        for epoch, value in enumerate(values):
            rates.append(tracker.lr)
            if tracker.on_epoch_end(epoch, 1, 0.0, {"loss": value, "val_accuracy": value}):
                ours = epoch
                break
        expected_stop, expected_rates = sklearn_stopping(values, validating, adaptive, 0.01, 3)
        assert ours == expected_stop and ours is not None, trial
        assert rates == pytest.approx(expected_rates), trial


def test_early_stopping_keeps_the_best_validation_score(digits, capsys):
    X, y = digits
    clf = MLPClassifier(early_stopping=True, n_iter_no_change=3, max_iter=300, verbose=True,
                        learning_rate_init=0.01, random_state=0).fit(X, y)
    assert clf.n_iter_ < 300
    assert clf.best_loss_ is None
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert len(clf.validation_scores_) == clf.n_iter_
    # the best epoch's weights are back: they score it on the validation rows
    _, X_val, _, y_val = train_test_split(X, y, test_size=0.1, random_state=0, stratify=y)
    assert clf.score(X_val, y_val) == clf.best_validation_score_
    # verbose prints scikit-learn's lines
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * clf.n_iter_ + 1
    for epoch in range(clf.n_iter_):
        assert re.fullmatch(rf"Iteration {epoch + 1}, loss = \d\.\d{{8}}", lines[2 * epoch])
        assert lines[2 * epoch + 1] == f"Validation score: {clf.validation_scores_[epoch]:f}"
    assert lines[-1] == ("Validation score did not improve more than tol=0.000100 for 3 "
                         "consecutive epochs. Stopping.")


def test_class_weight_moves_predictions(digits):
    X, y = digits
    plain = MLPClassifier(max_iter=10, random_state=0).fit(X, y)
    heavy = MLPClassifier(max_iter=10, random_state=0, class_weight={3: 50.0}).fit(X, y)
    assert (heavy.predict(X) == 3).sum() > (plain.predict(X) == 3).sum() + 50
    balanced = MLPClassifier(max_iter=10, random_state=0, class_weight="balanced").fit(X, y)
    assert balanced.score(X, y) > 0.9


def test_warm_start_continues(digits):
    X, y = digits
    clf = MLPClassifier(max_iter=3, warm_start=True, random_state=0)
    clf.fit(X, y)
    first = clf.coefs_[0].copy()
    clf.fit(X, y)
    assert not np.array_equal(first, clf.coefs_[0])
    # as in scikit-learn: n_iter_ counts this call's epochs, t_ and loss_curve_ all of them
    assert clf.n_iter_ == 3 and clf.t_ == 6 * len(X) and len(clf.loss_curve_) == 6
    # the optimizer's state carries over too (scikit-learn restarts Adam's):
    # two warm fits of 3 epochs are one fit of 6
    once = MLPClassifier(max_iter=6, n_iter_no_change=100, random_state=0).fit(X, y)
    assert np.array_equal(clf.model_.params, once.model_.params)
    clf.partial_fit(X, y)
    assert clf.n_iter_ == 1 and clf.t_ == 7 * len(X) and len(clf.loss_curve_) == 7


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_sparse_input_fits_as_dense(digits, solver):
    """As scikit-learn's estimators, these take SciPy sparse rows (made
    dense for the kernels), and fit them bit for bit as the dense ones."""
    X, y = digits
    X = X[:400] / 16
    for estimator, target in ((MLPClassifier, y[:400]), (MLPRegressor, X[:400, 20])):
        dense = estimator(hidden_layer_sizes=(16,), max_iter=5, solver=solver, random_state=0)
        dense.fit(X, target)
        for make in (sparse.csr_matrix, sparse.csc_array, sparse.coo_matrix):
            fitted = estimator(hidden_layer_sizes=(16,), max_iter=5, solver=solver,
                               random_state=0).fit(make(X), target)
            assert np.array_equal(fitted.model_.params, dense.model_.params)
            assert np.array_equal(fitted.predict(make(X)), dense.predict(X))


def test_one_hot_columns_from_a_column_transformer():
    """OneHotEncoder (in a ColumnTransformer) hands on a sparse matrix."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"colour": rng.choice(["red", "green", "blue"], 300),
                          "size": rng.normal(size=300)})
    y = (table["colour"] == "red") ^ (table["size"] > 0)
    encode = make_column_transformer((OneHotEncoder(), ["colour"]), (StandardScaler(), ["size"]),
                                     sparse_threshold=1.0)
    assert sparse.issparse(encode.fit_transform(table))
    pipe = make_pipeline(encode, MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01,
                                               max_iter=200, random_state=0))
    assert pipe.fit(table, y).score(table, y) > 0.95


def test_partial_fit_refuses_early_stopping_and_big_batches_warn(digits):
    """As scikit-learn's: partial_fit has no validation split to stop on,
    and a batch_size above the rows is clipped, with scikit-learn's warning."""
    X, y = digits
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=np.arange(10))
    with pytest.warns(UserWarning, match="batch_size` less than 1 or larger than sample size"):
        clipped = MLPClassifier(batch_size=500, max_iter=2, random_state=0).fit(X[:100], y[:100])
    whole = MLPClassifier(batch_size=100, max_iter=2, random_state=0).fit(X[:100], y[:100])
    assert np.array_equal(clipped.model_.params, whole.model_.params)


@pytest.mark.parametrize("early_stopping", [False, True])
def test_ctrl_c_keeps_the_model_as_scikit_learns(digits, monkeypatch, early_stopping):
    """Ctrl-C (here after the 4th epoch's record) ends fit with scikit-learn's
    warning and a usable model: the epochs done, with early stopping the
    best epoch's weights."""
    X, y = digits
    record = fastmlp.training.record_epoch
    params = []

    def record_then_interrupt(history, model, epoch, logs, elapsed, validation):
        record(history, model, epoch, logs, elapsed, validation)
        params.append(model.params.copy())
        if len(history.epoch) == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(fastmlp.training, "record_epoch", record_then_interrupt)
    clf = MLPClassifier(max_iter=50, early_stopping=early_stopping, random_state=0)
    with pytest.warns(UserWarning, match="Training interrupted by user"):
        assert clf.fit(X / 16, y) is clf
    assert clf.n_iter_ == 4 and len(clf.loss_curve_) == 4 and clf.score(X / 16, y) > 0.5
    # the interrupt is seen after a chunk of the 5th epoch's steps
    if early_stopping:
        best = int(np.argmax(clf.validation_scores_))
        assert len(clf.validation_scores_) == 4
        assert np.array_equal(clf.model_.params, params[best])
    else:
        assert not np.array_equal(clf.model_.params, params[-1])


def test_divergence_is_scikit_learns_value_error():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 5))
    y = 3e5 + 1e5 * X[:, 0]  # unscaled targets: SGD's steps blow up
    with pytest.raises(ValueError, match=r"Solver produced non-finite parameter weights\. .*"
                       r"diverged at epoch 1, step \d+; or lower learning_rate_init from 0\.001"):
        MLPRegressor(solver="sgd", max_iter=50, random_state=0).fit(X, y)


def test_unsupported_settings_are_refused(digits):
    X, y = digits
    for params, message in [(dict(solver="newton"), "solver 'newton' is not supported"),
                            (dict(activation="gelu"), "activation 'gelu' is not supported"),
                            (dict(batch_size=0), "batch_size"),
                            (dict(hidden_layer_sizes=(0,)), "hidden_layer_sizes"),
                            (dict(max_fun=0), "max_fun"),
                            (dict(max_iter=0), "max_iter must be a positive integer"),
                            (dict(beta_2=1.0), "beta_2 must be < 1"),
                            (dict(epsilon=0.0), "epsilon must be > 0")]:
        with pytest.raises(ValueError, match=message):
            MLPClassifier(**{"max_iter": 1, **params}).fit(X, y)


def test_regressor_fits_one_and_several_outputs():
    from sklearn.datasets import load_diabetes
    from sklearn.metrics import r2_score
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    y = (y - y.mean()) / y.std()
    reg = MLPRegressor(hidden_layer_sizes=(32,), max_iter=100, learning_rate_init=0.01,
                       random_state=0).fit(X, y)
    assert reg.predict(X).shape == (len(X),) and reg.predict(X).dtype == np.float64
    assert reg.model_.dtype == np.float64  # the input's dtype, as scikit-learn's
    assert reg.score(X, y) == pytest.approx(r2_score(y, reg.predict(X)))
    assert reg.score(X, y) > 0.5
    # loss_curve_ is scikit-learn's squared loss: half the mean squared error
    assert reg.loss_curve_[-1] == pytest.approx(reg.model_.evaluate(X, y)[0] / 2, rel=0.2)
    assert reg.out_activation_ == "identity" and reg.n_outputs_ == 1
    Y = np.stack([y, -2 * y], axis=1)
    two = MLPRegressor(hidden_layer_sizes=(32,), max_iter=50, random_state=0,
                       dtype="float32").fit(X, Y)
    assert two.predict(X).shape == (len(X), 2) and two.model_.dtype == np.float32
    assert two.score(X, Y) > 0.3
    again = pickle.loads(pickle.dumps(two))
    assert np.array_equal(again.predict(X), two.predict(X))
    with pytest.raises(ValueError, match="loss 'huber' is not supported"):
        MLPRegressor(loss="huber").fit(X, y)


def test_classifier_takes_a_multi_label_indicator_matrix():
    from sklearn.datasets import make_multilabel_classification
    from sklearn.metrics import accuracy_score
    X, Y = make_multilabel_classification(n_samples=400, n_features=10, n_classes=4,
                                          random_state=0)
    from sklearn.neural_network import MLPClassifier as SklearnMLPClassifier
    settings = dict(hidden_layer_sizes=(32,), max_iter=100, random_state=0)
    clf = MLPClassifier(**settings).fit(X, Y)
    assert clf.model_.output == "sigmoid" and list(clf.classes_) == [0, 1, 2, 3]
    prediction = clf.predict(X)
    assert prediction.shape == Y.shape and set(np.unique(prediction)) <= {0, 1}
    # subset accuracy, about scikit-learn's on the same problem (0.42 there)
    sklearn_score = SklearnMLPClassifier(**settings).fit(X, Y).score(X, Y)
    assert clf.score(X, Y) == accuracy_score(Y, prediction) > sklearn_score - 0.1
    proba = clf.predict_proba(X)
    assert proba.shape == Y.shape and np.array_equal(proba >= 0.5, prediction == 1)
    assert clf.out_activation_ == "logistic"


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("learning_rate", ["invscaling", "adaptive"])
def test_learning_rate_schedules(digits, learning_rate):
    X, y = digits
    X = X / 16
    clf = MLPClassifier(solver="sgd", learning_rate=learning_rate, learning_rate_init=0.1,
                        power_t=0.5, max_iter=40, n_iter_no_change=2, tol=1e-2,
                        random_state=0).fit(X, y)
    rates = clf.model_.optimizer_state.schedule.function
    n = len(X)
    if learning_rate == "invscaling":  # scikit-learn's formula, epoch by epoch
        assert [rates(epoch) for epoch in range(3)] == [0.1 / (e * n + 1) ** 0.5 for e in range(3)]
    else:  # divided by 5 after each stretch without improvement, then stopped
        assert rates.lr < 0.1 and any(0.1 / 5 ** k == pytest.approx(rates.lr)
                                      for k in range(1, 12))
    assert clf.score(X, y) > 0.8


# solver="lbfgs" on networks without a hidden layer: strictly convex problems
# (L2 on the weights), whose one minimum scikit-learn's linear models find in
# closed form or to any tolerance. scikit-learn's MLP objective times
# n / alpha is Ridge's and LogisticRegression's with C = 1 / alpha.
LBFGS_EXACT = dict(hidden_layer_sizes=(), solver="lbfgs", tol=1e-12, max_iter=20000,
                   random_state=0)


def test_lbfgs_regressor_finds_ridges_solution():
    from sklearn.linear_model import Ridge
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    Y = X @ rng.normal(size=(6, 2)) + 0.3 * rng.normal(size=(300, 2)) + [1.0, -2.0]
    weights = rng.uniform(0.5, 2.0, 300)
    for y in (Y[:, 0], Y):
        reg = MLPRegressor(alpha=3.0, **LBFGS_EXACT).fit(X, y, sample_weight=weights)
        ridge = Ridge(alpha=3.0, tol=1e-12).fit(X, y, sample_weight=weights)
        assert relative_error(reg.coefs_[0], ridge.coef_.T.reshape(6, -1)) < 1e-5
        assert relative_error(reg.intercepts_[0], ridge.intercept_) < 1e-5
        assert reg.predict(X).shape == y.shape
    assert not hasattr(reg, "loss_curve_")  # as scikit-learn's, for lbfgs
    # loss_ is scikit-learn's: half the mean squared error, plus the L2 term
    residual = ((Y - reg.predict(X)) ** 2).mean(axis=1)
    l2 = 0.5 * 3.0 * (reg.coefs_[0] ** 2).sum() / weights.sum()
    assert reg.loss_ == pytest.approx(0.5 * np.average(residual, weights=weights) + l2)


def test_lbfgs_poisson_regressor_finds_poisson_regressions_solution():
    # scikit-learn's MLP objective with loss="poisson" (half the Poisson
    # deviance) is PoissonRegressor's with alpha over the total weight
    from sklearn.linear_model import PoissonRegressor
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = rng.poisson(np.exp(X @ [0.3, -0.2, 0.5, 0.0, 0.1] + 0.5)).astype(float)
    weights = rng.uniform(0.5, 2.0, 400)
    reg = MLPRegressor(loss="poisson", alpha=2.0, **LBFGS_EXACT).fit(X, y, sample_weight=weights)
    glm = PoissonRegressor(alpha=2.0 / weights.sum(), tol=1e-12, max_iter=10000).fit(
        X, y, sample_weight=weights)
    assert reg.out_activation_ == "exp" and reg.model_.output == "poisson"
    assert relative_error(reg.coefs_[0][:, 0], glm.coef_) < 1e-5
    assert abs(reg.intercepts_[0][0] - glm.intercept_) < 1e-5
    assert np.abs(reg.predict(X) - glm.predict(X)).max() < 1e-4 * glm.predict(X).max()
    with pytest.raises(ValueError, match="negative"):
        MLPRegressor(loss="poisson").fit(X, -y)
    # and with Adam, a hidden layer: near the GLM's deviance
    from sklearn.metrics import mean_poisson_deviance
    adam = MLPRegressor(loss="poisson", hidden_layer_sizes=(16,), max_iter=100,
                        learning_rate_init=0.01, random_state=0).fit(X, y)
    assert mean_poisson_deviance(y, adam.predict(X)) < 1.1 * mean_poisson_deviance(
        y, glm.predict(X))
    # loss_curve_ is scikit-learn's: half the Poisson deviance
    assert adam.loss_curve_[-1] == pytest.approx(
        mean_poisson_deviance(y, adam.predict(X)) / 2, rel=0.1)


def log_loss_objective(coef, intercept, X, Y, weights, alpha, multi_label):
    """scikit-learn's MLP objective for a network without a hidden layer:
    the weighted mean log loss (binary log loss summed over labels) plus
    alpha / 2 * |coef|^2 over the total weight."""
    logits = X @ coef + intercept
    if multi_label:
        losses = (np.logaddexp(0, logits) - Y * logits).sum(axis=1)
    else:
        losses = np.logaddexp.reduce(logits, axis=1) - logits[np.arange(len(Y)), Y]
    return (np.average(losses, weights=weights) +
            0.5 * alpha * (coef ** 2).sum() / weights.sum())


@pytest.mark.parametrize("multi_label", [False, True])
def test_lbfgs_classifier_finds_logistic_regressions_solution(digits, multi_label):
    # L-BFGS-B stops when the objective falls by less than 2.2e-9 of itself
    # in an iteration: the objective is then the minimum's to about 1e-7,
    # the weights to about 1e-3 (the weights of pixels that are always 0
    # feel only the L2 term). A wrong L2 scale moves both by far more.
    from sklearn.linear_model import LogisticRegression
    X, y = digits
    X = X / 16
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(X))
    Y = np.stack([y % 2, y > 4, y == 3], axis=1).astype(int) if multi_label else y
    clf = MLPClassifier(alpha=2.0, **LBFGS_EXACT).fit(X, Y, sample_weight=weights)
    assert clf.model_.output == ("sigmoid" if multi_label else "softmax")
    if multi_label:  # one logistic regression per label
        coef, intercept = np.zeros((64, 3)), np.zeros(3)
        for k in range(3):
            logistic = LogisticRegression(C=0.5, tol=1e-12, max_iter=20000).fit(
                X, Y[:, k], sample_weight=weights)
            coef[:, k], intercept[k] = logistic.coef_[0], logistic.intercept_[0]
    else:  # multinomial, every class with its own weights
        logistic = LogisticRegression(C=0.5, tol=1e-12, max_iter=20000).fit(
            X, y, sample_weight=weights)
        coef, intercept = logistic.coef_.T, logistic.intercept_
    best = log_loss_objective(coef, intercept, X, Y, weights, 2.0, multi_label)
    ours = log_loss_objective(clf.coefs_[0], clf.intercepts_[0], X, Y, weights, 2.0,
                              multi_label)
    assert abs(ours - best) < 1e-6 * best and clf.loss_ == pytest.approx(ours, rel=1e-9)
    assert relative_error(clf.coefs_[0], coef) < 1e-2
    assert relative_error(clf.intercepts_[0], intercept) < 1e-2
    assert 0 < clf.n_iter_ < 20000


def test_lbfgs_saturates_as_scikit_learns():
    from sklearn.neural_network import MLPClassifier as SklearnMLPClassifier
    from sklearn.utils.estimator_checks import (
        check_classifiers_multilabel_output_format_predict_proba as check)
    for estimator in (SklearnMLPClassifier, MLPClassifier):
        with pytest.raises(AssertionError, match="values between 0 and 1"):
            check("MLPClassifier", estimator(solver="lbfgs", random_state=0))


def test_lbfgs_trains_a_hidden_layer_like_scikit_learns(digits):
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier as SklearnMLPClassifier
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X / 16, y, random_state=0)
    settings = dict(solver="lbfgs", hidden_layer_sizes=(32,), max_iter=300, random_state=0)
    clf = MLPClassifier(**settings).fit(X_train, y_train)
    sklearn_clf = SklearnMLPClassifier(**settings).fit(X_train, y_train)
    assert clf.score(X_test, y_test) > sklearn_clf.score(X_test, y_test) - 0.02
    assert clf.loss_ < 0.01 and clf.n_iter_ <= 300
    # the same parameters whatever the thread count
    one = MLPClassifier(threads=1, **settings).fit(X_train, y_train)
    assert np.array_equal(one.model_.params, clf.model_.params)
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge after 5 iteration"):
        short = MLPClassifier(**{**settings, "max_iter": 5}).fit(X_train, y_train)
    assert short.n_iter_ == 5
    assert not hasattr(short, "partial_fit")  # as scikit-learn's, for lbfgs
    # warm_start goes on from the fitted weights; then adam keeps curves again
    warm = MLPClassifier(**{**settings, "max_iter": 5}, warm_start=True)
    with pytest.warns(ConvergenceWarning):
        warm.fit(X_train, y_train)
        warm.fit(X_train, y_train)
    assert warm.loss_ < short.loss_
    warm.set_params(solver="adam", max_iter=2).fit(X_train, y_train)
    assert len(warm.loss_curve_) == 2


def test_adams_constants_are_scikit_learns_and_can_be_set(digits):
    X, y = digits
    clf = MLPClassifier(max_iter=2, random_state=0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    assert clf.model_.optimizer_state.settings[4:] == (0.9, 0.999, 1e-8)
    other = MLPClassifier(max_iter=2, random_state=0, beta_1=0.5, beta_2=0.9, epsilon=1e-2)
    with pytest.warns(ConvergenceWarning):
        other.fit(X, y)
    assert other.model_.optimizer_state.settings[4:] == (0.5, 0.9, 1e-2)
    assert not np.allclose(other.coefs_[0], clf.coefs_[0])


def test_identity_activation_fits_a_linear_function():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4))
    y = X @ [1.0, -2.0, 0.5, 3.0] + 1.0
    reg = MLPRegressor(hidden_layer_sizes=(8,), activation="identity", solver="lbfgs",
                       tol=1e-10, max_iter=2000, random_state=0).fit(X, y)
    assert reg.model_.activation == "identity" and reg.score(X, y) > 0.999999
    # a network of identity layers is one linear map
    product = reg.coefs_[0] @ reg.coefs_[1]
    assert np.abs(product[:, 0] - [1.0, -2.0, 0.5, 3.0]).max() < 1e-3


def test_multi_label_loss_is_scikit_learns(digits):
    # scikit-learn's binary log loss sums over labels; the head's averages
    X, y = digits
    Y = np.stack([y % 2, y > 4, y == 3], axis=1).astype(int)
    clf = MLPClassifier(max_iter=5, random_state=0, solver="sgd", learning_rate_init=0.05)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X / 16, Y)
    final = clf.model_.evaluate(X / 16, Y)[0]
    assert clf.loss_curve_[-1] == pytest.approx(3 * final, rel=0.2)


def test_labels_outside_the_classes_are_listed_plainly():
    X = np.zeros((6, 2))
    classifier = MLPClassifier(max_iter=1).partial_fit(X, [0, 1, 2] * 2, classes=[0, 1, 2])
    with pytest.raises(ValueError, match=r"labels not in classes: \[3, 4\]$"):
        classifier.partial_fit(X, [0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match=r"classes \[0, 1, 2, 3\] differ from the first call's "
                                         r"\[0, 1, 2\]$"):
        classifier.partial_fit(X, [0, 1, 2] * 2, classes=[0, 1, 2, 3])
