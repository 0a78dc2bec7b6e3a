"""Architecture registry: a decorator, a dict, and a factory whose error lists the valid names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, ModelNotFound

ArchitectureFn = Callable[..., Any]  # (input_shape, num_outputs, *, width) -> keras.Model
_ARCHITECTURES: dict[str, ArchitectureFn] = {}


def register_architecture(name: str) -> Callable[[ArchitectureFn], ArchitectureFn]:
    """Register ``fn(input_shape, num_outputs, *, width=1.0) -> keras.Model`` under ``name``."""

    def add(fn: ArchitectureFn) -> ArchitectureFn:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        _ARCHITECTURES[name] = fn
        return fn

    return add


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def create_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width: float | None = None,
    multilabel: bool = False,
):
    """Build architecture ``name`` for ``input_shape`` (H, W, C) and ``num_classes`` classes.

    Binary tasks get one output (the logit of the positive class); multi-class tasks one logit per
    class; multi-label tasks (``multilabel``, ``num_classes`` labels) one logit per label. Outputs
    are logits: the runtime applies the sigmoid or softmax. ``width`` scales every layer's
    channels; ``None`` keeps the architecture's own default.
    """
    if name not in _ARCHITECTURES:
        raise ModelNotFound(f"unknown architecture {name!r}; choose from: {', '.join(list_architectures())}")
    if num_classes < 2:
        raise ConfigError(f"need at least 2 {'labels' if multilabel else 'classes'}, got {num_classes}")
    if width is not None and not 0.05 <= width <= 4.0:
        raise ConfigError(f"width multiplier must be in [0.05, 4], got {width}")
    num_outputs = 1 if num_classes == 2 and not multilabel else num_classes
    options = {} if width is None else {"width": width}
    return _ARCHITECTURES[name](tuple(input_shape), num_outputs, **options)


def batch_norm():
    """Batch normalisation whose moving statistics settle within a few dozen steps.

    Keras' default momentum (0.99) needs some 300 steps to forget its initial statistics. The
    embedded head-CT set has about 17 batches per epoch, so with it the inference-mode statistics
    lagged the weights for most of training and validation AUC swung between 0.5 and 0.9 from one
    epoch to the next; 0.9 follows within about 30 steps.
    """
    from .._tf import keras

    return keras.layers.BatchNormalization(momentum=0.9)
