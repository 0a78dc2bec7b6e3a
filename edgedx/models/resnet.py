"""A small ResNet (He et al. 2016): three stages of two basic blocks, widths w, 2w, 4w."""

from __future__ import annotations

from ._registry import batch_norm, register_architecture


def _basic_block(x, filters: int, stride: int):
    from .._tf import keras

    layers = keras.layers
    shortcut = x
    y = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False)(x)
    y = batch_norm()(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, 1, padding="same", use_bias=False)(y)
    y = batch_norm()(y)
    if stride != 1 or x.shape[-1] != filters:
        # A 1x1 convolution of stride 2 is the same function as taking every other pixel and then
        # a 1x1 convolution. Written as one layer, its gradient crashed TensorFlow's oneDNN
        # AVX-512 kernels at 4-8 input channels (width 0.25 and below, which --target-kb reaches).
        if stride != 1:
            x = layers.AveragePooling2D(1, stride)(x)
        shortcut = layers.Conv2D(filters, 1, use_bias=False)(x)
        shortcut = batch_norm()(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


@register_architecture("resnet-small")
def resnet_small(input_shape: tuple[int, int, int], num_outputs: int, *, width: float = 1.0):
    from .._tf import keras

    layers = keras.layers
    base = max(4, round(32 * width))
    inputs = keras.Input(input_shape, name="image")
    # inputs larger than 64 px are halved first so compute stays in proportion to the content
    stem_stride = 2 if input_shape[0] > 64 else 1
    x = layers.Conv2D(base, 3, stem_stride, padding="same", use_bias=False)(inputs)
    x = batch_norm()(x)
    x = layers.ReLU()(x)
    for stage, filters in enumerate((base, 2 * base, 4 * base)):
        x = _basic_block(x, filters, 1 if stage == 0 else 2)
        x = _basic_block(x, filters, 1)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet-small")
