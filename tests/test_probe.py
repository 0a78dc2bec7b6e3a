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


def test_npy_rows_reads_the_rows_numpy_would(tmp_path):
    from edgedx.runtime.probe import NpyRows

    array = np.arange(7 * 4 * 4 * 3, dtype=np.float32).reshape(7, 4, 4, 3)
    np.save(tmp_path / "x.npy", array)
    rows = NpyRows(tmp_path / "x.npy")
    assert len(rows) == 7 and rows.shape == array.shape and rows.dtype == array.dtype
    for start, stop in [(0, 7), (2, 5), (5, 100), (7, 9), (0, 0)]:
        np.testing.assert_array_equal(rows.rows(start, stop), array[start:stop])


def test_npy_rows_refuses_a_fortran_ordered_file(tmp_path):
    from edgedx.runtime.probe import NpyRows

    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 2), np.float32)))
    with pytest.raises(ValueError, match="C-ordered"):
        NpyRows(tmp_path / "f.npy")


def test_measure_predicts_every_input_once_in_order_a_chunk_at_a_time(tmp_path, monkeypatch):
    from edgedx.runtime import probe

    monkeypatch.setattr(probe, "INPUT_CHUNK", 3)
    array = np.random.default_rng(0).normal(size=(10, 2, 2, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    chunk_sizes = []

    def predict_all(x):
        chunk_sizes.append(len(x))
        return x.reshape(len(x), -1).sum(axis=1)

    result = probe.measure([lambda x: x.sum()], predict_all, probe.NpyRows(tmp_path / "x.npy"), runs=5, warmup=2)
    np.testing.assert_allclose(result["probabilities"], array.reshape(10, -1).sum(axis=1), rtol=1e-6)
    assert chunk_sizes == [3, 3, 3, 1]
    assert len(result["latency_ms"]) == 5


def test_measure_times_every_worker_at_once(tmp_path):
    """Two workers' timed calls overlap, as the daemon's workers do when slices queue up: each
    worker's first timed call waits for the other's (a barrier that only concurrent calls pass)."""
    import threading

    from edgedx.runtime import probe

    np.save(tmp_path / "x.npy", np.zeros((4, 2, 2, 1), np.float32))
    both_running = threading.Barrier(2, timeout=10)
    calls = {"a": 0, "b": 0}

    def worker(name, first_timed_call):
        def predict_one(x):
            calls[name] += 1
            if calls[name] == first_timed_call:
                both_running.wait()
            return x.sum()

        return predict_one

    # worker a also makes the first-prediction call; then each makes 2 warm-up calls
    a, b = worker("a", first_timed_call=1 + 2 + 1), worker("b", first_timed_call=2 + 1)
    result = probe.measure([a, b], lambda x: x.sum(axis=(1, 2, 3)), probe.NpyRows(tmp_path / "x.npy"), runs=6, warmup=2)
    assert not both_running.broken
    assert len(result["latency_ms"]) == 12  # every worker's calls
    assert calls == {"a": 1 + 2 + 6, "b": 2 + 6}
