"""The on-device runtime: a bundle's model on numpy, pydicom and a TFLite interpreter (or ONNX Runtime).

Never imports TensorFlow (a test checks it in a fresh interpreter).
"""

from ._backends import BACKENDS, BackendUnavailable, available_backends, load_backend
from .model import Model, Prediction, Runner, TFLiteRunner, open_runner

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Model",
    "Prediction",
    "Runner",
    "TFLiteRunner",
    "available_backends",
    "load_backend",
    "open_runner",
]
