"""Model outputs -> probabilities -> decisions, shared by training, benchmarks and the runtime."""

from __future__ import annotations

import numpy as np

from .calibration import Calibration
from .errors import ConfigError


def probabilities(logits: np.ndarray, activation: str, calibration: Calibration | None = None) -> np.ndarray:
    """Logits (N, 1) or (N, K) -> probabilities: (N,) positive-class for sigmoid, (N, K) for softmax.

    ``calibration`` (the model's own, from the manifest) is applied to the logits first.
    """
    z = np.asarray(logits, np.float64)
    if calibration is not None:
        z = calibration.apply(z)
    if activation == "sigmoid":
        return np.exp(-np.logaddexp(0.0, -z.reshape(len(z), -1)[:, 0]))  # 1 / (1 + e^-z), without overflow
    if activation == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ConfigError(f"unknown output activation {activation!r}; expected sigmoid or softmax")


def decisions(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class index per case: ``probs >= threshold`` for binary (N,), argmax for (N, K)."""
    if probs.ndim == 1:
        if threshold is None:
            raise ConfigError("a binary model needs a decision threshold")
        return (probs >= threshold).astype(np.int64)
    return probs.argmax(axis=1)
