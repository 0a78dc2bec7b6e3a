"""Model outputs -> probabilities -> decisions, shared by training, benchmarks and the runtime."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def probabilities(logits: np.ndarray, activation: str) -> np.ndarray:
    """Logits (N, 1) or (N, K) -> probabilities: (N,) positive-class for sigmoid, (N, K) for softmax."""
    z = np.asarray(logits, np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z.reshape(len(z), -1)[:, 0]))
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
