"""fastmlp: fast multi-layer perceptron training on the CPU, with fused Numba
kernels and a plain NumPy oracle (`fastmlp.reference`) that tests them."""
__version__ = "0.1.0"

from . import datasets, reference
from .model import MLP
from .modelfile import load
from .training import History, TrainingDiverged, fit

__all__ = ["MLP", "MLPClassifier", "fit", "load", "History", "TrainingDiverged", "reference"]


def __getattr__(name):
    # the estimator needs scikit-learn: imported on first use only
    if name == "MLPClassifier":
        from .estimator import MLPClassifier
        return MLPClassifier
    raise AttributeError(f"module 'fastmlp' has no attribute {name!r}")
