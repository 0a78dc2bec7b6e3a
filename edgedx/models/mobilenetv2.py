"""MobileNetV2 (Sandler et al. 2018) with a width multiplier, sized for small medical images."""

from __future__ import annotations

from ._registry import batch_norm, register_architecture

# (expansion t, channels c, repeats n, stride s) of the paper's Table 2
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without going below 90% of the value (as the paper's code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _inverted_residual(x, expansion: int, filters: int, stride: int):
    from .._tf import keras

    layers = keras.layers
    cin = x.shape[-1]
    y = x
    if expansion != 1:
        y = layers.Conv2D(cin * expansion, 1, use_bias=False)(y)
        y = batch_norm()(y)
        y = layers.ReLU(6.0)(y)
    y = layers.DepthwiseConv2D(3, stride, padding="same", use_bias=False)(y)
    y = batch_norm()(y)
    y = layers.ReLU(6.0)(y)
    y = layers.Conv2D(filters, 1, use_bias=False)(y)
    y = batch_norm()(y)
    return layers.Add()([x, y]) if stride == 1 and cin == filters else y


@register_architecture("mobilenetv2")
def mobilenetv2(input_shape: tuple[int, int, int], num_outputs: int, *, width: float = 0.35):
    """``width`` is the paper's alpha; 0.35 is the smallest published variant."""
    from .._tf import keras

    layers = keras.layers
    inputs = keras.Input(input_shape, name="image")
    # small inputs skip the first downsampling so the last feature map keeps some extent
    stem_stride = 2 if input_shape[0] >= 96 else 1
    x = layers.Conv2D(_divisible(32 * width), 3, stem_stride, padding="same", use_bias=False)(inputs)
    x = batch_norm()(x)
    x = layers.ReLU(6.0)(x)
    for expansion, channels, repeats, stride in _BLOCKS:
        for i in range(repeats):
            x = _inverted_residual(x, expansion, _divisible(channels * width), stride if i == 0 else 1)
    x = layers.Conv2D(_divisible(1280 * max(1.0, width)), 1, use_bias=False)(x)
    x = batch_norm()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenetv2")
