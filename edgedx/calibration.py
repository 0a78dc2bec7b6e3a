"""Calibrated probabilities: a monotone map on the logits, fitted on validation data, kept per model.

A network trained with cross-entropy on a small, class-weighted set is rarely calibrated, and
every compression step moves its logits again (the int8 of the default pipeline once gave
``logit = 1.08 x float logit + 0.81``). So every model in a bundle carries its own calibration
in the manifest, applied by :func:`edgedx.outputs.probabilities` wherever logits become
probabilities (training, compression, bench, runtime):

- ``platt`` (binary): ``z' = scale * z + shift``, fitted to the validation labels (Platt 1999);
- ``temperature`` (multi-class): ``z' = z / T``, fitted to the validation labels (Guo et al. 2017);
- ``matched``: the same affine form, fitted by least squares onto a parent bundle's calibrated
  logits; bundles that ``compress`` wrote before 2026-12-07 carry it. A compressed model now gets
  its own Platt or temperature fit, which gave lower held-out ECE (``benchmarks/README.md``).

``scale`` is always positive, so ranking, AUC and every decision are unchanged; thresholds are
mapped through the calibration with :meth:`Calibration.probability_threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BundleError

ECE_BINS = 15
METHODS = ("none", "platt", "temperature", "matched")


Threshold = float | list[float] | None


@dataclass(frozen=True)
class Calibration:
    """``scale`` and ``shift`` are one number each, or one per label for a multi-label model."""

    method: str = "none"
    scale: float | tuple[float, ...] = 1.0
    shift: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BundleError(f"unknown calibration {self.method!r}; expected one of {', '.join(METHODS)}")
        scale, shift = np.asarray(self.scale, np.float64), np.asarray(self.shift, np.float64)
        if scale.shape != shift.shape or not (
            np.isfinite(scale).all() and (scale > 0).all() and np.isfinite(shift).all()
        ):
            raise BundleError(f"calibration scale must be > 0 and finite, got {self.scale}, {self.shift}")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, np.float64)
        if self.method == "none":
            return z
        return z * np.asarray(self.scale, np.float64) + np.asarray(self.shift, np.float64)

    def probability_threshold(self, threshold: Threshold) -> Threshold:
        """A threshold on uncalibrated sigmoid probabilities -> the same cut on calibrated ones
        (a list of them, one per label, for a multi-label model)."""
        if threshold is None or self.method == "none":
            return threshold
        t = np.clip(np.asarray(threshold, np.float64), 1e-12, 1 - 1e-12)
        return _as_threshold(_sigmoid(self.apply(np.log(t / (1 - t)))))

    def uncalibrated_threshold(self, threshold: Threshold) -> Threshold:
        """The inverse of :meth:`probability_threshold`: a cut on calibrated probabilities -> on raw ones."""
        if threshold is None or self.method == "none":
            return threshold
        t = np.clip(np.asarray(threshold, np.float64), 1e-12, 1 - 1e-12)
        scale, shift = np.asarray(self.scale, np.float64), np.asarray(self.shift, np.float64)
        return _as_threshold(_sigmoid((np.log(t / (1 - t)) - shift) / scale))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale": _as_json(self.scale), "shift": _as_json(self.shift)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Calibration:
        if not d:
            return cls()
        try:
            scale, shift = d.get("scale", 1.0), d.get("shift", 0.0)
            if isinstance(scale, list):
                return cls(str(d["method"]), tuple(map(float, scale)), tuple(map(float, shift)))
            return cls(str(d["method"]), float(scale), float(shift))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed calibration {d} ({exc})") from None


def _as_json(value: float | tuple[float, ...]) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value


def _as_threshold(values: np.ndarray) -> float | list[float]:
    return float(values) if values.ndim == 0 else [float(v) for v in values]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def logits_of(probs: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Probabilities -> logits that give them back: log-odds for binary (N,) and multi-label (N, L),
    log-probabilities for multi-class (N, K)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-15, 1 - 1e-15)
    return np.log(p / (1 - p)) if p.ndim == 1 or multilabel else np.log(p)


def recalibrate(probs: np.ndarray, calibration: Calibration, multilabel: bool = False) -> np.ndarray:
    """Probabilities of an uncalibrated model -> the probabilities ``calibration`` gives it."""
    z = calibration.apply(logits_of(probs, multilabel))
    if z.ndim == 1 or multilabel:
        return _sigmoid(z)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_to_labels(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Platt scaling for one logit (N, 1) or (N,), temperature scaling for (N, K) with class labels
    (N,), Platt scaling per label for multi-label (N, L) logits with (N, L) labels; validation data."""
    from scipy.optimize import minimize, minimize_scalar

    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    if y.ndim == 2:  # multi-label: each label on its own
        fits = [fit_to_labels(z[:, i], y[:, i]) for i in range(y.shape[1])]
        if all(f.method == "none" for f in fits):
            return Calibration()
        return Calibration(
            "platt",
            tuple(float(f.scale) for f in fits),  # a label left uncalibrated keeps scale 1, shift 0
            tuple(float(f.shift) for f in fits),
        )
    if z.ndim == 1 or z.shape[1] == 1:
        z = z.reshape(-1)
        if np.unique(y).size < 2:  # nothing to fit against
            return Calibration()
        positives = float(np.sum(y == 1))
        negatives = float(len(y) - positives)
        # Platt's targets, (N+ + 1)/(N+ + 2) and 1/(N- + 2) instead of 1 and 0: a prior that keeps the
        # fit finite when a small validation set is perfectly separated (the plain fit's scale diverges)
        target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))

        def loss(params: np.ndarray) -> float:
            s = params[0] * z + params[1]
            return float(np.mean(np.logaddexp(0.0, s) - target * s))

        result = minimize(loss, x0=np.array([1.0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
        scale, shift = (float(v) for v in result.x)
        if not scale > 0:  # a model whose logits rank the wrong way cannot be rescued by calibration
            return Calibration()
        return Calibration("platt", scale, shift)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    log_t = float(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x)
    return Calibration("temperature", float(np.exp(-log_t)), 0.0)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width confidence bins: the positive-class probability for binary
    (N,) scores, the top-class confidence for (N, K)."""
    confidence, correct = _confidence(np.asarray(labels), np.asarray(probs, np.float64))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per-bin mean confidence, observed frequency and count, for a reliability diagram."""
    confidence, correct = _confidence(np.asarray(labels), np.asarray(probs, np.float64))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows: dict[str, list[float]] = {"confidence": [], "observed": [], "count": []}
    for b in range(bins):
        members = which == b
        if members.any():
            rows["confidence"].append(float(confidence[members].mean()))
            rows["observed"].append(float(correct[members].mean()))
            rows["count"].append(int(members.sum()))
    return rows


def _confidence(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if probs.ndim == 1:  # binary: how well the stated risk matches the observed rate
        return probs, (labels == 1).astype(np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
