"""fastmlp.MLPClassifier and MLPRegressor against scikit-learn's own
estimator checks (every one, sample-weight equivalence included), and in
scikit-learn's machinery."""
import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from fastmlp import MLPClassifier, MLPRegressor


@parametrize_with_checks([MLPClassifier(random_state=0), MLPRegressor(random_state=0)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


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
    with pytest.raises(ValueError, match="loss 'poisson' is not supported"):
        MLPRegressor(loss="poisson").fit(X, y)


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
