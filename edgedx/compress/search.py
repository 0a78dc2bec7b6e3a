"""``--target-kb``: which student width and sparsity to train for a file-size budget, and the frontier plot.

A pruned int8 file's size follows from the network's shape and the share of zeros, not from
what the weights learned, so candidates are sized before any training: each width's kernels are
zeroed by magnitude to a trial sparsity and converted to int8 in the sparse encoding. Only the
few (width, sparsity) pairs that fit are then trained (``_pipeline``), and the most accurate on
validation data is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .distill import WIDTHS

#: Sparsities a candidate may be pruned to; 0 means not pruned.
SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
#: Candidates are sized to this share of the budget: a trained model's file came out up to 2.5%
#: larger than its untrained copy's, and int8 that keeps its first ops in float grows a little more.
SIZE_MARGIN = 0.96
#: Students wider than this share of the teacher's parameters are not candidates: no compression.
MAX_STUDENT_FRACTION = 0.5


@dataclass(frozen=True)
class SizedCandidate:
    """A student shape whose int8 file fits the budget (measured on an untrained copy)."""

    width: float
    sparsity: float
    parameters: int
    predicted_bytes: int


def sized_candidates(
    teacher, arch: str, num_classes: int, *, budget_bytes: int, calibration: np.ndarray
) -> list[SizedCandidate]:
    """For each width of ``arch`` (widest first) the least sparsity in ``SPARSITIES`` whose int8 file fits.

    Stops at the first width that fits dense: narrower ones would only lose capacity.
    """
    from .._tf import keras
    from ..models import count_parameters, create_model
    from .prune import layer_sparsities, zero_smallest
    from .quantize import convert

    shape = tuple(teacher.input_shape[1:])
    teacher_parameters = count_parameters(teacher)[0]
    found = []
    for width in WIDTHS:
        student = create_model(arch, shape, num_classes, width=width)
        parameters = count_parameters(student)[0]
        if parameters > teacher_parameters * MAX_STUDENT_FRACTION:
            continue
        # distinct values everywhere: the converter shares identical constants (an untrained
        # model's zero biases), which made untrained copies 7% smaller than trained ones
        rng = np.random.default_rng(0)
        student.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in student.get_weights()])
        for sparsity in SPARSITIES:
            trial = keras.models.clone_model(student)
            trial.set_weights(student.get_weights())
            if sparsity:
                zero_smallest(trial, layer_sparsities(trial, sparsity=sparsity))
            size = len(convert(trial, "int8", calibration, sparse=sparsity > 0).content)
            if size <= budget_bytes * SIZE_MARGIN:
                found.append(SizedCandidate(width, sparsity, parameters, size))
                break
        if found and found[-1].width == width and found[-1].sparsity == 0:
            break
    return found


def spread(candidates: Sequence[SizedCandidate], count: int) -> list[SizedCandidate]:
    """``count`` candidates evenly spaced from the widest (sparsest) to the narrowest (densest)."""
    if count < 1:
        raise ConfigError(f"the search needs at least one candidate, got {count}")
    if len(candidates) <= count:
        return list(candidates)
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, count)).astype(int))
    return [candidates[i] for i in picks]


def plot_frontier(
    rows: Sequence[dict[str, Any]], *, target_kb: float, parent_val_auc: float, chosen: int | None, path: Path
) -> Path:
    """Validation AUC against int8 file size for every trained candidate, with the budget and the parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    kb = [r["bytes"] / 1024 for r in rows]
    auc = [r["val_auc"] for r in rows]
    ax.plot(kb, auc, "o", color="tab:blue", label="candidates (validation)")
    for r, x, y in zip(rows, kb, auc, strict=True):
        ax.annotate(f"w{r['width']:g} s{r['sparsity']:.0%}", (x, y), textcoords="offset points", xytext=(4, 4))
    if chosen is not None:
        ax.plot([kb[chosen]], [auc[chosen]], "o", ms=12, mfc="none", color="tab:red", label="chosen")
    ax.axvline(target_kb, color="grey", ls="--", label=f"budget {target_kb:g} KB")
    ax.axhline(parent_val_auc, color="black", ls=":", label="parent (validation)")
    ax.set_xlabel("int8 TFLite file (KB)")
    ax.set_ylabel("validation AUC")
    ax.set_title("most accurate student under the size budget")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
