"""A hyperparameter sweep of fastmlp.MLPClassifier on Fashion-MNIST with
scikit-learn's GridSearchCV under joblib's Dask backend.

    python scripts/dask_sweep.py                       # a LocalCluster on 127.0.0.1
    python scripts/dask_sweep.py --scheduler tcp://scheduler:8786   # a real cluster
    python scripts/dask_sweep.py --compare             # and the same search in this process

On a cluster each fit is one task, and a worker thread runs it with
`threads` Numba threads: give workers one thread per fit and set the
estimator's threads to the cores each fit should use (here 1 thread per
worker, 1 worker per core). --compare also runs the search without Dask
(n_jobs=1, each fit on every core) and checks that both found the same scores.
"""
import argparse
import time
import warnings

import joblib
import numpy as np
from sklearn.model_selection import GridSearchCV

from fastmlp import MLPClassifier
from fastmlp.datasets import load

GRID = {"hidden_layer_sizes": [(64,), (128,)], "learning_rate_init": [1e-3, 3e-3],
        "alpha": [1e-4, 1e-2]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler", help="a Dask scheduler's address (default: start a "
                        "LocalCluster on 127.0.0.1)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    parser.add_argument("--rows", type=int, default=20000, help="training rows swept over")
    parser.add_argument("--max-iter", type=int, default=5)
    parser.add_argument("--compare", action="store_true",
                        help="also run the search without Dask, and compare")
    args = parser.parse_args()
    from dask.distributed import Client, LocalCluster
    from sklearn.exceptions import ConvergenceWarning
    warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is short on purpose

    x_train, y_train, x_test, y_test = load("fashion-mnist")
    X = x_train[:args.rows].astype(np.float32) / 255
    y = y_train[:args.rows]
    n_fits = 3 * int(np.prod([len(v) for v in GRID.values()]))
    print(f"{n_fits} fits ({len(X)} rows, 3-fold CV, max_iter={args.max_iter})")

    def search(threads, n_jobs):
        estimator = MLPClassifier(max_iter=args.max_iter, batch_size=200, random_state=0,
                                  threads=threads, tol=0)
        started = time.perf_counter()
        result = GridSearchCV(estimator, GRID, cv=3, n_jobs=n_jobs).fit(X, y)
        return result, time.perf_counter() - started

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None)
        client = Client(cluster)
    workers = client.scheduler_info()["workers"]
    threads = sum(w["nthreads"] for w in workers.values())

    def quiet_import():
        warnings.simplefilter("ignore", ConvergenceWarning)
        import fastmlp.estimator  # noqa: F401  (imported and compiled before timing)
    client.run(quiet_import)
    with joblib.parallel_backend("dask"):
        swept, seconds = search(threads=1, n_jobs=-1)
    print(f"Dask, {len(workers)} workers, {threads} threads: {seconds:.1f}s; best "
          f"{swept.best_params_} CV accuracy {swept.best_score_:.4f}, test accuracy "
          f"{swept.score(x_test.astype(np.float32) / 255, y_test):.4f}")
    if args.compare:
        local, local_seconds = search(threads=None, n_jobs=1)
        same = np.array_equal(local.cv_results_["mean_test_score"],
                              swept.cv_results_["mean_test_score"])
        print(f"in this process, n_jobs=1, all cores per fit: {local_seconds:.1f}s "
              f"({local_seconds / seconds:.2f}x the Dask time); same scores: {same}")
    client.close()


if __name__ == "__main__":
    main()
