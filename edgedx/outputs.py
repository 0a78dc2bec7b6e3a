"""Model outputs -> probabilities -> decisions, shared by training, benchmarks and the runtime."""

from __future__ import annotations

import numpy as np

from .calibration import Calibration
from .errors import ConfigError


def probabilities(logits: np.ndarray, activation: str, calibration: Calibration | None = None) -> np.ndarray:
    """Logits -> probabilities: sigmoid (N, 1) -> (N,) positive class, sigmoid (N, L) -> (N, L) one per
    label (multi-label), softmax (N, K) -> (N, K).

    ``calibration`` (the model's own, from the manifest) is applied to the logits first.
    """
    z = np.asarray(logits, np.float64)
    if calibration is not None:
        z = calibration.apply(z)
    if activation == "sigmoid":
        z = z.reshape(len(z), -1)
        p = np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z), without overflow
        return p[:, 0] if p.shape[1] == 1 else p
    if activation == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ConfigError(f"unknown output activation {activation!r}; expected sigmoid or softmax")


def decisions(probs: np.ndarray, threshold: float | list[float] | None) -> np.ndarray:
    """Class index per case: ``probs >= threshold`` for binary (N,), argmax for (N, K); for
    multi-label (N, L) probabilities with a threshold per label, 0/1 per label (N, L)."""
    if isinstance(threshold, (list, tuple, np.ndarray)):
        return (probs >= np.asarray(threshold, np.float64)).astype(np.int64)
    if probs.ndim == 1:
        if threshold is None:
            raise ConfigError("a binary model needs a decision threshold")
        return (probs >= threshold).astype(np.int64)
    return probs.argmax(axis=1)
