"""Run under mpiexec by test_distributed.py: trains one configuration with
fit(..., comm=MPI.COMM_WORLD) and has rank 0 write what the test checks.

usage: python mpi_worker.py CONFIG_JSON OUTPUT_NPZ
"""
import json
import sys

import numpy as np
from mpi4py import MPI

import fastmlp
from fastmlp import distributed, forward_backward, gradients


def problem(config):
    """The same data and model on every rank (and in the test process)."""
    rng = np.random.default_rng(config["data_seed"])
    n, features, classes = config["rows"], config["sizes"][0], config["sizes"][-1]
    X = rng.standard_normal((n, features)).astype(config["dtype"])
    output = config.get("output", "softmax")
    if output == "softmax":
        y = rng.integers(0, classes, n)
    elif output == "linear":
        y = X[:, :classes] * 2 + 0.3 * rng.standard_normal((n, classes))
    else:
        y = (X[:, :classes] + 0.5 * rng.standard_normal((n, classes)) > 0).astype(int)
    weights = rng.uniform(0.2, 3.0, n) if config.get("weighted") else None
    model = fastmlp.MLP(config["sizes"], activation=config["activation"], dtype=config["dtype"],
                        init="xavier", seed=config["model_seed"], output=output)
    if config.get("parameter_blowup"):
        # weights fed by an always-zero input: weight decay alone makes them overflow
        X[:, 0] = 0
        model.weights[0][0, :] = 1e37
    return model, X, y, weights


def fit_kwargs(config):
    # "plateau": a Plateau schedule on the training loss that halves the rate
    # at the end of every epoch but the first (min_delta is larger than any
    # improvement)
    plateau = config.get("plateau") and fastmlp.schedules.Plateau(
        factor=0.5, patience=1, monitor="loss", min_delta=10.0)
    return dict(epochs=config["epochs"], batch_size=config["batch_size"],
                optimizer=config["optimizer"], lr=config.get("lr"),
                nesterov=config.get("nesterov", False),
                weight_decay=config.get("weight_decay", 0.0), seed=config["shuffle_seed"],
                lr_schedule=plateau or None)


def main():
    config = json.loads(sys.argv[1])
    comm = MPI.COMM_WORLD
    model, X, y, weights = problem(config)
    if comm.rank > 0:
        # rank 0's state must win: start the others from other parameters
        model.params[:] = 7.0
    kwargs = fit_kwargs(config)
    if config.get("mismatch") and comm.rank == comm.size - 1:
        kwargs["batch_size"] += 1
    result = {"threads": distributed.rank_threads(comm)}
    try:
        history = fastmlp.fit(model, X, y, sample_weight=weights, comm=comm, **kwargs)
        result["loss"] = history.history["loss"]
        result["score"] = history.history[model.metric]
    except (ValueError, RuntimeError) as exc:  # TrainingDiverged is a ValueError
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["step"] = getattr(exc, "step", -1)
    # the step's kernels on this rank: compiled, and loaded from the disk cache
    result["kernels"] = {
        kernel.py_func.__name__: [sum(kernel.stats.cache_misses.values()),
                                  sum(kernel.stats.cache_hits.values())]
        for kernel in (forward_backward.region, gradients.gradients_region,
                       forward_backward.transpose_weights)}
    every = comm.gather(dict(result, params=model.params.copy()), root=0)
    if comm.rank == 0:
        np.savez(sys.argv[2], params=np.stack([r["params"] for r in every]),
                 results=json.dumps([{k: v for k, v in r.items() if k != "params"}
                                     for r in every]))


if __name__ == "__main__":
    main()
