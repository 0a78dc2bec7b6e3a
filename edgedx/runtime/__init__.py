"""The on-device runtime: a bundle's TFLite model on numpy, pydicom and a TFLite interpreter.

Never imports TensorFlow (a test checks it in a fresh interpreter).
"""

from ._backends import BACKENDS, BackendUnavailable, available_backends, load_backend
from .model import Model, Prediction, TFLiteRunner

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Model",
    "Prediction",
    "TFLiteRunner",
    "available_backends",
    "load_backend",
]
