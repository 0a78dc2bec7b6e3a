"""The probe's memory figure is the probe's own, not inherited from the process that started it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux keeps ru_maxrss across exec")
def test_peak_rss_is_not_inherited_from_a_big_parent():
    ballast = np.ones(50_000_000)  # 400 MB resident in this (parent) process
    code = "from edgedx.runtime.probe import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 5 < child < 200, child
    assert ballast.sum() == 50_000_000
