"""The seed document's network: Conv64 - Pool - Conv64 - Pool - Dense64."""

from __future__ import annotations

from ._registry import register_architecture


@register_architecture("seed-cnn")
def seed_cnn(input_shape: tuple[int, int, int], num_outputs: int, *, width: float = 1.0):
    from .._tf import keras

    layers = keras.layers
    filters = max(4, round(64 * width))
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(filters, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, outputs, name="seed-cnn")
