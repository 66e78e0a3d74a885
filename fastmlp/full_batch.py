"""The mean loss and its gradient over a whole dataset, for optimizers that
take whole-data steps (the estimators' solver="lbfgs"): the kernels that
training runs, over chunks of rows in one workspace allocated once.

Each chunk's deltas are scaled by 1 / the total weight of all rows, so the
chunks' gradients add up to the gradient of the weighted mean loss. Chunks
are summed in row order, in float64, so the result does not depend on the
thread count."""
import numba
import numpy as np

from .buffers import make_data
from .model import Workspace, aligned_zeros, parallel_launch_guard
from .optimizers import gradients_only
from .forward_backward import forward_backward, transpose_weights
from .gradients import gradients_update
from .validation import check_sample_weight, check_X

CHUNK_ROWS = 2048  # rows per kernel call: activations of a few MB


class FullBatch:
    """loss_and_gradient(params) of `model` on X, y (weighted by
    sample_weight): the head's weighted mean loss, and its gradient as a
    float64 vector laid out like model.params."""

    def __init__(self, model, X, y, sample_weight=None):
        self.model = model
        X = check_X(X, model.n_features)
        y = model.check_targets(y, X.shape[0])
        self.n = X.shape[0]
        weights = check_sample_weight(sample_weight, self.n, model.dtype)
        self.total_weight = float(weights.sum(dtype=np.float64))
        if not self.total_weight > 0:
            raise ValueError("sample_weight sums to 0: there is no loss to minimise")
        self.workspace = Workspace(model.layer_sizes, min(self.n, CHUNK_ROWS), model.dtype,
                                   amx=model.amx)
        self.data = make_data(X, y, weights, np.arange(self.n, dtype=np.int64), model.dtype)
        self.inv_total = model.dtype.type(1.0 / self.total_weight)
        self.grads = aligned_zeros(model.n_params, model.dtype)
        self.gradient = np.zeros(model.n_params)
        self.optimizer = gradients_only(self.grads)

    def loss_and_gradient(self, params=None):
        """Sets model.params to params (if given), then returns (mean loss,
        gradient). The gradient array is reused by the next call."""
        model, work = self.model, self.workspace.work
        if params is not None:
            model.params[:] = params
        network = model.network()
        threads = numba.get_num_threads()
        self.gradient[:] = 0.0
        loss = 0.0
        with parallel_launch_guard():
            transpose_weights(work.weights_t, network)
            for start in range(0, self.n, self.workspace.batch_size):
                rows = min(self.workspace.batch_size, self.n - start)
                forward_backward(work, network, self.data, start, rows, self.inv_total, True, 0,
                                 threads)
                gradients_update(work, network, self.optimizer, rows, True, False, threads)
                self.gradient += self.grads
                loss += work.row_stats[:rows, 0].sum()
        return loss / self.total_weight, self.gradient


def minimize_lbfgs(model, X, y, sample_weight=None, l2=0.0, loss_scale=1.0, max_iter=200,
                   max_fun=15000, tol=1e-4, callback=None):
    """Minimises loss_scale * (the weighted mean loss) + l2 / 2 * (the sum of
    the squared weights, biases left out) over model.params with SciPy's
    L-BFGS-B (maxiter=max_iter, maxfun=max_fun, gtol=tol), starting from
    and writing to model.params. Returns (SciPy's OptimizeResult, the
    weighted mean loss at its x); callback(intermediate_result) is called
    after each iteration, as SciPy does."""
    from scipy.optimize import minimize
    objective = FullBatch(model, X, y, sample_weight)
    is_weight = np.zeros(model.n_params, bool)
    for w in model.layer_views(is_weight)[0]:
        w[...] = True

    def value_and_gradient(x):
        loss, gradient = objective.loss_and_gradient(x)
        weights = x[is_weight]
        gradient = loss_scale * gradient  # a new array: SciPy may keep the last one
        gradient[is_weight] += l2 * weights
        return loss_scale * loss + 0.5 * l2 * float(weights @ weights), gradient

    result = minimize(value_and_gradient, model.params.astype(np.float64), method="L-BFGS-B",
                      jac=True, callback=callback,
                      options={"maxiter": max_iter, "maxfun": max_fun, "gtol": tol})
    loss, _ = objective.loss_and_gradient(result.x)  # and model.params = result.x
    return result, loss
