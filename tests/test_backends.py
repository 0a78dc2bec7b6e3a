"""Interpreter backends: LiteRT by default, tflite-runtime as fallback, a clear error when neither is there."""

from __future__ import annotations

import pytest

from edgedx.runtime import _backends
from edgedx.runtime._backends import BackendUnavailable, load_backend


def test_litert_is_the_default():
    assert load_backend().name == "litert"


def test_falls_back_to_the_next_installed_backend(monkeypatch):
    monkeypatch.setattr(
        _backends,
        "BACKENDS",
        {
            "litert": ("edgedx_no_such_module.interpreter", "Interpreter"),
            **{"tflite-runtime": _backends.BACKENDS["litert"]},
        },
    )
    assert load_backend().name == "tflite-runtime"


def test_no_interpreter_is_a_clear_error(monkeypatch):
    missing = {name: (f"edgedx_missing_{i}.interpreter", "Interpreter") for i, name in enumerate(_backends.BACKENDS)}
    monkeypatch.setattr(_backends, "BACKENDS", missing)
    with pytest.raises(
        BackendUnavailable, match="no TFLite interpreter found; install one: pip install ai-edge-litert"
    ):
        load_backend()
    with pytest.raises(BackendUnavailable, match="unknown backend 'onnx'"):
        load_backend("onnx")


def test_numpy2_failure_of_tflite_runtime_is_explained():
    def broken(**_):
        raise SystemError("initialization of _pywrap_tensorflow_interpreter_wrapper raised unreported exception")

    backend = _backends.Backend("tflite-runtime", broken)
    with pytest.raises(BackendUnavailable, match="does not work with this numpy.*pip install ai-edge-litert"):
        backend.create("model.tflite", 1)


# -- ONNX Runtime, the optional second engine ---------------------------------------------------------


@pytest.fixture
def linear_onnx(tmp_path):
    """A 4x4x1 -> 1 linear model as ONNX, built with onnx's helpers (no TensorFlow): logits = sum(x) * 0.5."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.full((16, 1), 0.5, np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 16], np.int64), "flat")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "flat"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, 4, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1])],
        initializer=[weights, shape],
    )
    path = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _records(shape=(1, 4, 4, 1)):
    from edgedx.bundle import TensorRecord

    return {
        "input_record": TensorRecord(dtype="float32", shape=shape),
        "output_record": TensorRecord(dtype="float32", shape=(1, 1)),
    }


def test_onnx_models_run_on_onnx_runtime_in_batches(linear_onnx):
    import numpy as np

    from edgedx.runtime import open_runner
    from edgedx.runtime._onnx import BATCH

    runner = open_runner(linear_onnx, "onnx-float32", threads=1, **_records())
    assert runner.backend == "onnxruntime" and runner.input_shape == (1, 4, 4, 1)
    x = np.random.default_rng(0).random((BATCH * 2 + 3, 4, 4, 1), np.float32)
    np.testing.assert_allclose(runner.logits(x)[:, 0], x.reshape(len(x), -1).sum(1) * 0.5, rtol=1e-5)
    assert runner.logits(x[:0]).shape == (0, 1)


def test_onnx_model_that_is_not_what_the_manifest_says_is_refused(linear_onnx, tmp_path):
    from edgedx.errors import BundleError, DataError
    from edgedx.runtime import open_runner

    with pytest.raises(BundleError, match=r"input has shape \[4, 4, 1\]; the manifest says \[8, 8, 1\]"):
        open_runner(linear_onnx, "onnx-float32", **_records((1, 8, 8, 1)))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(BundleError, match="broken.onnx: not an ONNX model ONNX Runtime can load"):
        open_runner(broken, "onnx-float32", **_records())
    import numpy as np

    with pytest.raises(DataError, match="input has shape"):
        open_runner(linear_onnx, "onnx-float32", **_records()).logits(np.zeros((1, 8, 8, 1), np.float32))


def test_onnx_model_without_onnx_runtime_or_on_a_tflite_backend_is_a_clear_error(linear_onnx, monkeypatch):
    import importlib.util

    from edgedx.runtime import open_runner

    with pytest.raises(BackendUnavailable, match="an ONNX model runs on onnxruntime, not litert"):
        open_runner(linear_onnx, "onnx-float32", backend="litert", **_records())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"ONNX Runtime is not installed; pip install onnxruntime"):
        open_runner(linear_onnx, "onnx-float32", **_records())
