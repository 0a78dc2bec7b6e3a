"""TFLite interpreter backends, declared by import path and loaded only when asked for.

``litert`` (the ``ai-edge-litert`` package) is the default; ``tflite-runtime`` is the fallback for
boxes where only that is installed. Its last release (2.14) fails with numpy 2, which is reported
as a clear :class:`BackendUnavailable` error rather than a ``SystemError``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .._quiet import native_logs_hidden
from ..errors import DependencyError

#: Backend label -> (module, class); tried in this order when no backend is named.
BACKENDS: dict[str, tuple[str, str]] = {
    "litert": ("ai_edge_litert.interpreter", "Interpreter"),
    "tflite-runtime": ("tflite_runtime.interpreter", "Interpreter"),
}
INSTALL_HINT = {"litert": "pip install ai-edge-litert", "tflite-runtime": "pip install tflite-runtime"}


class BackendUnavailable(DependencyError):
    """No usable TFLite interpreter is installed (or the named one is not)."""


@dataclass(frozen=True)
class Backend:
    """A TFLite interpreter factory: ``create(model_path, threads)`` returns an allocated interpreter."""

    name: str
    interpreter_class: Callable[..., Any]

    def create(self, model_path: str, threads: int | None) -> Any:
        try:
            with native_logs_hidden():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                interpreter = self.interpreter_class(model_path=model_path, num_threads=threads)
                interpreter.allocate_tensors()
        except SystemError as exc:  # tflite-runtime 2.14 built against numpy 1 fails this way on numpy 2
            raise BackendUnavailable(
                f"the {self.name} interpreter does not work with this numpy ({exc}); "
                f"install the maintained backend: {INSTALL_HINT['litert']}"
            ) from None
        except ValueError as exc:
            from ..errors import BundleError

            raise BundleError(f"{model_path}: not a TFLite model this interpreter can load ({exc})") from None
        return interpreter


def available_backends() -> list[str]:
    return [name for name, (module, _) in BACKENDS.items() if importlib.util.find_spec(module.split(".")[0])]


def import_installed(label: str, module: str) -> ModuleType | None:
    """An engine's module, or None when its package is not installed; one that fails to import is an error."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"the {label} backend is installed but fails to import ({exc})") from None


def load_backend(name: str | None = None) -> Backend:
    """The named backend, or the first installed one of :data:`BACKENDS`."""
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    for label in [name] if name else list(BACKENDS):
        module, attr = BACKENDS[label]
        imported = import_installed(label, module)
        if imported is not None:
            return Backend(label, getattr(imported, attr))
    wanted = [name] if name else list(BACKENDS)
    raise BackendUnavailable(
        "no TFLite interpreter found; install one: " + " or ".join(INSTALL_HINT[w] for w in wanted)
    )
