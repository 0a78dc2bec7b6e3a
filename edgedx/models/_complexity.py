"""Parameter and multiply-accumulate counts of a Keras model."""

from __future__ import annotations

import numpy as np


def _spatial(shape) -> int:
    return int(np.prod([d for d in shape[1:-1] if d is not None])) if len(shape) > 2 else 1


def count_macs(model) -> int:
    """Multiply-accumulates for one input, counted over Conv2D, DepthwiseConv2D and Dense layers.

    Batch normalisation, activations, pooling and additions are left out: they fold into the
    convolutions or cost little next to them.
    """
    from .._tf import keras

    total = 0
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += _spatial(layer.output_shape) * kh * kw * layer.input_shape[-1] * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin, cout = layer.input_shape[-1], layer.filters
            total += _spatial(layer.output_shape) * kh * kw * cin * cout // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += _spatial(layer.output_shape) * layer.input_shape[-1] * layer.units
    return int(total)


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _leaf_layers(layer)
        else:
            yield getattr(layer, "layer", layer)  # tfmot wrappers keep the real layer in .layer


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, non-zero parameters) of the model's weights."""
    weights = model.get_weights()
    return int(sum(w.size for w in weights)), int(sum(np.count_nonzero(w) for w in weights))
