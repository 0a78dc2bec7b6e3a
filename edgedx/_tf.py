"""The one place edgedx imports TensorFlow.

tensorflow 2.21 with tf-keras 2.21 and tensorflow-model-optimization 0.8.1 only work together
when ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported, so every TF-side
module imports ``tf`` and ``keras`` from here. The runtime side never imports this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings

from .errors import DependencyError

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    warnings.warn(
        "tensorflow was imported before edgedx without TF_USE_LEGACY_KERAS=1; "
        "pruning and quantization-aware training may fail",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
#: Set to 1 to see TensorFlow's C++ log lines (``edgedx --verbose`` does).
VERBOSE_ENV = "EDGEDX_TF_LOGS"
_verbose = os.environ.get(VERBOSE_ENV) == "1"
# ERROR too: TensorFlow logs "failed call to cuInit" and graph-attribute notices at that level on
# every CPU-only machine, and a newcomer reads them as failures.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if _verbose else "3")


@contextlib.contextmanager
def _native_stderr_captured():
    """Hide what TensorFlow's shared libraries write to file descriptor 2 while they load.

    They log (oneDNN, CUDA stubs) before TF_CPP_MIN_LOG_LEVEL takes effect. The text is replayed
    if the import fails, so a broken install still explains itself.
    """
    if _verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


try:
    with _native_stderr_captured():
        import tensorflow as tf
        import tf_keras as keras
except ImportError as exc:  # pragma: no cover - depends on the install
    raise DependencyError(
        f"this command needs TensorFlow ({exc.name} is missing): pip install 'edgedx[train]'"
    ) from None

tf.get_logger().setLevel("ERROR")

__all__ = ["keras", "tf"]
