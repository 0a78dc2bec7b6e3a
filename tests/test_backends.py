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
