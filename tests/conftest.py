"""Shared fixtures: tiny synthetic data made on the fly, and the real MedMNIST files when present."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Tests of the TensorFlow side skip without the [train] extra. find_spec looks without importing,
#: so TensorFlow is first imported through edgedx._tf, which sets TF_USE_LEGACY_KERAS first.
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="needs the [train] extra")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep the embedded default dataset of a test run out of the user's cache."""
    monkeypatch.setenv("EDGEDX_HOME", str(tmp_path_factory.getbasetemp() / "edgedx-home"))


@pytest.fixture(scope="session")
def tiny_headct(tmp_path_factory) -> Path:
    """Ten synthetic head-CT studies of three slices (easy lesions); every split has both classes."""
    from edgedx.data import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("data") / "headct"
    return synthesize(out, SynthConfig(studies=10, slices=3, seed=0, difficulty="easy"))


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """A MedMNIST-shaped .npz: bright centre square = class 1, dark = class 0, 16x16."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 64), ("val", 24), ("test", 24)):
        labels = rng.integers(0, 2, size=(n, 1))
        images = rng.integers(0, 60, size=(n, 16, 16)).astype(np.uint8)
        images[labels[:, 0] == 1, 5:11, 5:11] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    path = tmp_path_factory.mktemp("npz") / "toymnist.npz"
    np.savez(path, **arrays)
    return path


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data)")
    return path


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
