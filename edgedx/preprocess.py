"""Preprocessing, in pure numpy: the one definition shared by training, benchmarks and the runtime.

Every model input in edgedx is made by :func:`to_model_input` from a 2-D image and a
:class:`PreprocessSpec`. The spec is plain data (:meth:`PreprocessSpec.to_dict`) stored in the
model bundle, so the runtime replays exactly what training did: no TensorFlow ops, no I/O,
no module-level state.

Pipeline, for an image of shape (H, W):

1. ``hu``: CT values in Hounsfield units (see :func:`modality_lut`) become one channel per
   window (:func:`window`), each in [0, 1]; ``intensity``: grey levels are scaled from
   ``intensity_range`` to [0, 1].
2. Pad to a square with the background (air, or the darkest grey level), then resize to
   ``size`` x ``size`` by area averaging (:func:`resize_area`).
3. Normalise each channel with the training set's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, DataError

AIR_HU = -1024.0

InputKind = Literal["hu", "intensity"]


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units: values map linearly from [c - w/2, c + w/2] to [0, 1]."""

    name: str
    center: float
    width: float

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ConfigError(f"window {self.name!r}: width must be > 0 HU, got {self.width}")


#: Named windows (centre/width in HU) used for head CT; three of them stacked as channels is the
#: input of the strongest RSNA intracranial-hemorrhage solutions.
WINDOW_PRESETS: dict[str, Window] = {
    "brain": Window("brain", 40.0, 80.0),
    "subdural": Window("subdural", 80.0, 200.0),
    "bone": Window("bone", 600.0, 2800.0),
}


def parse_windows(names: str | Sequence[str]) -> tuple[Window, ...]:
    """``"brain,subdural"`` or ``["brain", "40/80"]`` -> windows; ``C/W`` gives a custom window."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    windows = []
    for item in filter(None, items):
        if item in WINDOW_PRESETS:
            windows.append(WINDOW_PRESETS[item])
        elif "/" in item:
            try:
                center, width = (float(v) for v in item.split("/"))
            except ValueError:
                raise ConfigError(f"window {item!r} is not CENTER/WIDTH in HU, e.g. 40/80") from None
            windows.append(Window(item, center, width))
        else:
            raise ConfigError(f"unknown window {item!r}; choose from {', '.join(WINDOW_PRESETS)} or give CENTER/WIDTH")
    return tuple(windows)


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    """What turns an image into a model input; stored in every bundle's manifest.

    Attributes:
        size: Side of the square model input, in pixels.
        input: ``"hu"`` for CT in Hounsfield units, windowed into channels; ``"intensity"`` for
            grey levels (X-ray, MedMNIST, photos), scaled from ``intensity_range``.
        windows: HU windows, one channel each (``input="hu"`` only).
        intensity_range: Grey level that maps to 0 and to 1 (``input="intensity"`` only).
        mean: Per-channel mean subtracted after scaling (training-set statistic).
        std: Per-channel standard deviation divided by after the mean.
    """

    size: int
    input: InputKind = "hu"
    windows: tuple[Window, ...] = ()
    intensity_range: tuple[float, float] = (0.0, 255.0)
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 4 <= self.size <= 2048:
            raise ConfigError(f"input size must be between 4 and 2048 pixels, got {self.size}")
        if self.input not in ("hu", "intensity"):
            raise ConfigError(f"input must be 'hu' or 'intensity', got {self.input!r}")
        if self.input == "hu" and not self.windows:
            raise ConfigError("an 'hu' input needs at least one window, e.g. brain,subdural,bone")
        if self.input == "intensity" and self.windows:
            raise ConfigError("windows apply to CT in Hounsfield units; this input is grey levels")
        lo, hi = self.intensity_range
        if hi <= lo:
            raise ConfigError(f"intensity_range must rise, got {self.intensity_range}")
        for name, stat in (("mean", self.mean), ("std", self.std)):
            if stat and len(stat) != self.channels:
                raise ConfigError(f"{name} has {len(stat)} values for {self.channels} channels")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be > 0, got {self.std}")

    @property
    def channels(self) -> int:
        return len(self.windows) if self.input == "hu" else 1

    @property
    def background(self) -> float:
        """The value that pads an image to a square: air for CT, the darkest grey level otherwise."""
        return AIR_HU if self.input == "hu" else self.intensity_range[0]

    def with_normalization(self, mean: Sequence[float], std: Sequence[float]) -> PreprocessSpec:
        return replace(self, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "input": self.input,
            "windows": [{"name": w.name, "center": w.center, "width": w.width} for w in self.windows],
            "intensity_range": list(self.intensity_range),
            "pad_to_square": True,
            "resize": "area",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        try:
            return cls(
                size=int(d["size"]),
                input=d["input"],
                windows=tuple(Window(w["name"], float(w["center"]), float(w["width"])) for w in d["windows"]),
                intensity_range=(float(d["intensity_range"][0]), float(d["intensity_range"][1])),
                mean=tuple(float(v) for v in d.get("mean", ())),
                std=tuple(float(v) for v in d.get("std", ())),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ConfigError(f"preprocessing spec is malformed ({type(exc).__name__}: {exc}): {d}") from None


def modality_lut(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Stored pixel values -> output units (HU for CT): ``stored * slope + intercept``.

    This is the linear Modality LUT of DICOM PS3.3 C.11.1 (Rescale Slope (0028,1053) and
    Rescale Intercept (0028,1052)).

    Returns:
        float32 array of the input's shape.
    """
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def window(hu: np.ndarray, center: float, width: float, out: np.ndarray | None = None) -> np.ndarray:
    """HU -> float32 in [0, 1]: ``center - width/2`` maps to 0, ``center + width/2`` to 1, clipped."""
    lower = center - width / 2.0
    out = np.subtract(hu.astype(np.float32, copy=False), np.float32(lower), out=out)
    np.divide(out, np.float32(width), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def stack_windows(hu: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """HU (H, W) -> float32 (H, W, len(windows)), one windowed channel per window."""
    channels = np.empty((len(windows), *hu.shape), np.float32)  # contiguous planes, no temporaries
    for plane, w in zip(channels, windows, strict=True):
        window(hu, w.center, w.width, out=plane)
    return np.moveaxis(channels, 0, -1)


@lru_cache(maxsize=64)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix whose row i averages the input span that output pixel i covers."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    j = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
    weights = (np.clip(overlap, 0.0, None) / scale).astype(np.float32)
    weights.setflags(write=False)
    return weights


def resize_area(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Resize (H, W) or (H, W, C) by exact area averaging (box filter; works both ways).

    Each output pixel is the mean of the input area it covers, with fractional pixels
    weighted by overlap, so downsampling never aliases and a constant image stays constant.
    """
    width = height if width is None else width
    if image.ndim not in (2, 3):
        raise DataError(f"resize expects a (H, W) or (H, W, C) image, got shape {image.shape}")
    x = image.astype(np.float32, copy=False)
    fy, fx = x.shape[0] // height, x.shape[1] // width
    if fy * height == x.shape[0] and fx * width == x.shape[1]:  # whole-pixel blocks (512 -> 64): block means
        if x.ndim == 3:  # plane by plane: stack_windows's planes are contiguous, and no copy is made
            return np.stack([_block_means(plane, height, width) for plane in np.moveaxis(x, -1, 0)], axis=-1)
        return _block_means(x, height, width)
    rows = _area_weights(x.shape[0], height)
    cols = _area_weights(x.shape[1], width)
    out = np.tensordot(rows, x, axes=(1, 0))  # (height, W[, C])
    out = np.tensordot(cols, out, axes=(1, 1))  # (width, height[, C])
    return np.swapaxes(out, 0, 1)


def _block_means(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) -> (height, width) means of whole-pixel blocks, summed a row of blocks at a time:
    3x faster than one mean over two strided axes of the 5-D block view."""
    fy, fx = plane.shape[0] // height, plane.shape[1] // width
    rows = plane.reshape(height, fy, plane.shape[1]).sum(axis=1, dtype=np.float32)
    return rows.reshape(height, width, fx).sum(axis=2, dtype=np.float32) / np.float32(fy * fx)


def pad_to_square(image: np.ndarray, fill: float) -> np.ndarray:
    """Centre a (H, W[, C]) image on a square canvas filled with ``fill``."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    canvas = np.full((side, side, *image.shape[2:]), fill, dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def scale_and_resize(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Image (H, W) -> float32 (size, size, channels) in [0, 1], before normalisation."""
    if image.ndim != 2:
        raise DataError(f"expected a 2-D greyscale image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise DataError("image contains NaN or infinite values")
    square = pad_to_square(image.astype(np.float32, copy=False), spec.background)
    if spec.input == "hu":
        channels = stack_windows(square, spec.windows)
    else:
        lo, hi = spec.intensity_range
        channels = np.clip((square - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)[..., None]
    return resize_area(channels, spec.size)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(x - mean) / std`` per channel (last axis); empty statistics leave ``x`` unchanged."""
    if not len(mean):
        return x
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def to_model_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HU or grey levels (H, W) -> float32 (size, size, channels), exactly as the model was trained."""
    return normalize(scale_and_resize(image, spec), spec.mean, spec.std).astype(np.float32, copy=False)


def to_model_inputs(images: Iterable[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Many images -> float32 (N, size, size, channels)."""
    batch = [to_model_input(im, spec) for im in images]
    if not batch:
        return np.zeros((0, spec.size, spec.size, spec.channels), np.float32)
    return np.stack(batch)


def channel_statistics(chunks: Iterable[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of scaled inputs given in chunks (n, S, S, C); a flat channel gets std 1.

    Accumulates in float64 one chunk at a time, so a split on disk is never all in memory.
    """
    count, total, squares = 0, 0.0, 0.0
    for chunk in chunks:
        flat = chunk.reshape(-1, chunk.shape[-1]).astype(np.float64)
        count, total, squares = count + len(flat), total + flat.sum(axis=0), squares + (flat**2).sum(axis=0)
    if not count:
        raise DataError("no inputs to take channel statistics of")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
