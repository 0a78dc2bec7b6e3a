"""A narrower student started from its teacher's most active channels (edgedx/compress/inherit.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_tf

pytestmark = [pytest.mark.tf, needs_tf]

#: Channels of the residual space the hand-made teacher below leaves dead.
DEAD = [1, 3, 4, 6]


def _residual_net(channels: int):
    """conv -> BN -> ReLU, then a conv whose output is added back: one residual channel space."""
    from edgedx._tf import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(channels, 3, padding="same", use_bias=False)(inputs)))
    y = layers.Conv2D(channels, 3, padding="same")(x)
    x = layers.ReLU()(layers.Add()([x, y]))
    hidden = layers.Conv2D(5, 1)(x)  # a space of its own that the student keeps whole
    outputs = layers.Dense(1)(layers.GlobalAveragePooling2D()(hidden))
    return keras.Model(inputs, outputs)


def _upsampling_net(channels: int):
    """A transposed convolution: a Conv2D subclass whose kernel is stored (h, w, out, in)."""
    from edgedx._tf import keras

    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2DTranspose(channels, 3, padding="same")(layers.Conv2D(channels, 3, padding="same")(inputs))
    return keras.Model(inputs, layers.Dense(1)(layers.GlobalAveragePooling2D()(x)))


def _teacher_with_dead_channels():
    """An 8-channel teacher whose residual channels in DEAD are zero wherever they are computed."""
    teacher = _residual_net(8)
    rng = np.random.default_rng(0)
    for layer in teacher.layers:
        weights = [rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()]
        if layer.name.startswith("batch_normalization"):
            gamma, beta, mean, variance = weights
            weights = [gamma, beta, mean, np.abs(variance) + 1]
            weights[1][DEAD] = 0  # BN of a zero channel: gamma * (0 - mean) / std + beta = 0
            weights[2][DEAD] = 0
        elif layer.name in ("conv2d", "conv2d_1"):
            weights[0][..., DEAD] = 0
            if len(weights) == 2:
                weights[1][DEAD] = 0
        layer.set_weights(weights)
    return teacher


def test_a_student_of_the_live_channels_computes_the_teachers_function():
    """Channels joined by a residual addition are chosen together; dead ones are dropped, so nothing changes."""
    from edgedx._tf import keras
    from edgedx.compress.inherit import inherit_channels

    keras.backend.clear_session()
    teacher = _teacher_with_dead_channels()
    student = _residual_net(4)
    x = np.random.default_rng(1).normal(size=(40, 8, 8, 3)).astype("float32")
    inherit_channels(teacher, student, x)
    np.testing.assert_allclose(student.predict(x, verbose=0), teacher.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
    live = [c for c in range(8) if c not in DEAD]
    np.testing.assert_array_equal(student.layers[1].get_weights()[0], teacher.layers[1].get_weights()[0][..., live])


def test_a_student_as_wide_as_its_teacher_is_the_teacher():
    from edgedx._tf import keras
    from edgedx.compress.inherit import inherit_channels
    from edgedx.models import create_model

    keras.backend.clear_session()
    teacher = create_model("resnet-small", (16, 16, 3), 2, width=0.25)
    student = create_model("resnet-small", (16, 16, 3), 2, width=0.25)
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
    inherit_channels(teacher, student, x)
    np.testing.assert_allclose(student.predict(x, verbose=0), teacher.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_a_narrower_resnet_and_mobilenet_inherit_slices_of_their_teachers_weights():
    from edgedx._tf import keras
    from edgedx.compress.inherit import inherit_channels
    from edgedx.models import create_model

    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    for arch in ("resnet-small", "mobilenetv2"):
        keras.backend.clear_session()
        teacher = create_model(arch, (32, 32, 3), 2, width=1.0)
        student = create_model(arch, (32, 32, 3), 2, width=0.5)
        inherit_channels(teacher, student, x)
        t_stem, s_stem = (next(la for la in m.layers if la.weights) for m in (teacher, student))
        t_kernel, s_kernel = t_stem.get_weights()[0], s_stem.get_weights()[0]
        assert s_kernel.shape[-1] < t_kernel.shape[-1]
        for channel in range(s_kernel.shape[-1]):  # every kept filter is one of the teacher's, in order
            assert any(np.array_equal(s_kernel[..., channel], t_kernel[..., c]) for c in range(t_kernel.shape[-1]))


def test_another_architecture_or_an_unknown_layer_leaves_the_student_untouched():
    from edgedx._tf import keras
    from edgedx.compress.inherit import NotInheritable, inherit_channels
    from edgedx.models import create_model

    keras.backend.clear_session()
    x = np.zeros((4, 16, 16, 3), "float32")
    for teacher, student, reason in (
        (create_model("resnet-small", (16, 16, 3), 2), create_model("seed-cnn", (16, 16, 3), 2), "layer counts"),
        (create_model("seed-cnn", (16, 16, 3), 2), create_model("seed-cnn", (16, 16, 3), 2, width=0.5), "Flatten"),
        (_upsampling_net(8), _upsampling_net(4), "Conv2DTranspose"),
    ):
        before = [w.copy() for w in student.get_weights()]
        with pytest.raises(NotInheritable, match=reason):
            inherit_channels(teacher, student, x)
        assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights(), strict=True))
