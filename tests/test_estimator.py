"""fastmlp.MLPClassifier against scikit-learn's own estimator checks, and in
scikit-learn's machinery."""
import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (
    check_sample_weight_equivalence_on_dense_data,
    parametrize_with_checks,
)

from fastmlp import MLPClassifier

EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data":
        "minibatch training: a row of weight k is not k repeated rows, because the repeats "
        "fall into other batches (and shift the batches after them), so the two fits take "
        "different steps; scikit-learn runs this check on its own MLPClassifier only with the "
        "full-batch solver lbfgs. test_sample_weights_equal_repeated_rows_in_full_batches "
        "runs it on a full-batch configuration, where it passes.",
}


@parametrize_with_checks([MLPClassifier(random_state=0)],
                         expected_failed_checks=lambda estimator: EXPECTED_FAILURES)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_sample_weights_equal_repeated_rows_in_full_batches():
    # alpha=0: the L2 term is alpha / batch_size, and the two fits have batches of
    # different sizes (the repeated rows)
    full_batch = MLPClassifier(solver="sgd", alpha=0.0, batch_size=100_000, shuffle=False, dtype="float64",
                               random_state=0)
    check_sample_weight_equivalence_on_dense_data(MLPClassifier.__name__, full_batch)


@pytest.fixture(scope="module")
def digits():
    return load_digits(return_X_y=True)


def test_grid_search_with_two_jobs_over_a_pipeline(digits):
    X, y = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=30, random_state=0))
    grid = {"mlpclassifier__hidden_layer_sizes": [(32,), (64,)],
            "mlpclassifier__alpha": [1e-4, 1e-1]}
    search = GridSearchCV(pipe, grid, cv=3, n_jobs=2).fit(X, y)
    assert len(search.cv_results_["mean_test_score"]) == 4
    assert search.best_score_ > 0.9
    assert cross_val_score(search.best_estimator_, X, y, cv=3).mean() > 0.9


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
    for _ in range(5):
        clf.partial_fit(X, y, classes=["even", "odd"])
    assert clf.n_iter_ == 5 and clf.predict_proba(X).shape == (len(X), 2)
    assert clf.score(X, y) > 0.95
    with pytest.raises(ValueError, match="classes must be passed"):
        MLPClassifier().partial_fit(X, y)


def test_early_stopping_keeps_the_best_validation_score(digits):
    X, y = digits
    clf = MLPClassifier(early_stopping=True, n_iter_no_change=3, max_iter=300,
                        learning_rate_init=0.01, random_state=0).fit(X, y)
    assert clf.n_iter_ < 300
    assert clf.best_loss_ is None
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert len(clf.validation_scores_) == clf.n_iter_


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
    assert clf.n_iter_ == 6 and not np.array_equal(first, clf.coefs_[0])


def test_unsupported_settings_are_refused(digits):
    X, y = digits
    for params, message in [(dict(solver="lbfgs"), "not supported"),
                            (dict(activation="identity"), "not supported"),
                            (dict(batch_size=0), "batch_size"),
                            (dict(hidden_layer_sizes=(0,)), "hidden_layer_sizes")]:
        with pytest.raises(ValueError, match=message):
            MLPClassifier(max_iter=1, **params).fit(X, y)
