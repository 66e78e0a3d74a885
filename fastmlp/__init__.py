"""fastmlp: fast multi-layer perceptron training on the CPU, with fused Numba
kernels and a plain NumPy oracle (`fastmlp.reference`) that tests them."""
__version__ = "0.1.0"

from . import datasets, reference, schedules
from .model import MLP
from .modelfile import load
from .history import History
from .training import TrainingDiverged, fit

__all__ = ["MLP", "MLPClassifier", "MLPRegressor", "fit", "load", "History", "TrainingDiverged",
           "reference", "schedules"]


def __getattr__(name):
    # the estimators need scikit-learn: imported on first use only
    if name in ("MLPClassifier", "MLPRegressor"):
        from . import estimator
        return getattr(estimator, name)
    raise AttributeError(f"module 'fastmlp' has no attribute {name!r}")
