"""The formats a compressed model can deploy in: one registry for compress, the runtime and bench.

A deployable format is a precision on an engine: LiteRT (TFLite) in float32, float16, dynamic-range
int8 or full int8, or ONNX Runtime in float32. Its ``name`` is what ``--quantize`` takes and a
manifest's step report says; its ``role`` is the key of its model in a bundle; its ``label`` is how
reports name it. Which is fastest depends on the CPU: on AVX2 without AVX-512, ONNX Runtime's
float32 ran the head-CT student in 0.81x LiteRT float32's instructions; on a VNNI CPU LiteRT's
dynamic-range int8 ran it 2.9x faster than either float32 (benchmarks/README.md). TF-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple


class Engine(NamedTuple):
    suffix: str  # of its model files
    label: str  # how reports name it


ENGINES: dict[str, Engine] = {"tflite": Engine(".tflite", "LiteRT"), "onnx": Engine(".onnx", "ONNX Runtime")}


@dataclass(frozen=True)
class Precision:
    name: str
    role: str
    label: str
    # whether a pruned model can be stored in TFLite's sparse tensor encoding: LiteRT's XNNPACK
    # delegate fails to prepare dynamic-range convolutions stored that way ("failed to delegate CONV_2D")
    sparse_encoding: bool = True
    engine: str = "tflite"  # a key of ENGINES: the runtime that runs this format

    @property
    def suffix(self) -> str:
        """The file suffix of a model in this format."""
        return ENGINES[self.engine].suffix


#: LiteRT smallest first (the order the runtime falls back in when a bundle names no deployed
#: model), then ONNX Runtime.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("int8", "tflite-int8", "full int8"),
        Precision("dynamic", "tflite-dynamic", "dynamic-range int8", sparse_encoding=False),
        Precision("float16", "tflite-float16", "float16"),
        Precision("float32", "tflite-float32", "float32"),
        Precision("onnx-float32", "onnx-float32", "float32 (ONNX Runtime)", sparse_encoding=False, engine="onnx"),
    )
}
#: What ``edgedx compress --quantize`` takes: a format to convert to, ``auto`` (measure them all on a
#: device) or ``none`` (stay float32).
QUANTIZE_CHOICES = (*[name for name in PRECISIONS if name != "float32"], "auto", "none")
KERAS_ROLE = "keras"
_BY_ROLE = {p.role: p for p in PRECISIONS.values()}


def role_of(precision: str) -> str:
    return PRECISIONS[precision].role


def precision_of_role(role: str) -> Precision | None:
    """The deployable format of a bundle's model role, or None (the Keras model)."""
    return _BY_ROLE.get(role)


def deployed_role(roles: Iterable[str], deploy: str | None) -> str | None:
    """The model a bundle deploys: the one its manifest names, else its smallest TFLite model."""
    present = set(roles)
    return deploy or next((r for r in _BY_ROLE if r in present), None)


def report_order(roles: Iterable[str]) -> list[str]:
    """A bundle's models as reports list them: Keras, TFLite from float32 down to int8, then ONNX."""
    present = set(roles)
    tflite = [p.role for p in PRECISIONS.values() if p.engine == "tflite"]
    others = [p.role for p in PRECISIONS.values() if p.engine != "tflite"]
    return [r for r in (KERAS_ROLE, *reversed(tflite), *others) if r in present]


def precision_label(role: str, float_ops: int = 0) -> str:
    """How a report names a model's precision; int8 with ops kept in float is not full int8."""
    if role == PRECISIONS["int8"].role and float_ops:
        return f"int8, first {float_ops} op{'s' if float_ops > 1 else ''} float"
    if role == KERAS_ROLE:
        return "float32 (Keras)"
    precision = precision_of_role(role)
    return precision.label if precision else role
