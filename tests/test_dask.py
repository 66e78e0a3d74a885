"""A hyperparameter sweep of fastmlp.MLPClassifier with scikit-learn's
GridSearchCV under joblib's Dask backend, on a dask.distributed LocalCluster
that the test starts on 127.0.0.1 (a real scheduler address works the same)."""
import joblib
import numpy as np
from dask.distributed import Client, LocalCluster, get_task_stream
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV

from fastmlp import MLPClassifier

GRID = {"hidden_layer_sizes": [(16,), (48,)], "learning_rate_init": [1e-3, 1e-2]}


def test_grid_search_on_a_dask_cluster_equals_the_local_search():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    estimator = MLPClassifier(max_iter=5, random_state=0, threads=1)
    local = GridSearchCV(estimator, GRID, cv=3).fit(X, y)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with get_task_stream(client) as tasks, joblib.parallel_backend("dask"):
            swept = GridSearchCV(estimator, GRID, cv=3, n_jobs=-1).fit(X, y)
        workers = set(client.scheduler_info()["workers"])
    # the fits ran in the cluster's two worker processes
    ran_on = {task["worker"] for task in tasks.data}
    assert ran_on == workers and len(workers) == 2
    assert all(address.startswith("tcp://127.0.0.1:") for address in ran_on)
    # and gave what the same search gives in this process, score for score
    # (fastmlp's training is bit-for-bit reproducible)
    np.testing.assert_array_equal(swept.cv_results_["mean_test_score"],
                                  local.cv_results_["mean_test_score"])
    assert swept.best_params_ == local.best_params_
    assert swept.best_score_ > 0.8
    np.testing.assert_array_equal(swept.predict(X), local.predict(X))
