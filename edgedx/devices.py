"""Device profiles: what a target box offers (threads, CPUs, memory) and what a model must meet there.

A profile is a TOML file named after the device (``devices/console-2core.toml``)::

    description = "Scanner console PC"
    workers = 2               # inference workers the daemon runs there (default 1), timed all at once
    threads = 1               # interpreter threads per worker
    cpu_affinity = [0, 1]     # CPUs the measuring process may use; [] for any
    memory_limit_mb = 1024    # address-space cap of the measuring process; 0 for none
    engines = ["tflite", "onnx"]  # runtimes installed there (default ["tflite"]: the base install)

    [budgets]                 # every budget is optional
    latency_p95_ms = 30.0
    peak_rss_mb = 250
    model_size_kb = 1024
    min_auc = 0.90
    max_flips = 0.02

Profiles are looked up in ``$EDGEDX_DEVICES`` (a folder), then ``./devices``, then the ``devices/``
folder shipped beside the package. A user adds a device by dropping a file into one of them.
Standard library only: the runtime side (the offline kit) reads profiles too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .errors import ConfigError
from .precision import ENGINES  # LiteRT ("tflite", the base install), ONNX Runtime ("onnx", edgedx[onnx])

#: Budget name -> (unit shown to users, True when the measured value must stay at or below it).
BUDGETS: dict[str, tuple[str, bool]] = {
    "latency_p95_ms": ("ms", True),
    "peak_rss_mb": ("MB", True),
    "model_size_kb": ("KB", True),
    "min_auc": ("", False),
    "max_flips": ("", True),
}
_FIELDS = {"description", "workers", "threads", "cpu_affinity", "memory_limit_mb", "engines", "budgets"}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    threads: int
    cpu_affinity: tuple[int, ...] = ()
    memory_limit_mb: int = 0
    budgets: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    engines: tuple[str, ...] = ("tflite",)  # what `compress --quantize auto` may deploy for this device
    workers: int = 1  # `edgedx serve --device` runs this many workers of ``threads`` threads each

    @property
    def regime(self) -> str:
        """How a model runs there, for reports: ``2 workers x 1 thread``."""
        return f"{self.workers} worker{'s' * (self.workers > 1)} x {self.threads} thread{'s' * (self.threads > 1)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"cpu_affinity": list(self.cpu_affinity), "engines": list(self.engines)}

    def check(self, measured: dict[str, float | None]) -> list[str]:
        """Budgets missed by ``measured`` (budget name -> value), as one sentence each."""
        missed = []
        for name, limit in self.budgets.items():
            value = measured.get(name)
            if value is None:
                continue
            unit, at_most = BUDGETS[name]
            if (value > limit) if at_most else (value < limit):
                relation = "above" if at_most else "below"
                missed.append(f"{name} {value:.4g}{unit} is {relation} the {self.name} budget of {limit:g}{unit}")
        return missed


def unavailable_cpus(cpus: Iterable[int]) -> list[int]:
    """Those of ``cpus`` that this machine lacks or does not let this process use."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    return sorted(set(cpus) - usable)


def pin_process(cpus: Iterable[int]) -> list[int]:
    """Keep every thread of this process, and those it starts later, on those of ``cpus`` that this
    machine has and lets us use; returns the ones it lacks (nothing is pinned if it has none of them).

    Every thread, not only the caller: libraries start threads at import (numpy's BLAS pool), and
    ``os.sched_setaffinity(0, ...)`` would move only the calling one.
    """
    wanted = set(cpus)
    missing = unavailable_cpus(wanted)
    usable = wanted - set(missing)
    if usable:
        tasks = Path("/proc/self/task")
        for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, usable)
    return missing


def device_figures(*, latency_p95_ms: float, peak_rss_mb: float, model_bytes: int) -> dict[str, float]:
    """A model's measured device figures, named as the budgets they are held to."""
    return {"latency_p95_ms": latency_p95_ms, "peak_rss_mb": peak_rss_mb, "model_size_kb": model_bytes / 1024}


def search_path() -> list[Path]:
    folders = [Path(p) for p in os.environ.get("EDGEDX_DEVICES", "").split(os.pathsep) if p]
    return [*folders, Path.cwd() / "devices", Path(__file__).resolve().parent.parent / "devices"]


def available_devices() -> dict[str, Path]:
    """Device name -> profile file; earlier folders of :func:`search_path` win."""
    found: dict[str, Path] = {}
    for folder in search_path():
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def parse_profile(name: str, data: dict[str, Any], source: str = "<profile>") -> DeviceProfile:
    """Check a profile's fields and build it; every problem is a :class:`ConfigError` naming ``source``."""
    unknown = set(data) - _FIELDS
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_FIELDS))}"
        )
    threads, workers = data.get("threads"), data.get("workers", 1)
    for key, value in (("threads", threads), ("workers", workers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: {key} must be a whole number >= 1, got {value!r}")
    affinity = data.get("cpu_affinity", [])
    if not isinstance(affinity, list) or not all(isinstance(c, int) and c >= 0 for c in affinity):
        raise ConfigError(f"{source}: cpu_affinity must be a list of CPU numbers, got {affinity!r}")
    memory = data.get("memory_limit_mb", 0)
    if not isinstance(memory, int) or memory < 0:
        raise ConfigError(f"{source}: memory_limit_mb must be a whole number of MB (0: no limit), got {memory!r}")
    engines = data.get("engines", ["tflite"])
    if not isinstance(engines, list) or not engines or not all(e in ENGINES for e in engines):
        raise ConfigError(f"{source}: engines must be a non-empty list of {', '.join(ENGINES)}, got {engines!r}")
    budgets = data.get("budgets", {})
    if not isinstance(budgets, dict):
        raise ConfigError(f"{source}: [budgets] must be a table")
    for key, value in budgets.items():
        if key not in BUDGETS:
            raise ConfigError(f"{source}: unknown budget {key!r}; known: {', '.join(BUDGETS)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{source}: budget {key} must be a number >= 0, got {value!r}")
    return DeviceProfile(
        name=name,
        description=str(data.get("description", name)),
        threads=threads,
        cpu_affinity=tuple(affinity),
        memory_limit_mb=memory,
        budgets={k: float(v) for k, v in budgets.items()},
        path=source,
        engines=tuple(dict.fromkeys(engines)),
        workers=workers,
    )


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by device name (see :func:`search_path`) or by the path of a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        devices = available_devices()
        if str(name_or_path) not in devices:
            raise ConfigError(
                f"no device profile {str(name_or_path)!r}; known: {', '.join(devices) or 'none'} "
                f"(looked in {', '.join(str(p) for p in search_path())})"
            )
        path = devices[str(name_or_path)]
    if not path.is_file():
        raise ConfigError(f"{path}: no such device profile")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_profile(path.stem, data, str(path))
