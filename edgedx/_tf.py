"""The one place edgedx imports TensorFlow.

tensorflow 2.21 with tf-keras 2.21 and tensorflow-model-optimization 0.8.1 only work together
when ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported, so every TF-side
module imports ``tf`` and ``keras`` from here. The runtime side never imports this module.
"""

from __future__ import annotations

import os
import sys
import warnings

from ._quiet import native_logs_hidden, verbose
from .errors import DependencyError

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    warnings.warn(
        "tensorflow was imported before edgedx without TF_USE_LEGACY_KERAS=1; "
        "pruning and quantization-aware training may fail",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# ERROR too: TensorFlow logs "failed call to cuInit" and graph-attribute notices at that level on
# every CPU-only machine, and a newcomer reads them as failures.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose() else "3")

try:
    with native_logs_hidden():  # TensorFlow's libraries log while loading, before that variable applies
        import tensorflow as tf
        import tf_keras as keras
except ImportError as exc:  # pragma: no cover - depends on the install
    raise DependencyError(
        f"this command needs TensorFlow ({exc.name} is missing): pip install 'edgedx[train]'"
    ) from None

tf.get_logger().setLevel("ERROR")

__all__ = ["keras", "tf"]
