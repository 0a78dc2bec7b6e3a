"""The precisions a compressed model can deploy in: one registry for compress, the runtime and bench.

A precision's ``name`` is what ``--quantize`` takes and a manifest's step report says; its ``role``
is the key of its model in a bundle; its ``label`` is how reports name it. TF-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    role: str
    label: str
    # whether a pruned model can be stored in TFLite's sparse tensor encoding: LiteRT's XNNPACK
    # delegate fails to prepare dynamic-range convolutions stored that way ("failed to delegate CONV_2D")
    sparse_encoding: bool = True


#: Smallest first: the order the runtime falls back in when a bundle names no deployed model.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("int8", "tflite-int8", "full int8"),
        Precision("dynamic", "tflite-dynamic", "dynamic-range int8", sparse_encoding=False),
        Precision("float16", "tflite-float16", "float16"),
        Precision("float32", "tflite-float32", "float32"),
    )
}
#: What ``edgedx compress --quantize`` takes: a precision to convert to, ``auto`` (measure them all on a
#: device) or ``none`` (stay float32).
QUANTIZE_CHOICES = (*[name for name in PRECISIONS if name != "float32"], "auto", "none")
KERAS_ROLE = "keras"
_BY_ROLE = {p.role: p for p in PRECISIONS.values()}


def role_of(precision: str) -> str:
    return PRECISIONS[precision].role


def precision_of_role(role: str) -> Precision | None:
    """The precision of a bundle's TFLite model role, or None (the Keras model)."""
    return _BY_ROLE.get(role)


def deployed_role(roles: Iterable[str], deploy: str | None) -> str | None:
    """The model a bundle deploys: the one its manifest names, else its smallest TFLite model."""
    present = set(roles)
    return deploy or next((r for r in _BY_ROLE if r in present), None)


def report_order(roles: Iterable[str]) -> list[str]:
    """A bundle's models as reports list them: Keras, then TFLite from float32 down to int8."""
    present = set(roles)
    return [r for r in (KERAS_ROLE, *reversed(tuple(_BY_ROLE))) if r in present]


def precision_label(role: str, float_ops: int = 0) -> str:
    """How a report names a model's precision; int8 with ops kept in float is not full int8."""
    if role == PRECISIONS["int8"].role and float_ops:
        return f"int8, first {float_ops} op{'s' if float_ops > 1 else ''} float"
    if role == KERAS_ROLE:
        return "float32 (Keras)"
    precision = precision_of_role(role)
    return precision.label if precision else role
