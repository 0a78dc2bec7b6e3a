"""Measure one model as a device would run it, in a process of its own.

``python -m edgedx.runtime.probe`` loads a bundle's deployed model with the runtime, limited as a
device profile says (CPU affinity, address-space cap, inference workers and interpreter threads
per worker), predicts every input once (the probabilities the clinical figures are computed
from), then times single-image predictions (preprocessed input -> probabilities, the way the
daemon's workers call the model, all workers at once), and prints one JSON object. The process
imports no TensorFlow, and says so in its output.

:func:`run_probe` starts such a process and returns its figures; ``edgedx bench`` and the offline
kit both use it. :func:`measure` is the timing loop, shared with the Keras probe of ``edgedx bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import pin_process
from ..errors import EdgedxError

PredictFn = Callable[[np.ndarray], np.ndarray]

#: Inputs read from the file and predicted at a time: a probe's memory does not grow with the split.
INPUT_CHUNK = 256
#: Distinct inputs the timed single-image calls cycle through.
LATENCY_SAMPLE = 64
#: Latencies within this fraction of each other are a tie on a shared machine: --quantize auto
#: breaks such ties by size, and bench does not call the slower one slower.
LATENCY_TIE = 0.05


class NpyRows:
    """Rows of a ``.npy`` file, read when asked for: the file is neither loaded nor memory-mapped
    (a mapped page read once stays in the process's resident set, and in its memory figure)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (
                np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
            )
            self._offset = f.tell()
        if fortran or not shape:
            raise ValueError(f"{self.path}: expected a C-ordered array of inputs, got shape {shape}")
        self.shape, self.dtype = tuple(shape), dtype
        self._row_items = int(np.prod(shape[1:], dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, len(self))
        count = max(0, stop - start)
        with self.path.open("rb") as f:
            f.seek(self._offset + start * self._row_items * self.dtype.itemsize)
            flat = np.fromfile(f, self.dtype, count * self._row_items)
        return flat.reshape((count, *self.shape[1:]))


def apply_limits(cpu_affinity: list[int] | tuple[int, ...], memory_limit_mb: int) -> list[str]:
    """Pin this process to ``cpu_affinity`` and cap its address space; what could not be applied."""
    skipped = []
    if missing := pin_process(cpu_affinity):
        skipped.append(f"CPUs {missing} do not exist here or are not ours")
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return skipped


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    Linux's ``ru_maxrss`` survives ``exec``: a probe started by a 800 MB TensorFlow process would
    report 800 MB. ``VmHWM`` in ``/proc/self/status`` belongs to this program's own memory map.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure(workers: Sequence[PredictFn], predict_all: PredictFn, inputs: NpyRows, runs: int, warmup: int) -> dict:
    """Probabilities for every input, ``INPUT_CHUNK`` at a time, then ``warmup`` untimed and ``runs``
    timed one-image calls per worker over the first ``LATENCY_SAMPLE`` inputs.

    ``workers`` holds one single-image predict per inference worker. They are timed all at once,
    one thread each, as ``edgedx serve`` runs them when slices queue up: each call's latency is
    what it takes while the other workers run too, and throughput counts every worker's calls.
    """
    sample = inputs.rows(0, LATENCY_SAMPLE)
    began = time.perf_counter()
    workers[0](sample[:1])
    first_prediction = time.time()
    first_seconds = time.perf_counter() - began
    scores = np.concatenate(
        [np.asarray(predict_all(inputs.rows(i, i + INPUT_CHUNK))) for i in range(0, len(inputs), INPUT_CHUNK)]
    )
    for predict_one in workers:
        for i in range(warmup):
            predict_one(sample[i % len(sample) : i % len(sample) + 1])
    start = threading.Barrier(len(workers))

    def timed_calls(predict_one: PredictFn) -> np.ndarray:
        latencies = np.empty(runs)
        start.wait()
        for i in range(runs):
            x = sample[i % len(sample) : i % len(sample) + 1]
            t = time.perf_counter()
            predict_one(x)
            latencies[i] = time.perf_counter() - t
        return latencies

    began = time.perf_counter()
    with ThreadPoolExecutor(len(workers)) as pool:
        latencies = np.concatenate(list(pool.map(timed_calls, workers)))
    wall = time.perf_counter() - began
    return {
        "probabilities": np.asarray(scores, np.float64).tolist(),
        "first_prediction_unix": first_prediction,
        "first_prediction_seconds": first_seconds,
        "latency_ms": (latencies * 1000).round(4).tolist(),
        "throughput_per_s": len(latencies) / wall,
    }


def summarize_latency(latency_ms: list[float]) -> dict[str, float]:
    lat = np.asarray(latency_ms)
    return {
        "mean_ms": float(lat.mean()),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def probe_deployable(
    bundle: str, role: str, inputs: NpyRows, *, threads: int, workers: int, runs: int, warmup: int
) -> dict:
    """The runtime's model, loaded once per worker as the daemon loads it (the memory figure holds them all)."""
    from .model import Model

    began = time.perf_counter()
    model = Model.load(bundle, role=role, threads=threads)
    load_seconds = time.perf_counter() - began
    models = [model, *(Model.load(bundle, role=role, threads=threads) for _ in range(workers - 1))]
    result = measure([m.predict_inputs for m in models], model.predict_inputs, inputs, runs, warmup)
    return result | {"load_seconds": load_seconds, "backend": model.backend}


def run_probe(
    module: str,
    *,
    bundle: Path | str,
    role: str,
    inputs: Path | str,
    threads: int,
    workers: int = 1,
    cpu_affinity: list[int] | tuple[int, ...] = (),
    memory_limit_mb: int = 0,
    runs: int = 200,
    warmup: int = 20,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run ``python -m module`` (this probe, or another with the same options) and return its JSON.

    Adds ``cold_start_seconds``: from starting the process to its first prediction, including the
    interpreter's start-up and every import.
    """
    command = [
        sys.executable, "-m", module, "--bundle", str(bundle), "--role", role, "--inputs", str(inputs),
        "--threads", str(threads), "--workers", str(workers), "--runs", str(runs), "--warmup", str(warmup),
        "--memory-limit-mb", str(memory_limit_mb), "--cpu-affinity", ",".join(map(str, cpu_affinity)),
    ]  # fmt: skip
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgedxError(f"measuring {role} of {bundle} failed (exit {done.returncode}): {reason}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise EdgedxError(f"measuring {role} of {bundle} failed: {result['error']}")
    result["cold_start_seconds"] = result["first_prediction_unix"] - started
    return result


def probe_main(probe: Callable[..., dict], argv: list[str] | None = None) -> None:
    """The command line of a probe process; ``probe`` loads and measures one model."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--role", required=True)
    parser.add_argument("--inputs", required=True, help=".npy of preprocessed inputs (N, S, S, C)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="models loaded and timed at once (workers)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    parser.add_argument("--cpu-affinity", default="")
    args = parser.parse_args(argv)
    affinity = [int(c) for c in args.cpu_affinity.split(",") if c]
    try:
        notes = apply_limits(affinity, args.memory_limit_mb)
        inputs = NpyRows(args.inputs)
        limits = {"threads": args.threads, "workers": args.workers, "runs": args.runs, "warmup": args.warmup}
        result = probe(args.bundle, args.role, inputs, **limits)
    except (EdgedxError, MemoryError, OSError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return
    result |= {
        "peak_rss_mb": peak_rss_mb(),
        "threads": args.threads,
        "workers": args.workers,
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_limit_mb": args.memory_limit_mb,
        "notes": notes,
        "tensorflow_loaded": any(m in sys.modules for m in ("tensorflow", "tf_keras")),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    probe_main(probe_deployable)
