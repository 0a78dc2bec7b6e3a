"""Device profiles: the shipped ones load, a dropped-in file is found, bad files get a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgedx.devices import available_devices, load_profile
from edgedx.errors import ConfigError


def test_shipped_profiles_load():
    for name in ("console-2core", "edge-1core"):
        profile = load_profile(name)
        assert profile.threads >= 1
        assert set(profile.budgets) == {"latency_p95_ms", "peak_rss_mb", "model_size_kb", "min_auc", "max_flips"}
    assert set(load_profile("host").budgets) == {"latency_p95_ms", "peak_rss_mb", "model_size_kb"}
    edge = load_profile("edge-1core")
    assert edge.threads == 1 and edge.cpu_affinity == (0,) and edge.memory_limit_mb > 0


def test_dropped_in_profile_is_found(tmp_path, monkeypatch):
    (tmp_path / "ward-box.toml").write_text('description = "a ward box"\nthreads = 3\n[budgets]\nmin_auc = 0.8\n')
    monkeypatch.setenv("EDGEDX_DEVICES", str(tmp_path))
    assert "ward-box" in available_devices()
    profile = load_profile("ward-box")
    assert (profile.threads, profile.budgets, profile.memory_limit_mb) == (3, {"min_auc": 0.8}, 0)
    assert profile.engines == ("tflite",)  # unless a profile says so, a device has the base install only


def test_profiles_say_how_the_daemon_runs_there():
    """Workers x threads as `edgedx serve` runs them: bench and --quantize auto time that regime."""
    assert (load_profile("host").workers, load_profile("host").threads) == (2, 1)  # serve's defaults
    assert (load_profile("console-2core").workers, load_profile("console-2core").threads) == (2, 1)
    edge = load_profile("edge-1core")
    assert (edge.workers, edge.threads, edge.regime) == (1, 1, "1 worker x 1 thread")
    assert load_profile("host").regime == "2 workers x 1 thread"


def test_a_profile_without_workers_has_one(tmp_path):
    (tmp_path / "box.toml").write_text("threads = 4\n")
    assert load_profile(tmp_path / "box.toml").workers == 1


def test_profiles_name_the_engines_their_device_runs():
    assert load_profile("host").engines == ("tflite", "onnx")
    assert load_profile("console-2core").engines == ("tflite", "onnx")
    assert load_profile("edge-1core").engines == ("tflite",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threads = 0", "threads must be a whole number >= 1"),
        ("threads = 1\nworkers = 0", "workers must be a whole number >= 1"),
        ("threads = 1\nworkers = true", "workers must be a whole number >= 1"),
        ("threads = 2\ncpu_affinity = 'all'", "cpu_affinity must be a list"),
        ("threads = 2\nmemory_limit_mb = -5", "memory_limit_mb must be"),
        ("threads = 2\ncolour = 'red'", "unknown field.*colour"),
        ("threads = 2\n[budgets]\nlatency_p50_ms = 3", "unknown budget 'latency_p50_ms'"),
        ("threads = 2\n[budgets]\nmin_auc = 'high'", "budget min_auc must be a number"),
        ("threads = [", "not valid TOML"),
        ("threads = 2\nengines = ['tvm']", "engines must be a non-empty list of tflite, onnx"),
        ("threads = 2\nengines = []", "engines must be a non-empty list"),
    ],
)
def test_bad_profile_is_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ConfigError, match="no device profile 'toaster'; known: .*console-2core"):
        load_profile("toaster")


def test_budget_check_names_what_is_missed():
    profile = load_profile("edge-1core")
    missed = profile.check({"latency_p95_ms": 1e6, "min_auc": 0.5, "max_flips": 0.0, "model_size_kb": 1.0})
    assert len(missed) == 2
    assert any(m.startswith("latency_p95_ms") and "above" in m for m in missed)
    assert any(m.startswith("min_auc") and "below" in m for m in missed)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread affinity from Linux's /proc")
def test_pin_process_moves_threads_started_before_it_and_names_missing_cpus():
    """Every thread, including one started before (as numpy's BLAS pool is), and threads started after."""
    code = """
import os, threading, time
from pathlib import Path
from edgedx.devices import pin_process
stop = threading.Event()
early = threading.Thread(target=stop.wait); early.start()
cpu = min(os.sched_getaffinity(0))
print(pin_process([cpu, 9999]))
late = threading.Thread(target=stop.wait); late.start()
tasks = Path("/proc/self/task").iterdir()
allowed = {(t / "status").read_text().split("Cpus_allowed_list:")[1].split()[0] for t in tasks}
print(sorted(allowed) == [str(cpu)])
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[9999]", "True"]
