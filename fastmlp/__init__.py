"""fastmlp: fast multi-layer perceptron training on the CPU, with fused Numba
kernels and a plain NumPy oracle (`fastmlp.reference`) that tests them."""
from . import reference
from .model import MLP
from .modelfile import load
from .training import History, TrainingDiverged, fit

__all__ = ["MLP", "fit", "load", "History", "TrainingDiverged", "reference"]
__version__ = "0.1.0"
