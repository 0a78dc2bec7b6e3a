"""The TensorFlow-free side stays TensorFlow-free (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TF_MODULES = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization")


@pytest.mark.parametrize(
    "module",
    [
        "edgedx.preprocess",
        "edgedx.bundle",
        "edgedx.data",
        "edgedx.outputs",
        "edgedx.errors",
        "edgedx.cli",
        "edgedx.runtime",
        "edgedx.runtime.probe",
        "edgedx.devices",
        "edgedx.serve",
    ],
)
def test_module_imports_no_tensorflow(module):
    code = (
        f"import sys, {module}; "
        f"loaded = [m for m in {TF_MODULES!r} if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"{module} pulled in {run.stdout.strip()}"


def test_reading_dicom_imports_no_tensorflow(tiny_headct):
    """Reading and preprocessing a study, as the runtime will, loads no TensorFlow."""
    code = (
        "import sys; from edgedx.data import load_dataset; from edgedx.preprocess import *; "
        f"d = load_dataset({str(tiny_headct)!r}); "
        "spec = PreprocessSpec(size=32, windows=parse_windows('brain,subdural,bone')); "
        "x = to_model_inputs(d.splits['test'].images(), spec); assert x.shape[1:] == (32, 32, 3); "
        f"sys.exit(any(m in sys.modules for m in {TF_MODULES!r}))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
