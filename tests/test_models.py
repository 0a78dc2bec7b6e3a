"""The architecture registry: every registered network honours one contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_tf

from edgedx import models  # the registry module itself imports no TensorFlow
from edgedx.errors import ConfigError, ModelNotFound

pytestmark = [pytest.mark.tf, needs_tf]


@pytest.mark.parametrize("name", models.list_architectures())
@pytest.mark.parametrize("classes", [2, 5])
def test_architecture_contract(name, classes):
    """Builds at a small size, outputs one logit (binary) or one per class, counts params and MACs."""
    model = models.create_model(name, (32, 32, 3), classes, width=0.5)
    out = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert tuple(out.shape) == (2, 1 if classes == 2 else classes)
    params, nonzero = models.count_parameters(model)
    assert params == model.count_params() and 0 < nonzero <= params
    assert models.count_macs(model) > params // 4


def test_width_scales_parameters():
    small = models.count_parameters(models.create_model("resnet-small", (32, 32, 3), 2, width=0.25))[0]
    full = models.count_parameters(models.create_model("resnet-small", (32, 32, 3), 2, width=1.0))[0]
    assert full > 8 * small


def test_seed_cnn_macs_by_hand():
    """8x8x1 input: conv 8*8*9*1*64 + conv 4*4*9*64*64 + dense 256*64 + dense 64*1."""
    model = models.create_model("seed-cnn", (8, 8, 1), 2)
    assert models.count_macs(model) == 36864 + 589824 + 16384 + 64


def test_unknown_architecture_lists_choices():
    with pytest.raises(
        ModelNotFound,
        match=r"unknown architecture 'vgg'; choose from: mobilenetv2, resnet-small, "
        r"seed-cnn",
    ):
        models.create_model("vgg", (32, 32, 1), 2)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        models.create_model("seed-cnn", (32, 32, 1), 1)
    with pytest.raises(ConfigError, match="width multiplier"):
        models.create_model("seed-cnn", (32, 32, 1), 2, width=0)


@pytest.mark.tf
@needs_tf
@pytest.mark.parametrize("width", [0.125, 0.25])
def test_resnet_small_trains_at_the_narrowest_widths(width):
    """At 4-8 channels the gradient of a 1x1 stride-2 convolution (the residual shortcut) crashed
    oneDNN's AVX-512 kernels (exit 139 or a heap corruption abort); --target-kb reaches these
    widths. Trained in a child process, so a crash fails this test and not the suite."""
    import subprocess
    import sys

    code = f"""
import numpy as np
from edgedx._tf import keras
from edgedx.models import create_model
model = create_model("resnet-small", (64, 64, 3), 2, width={width})
model.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True))  # one logit for two classes
rng = np.random.default_rng(0)
labels = rng.integers(0, 2, (128, 1)).astype(np.float32)
model.fit(rng.random((128, 64, 64, 3), np.float32), labels, batch_size=64, epochs=2, verbose=0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
