"""Magnitude pruning with tensorflow-model-optimization: polynomial schedule or 2:4 structure."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

STRUCTURES = ("unstructured", "2:4")


def prunable(model, *, sparsity: float, structure: str, steps: int):
    """Wrap every prunable layer of ``model`` for magnitude pruning over ``steps`` training steps.

    Unstructured: sparsity rises from 0 to ``sparsity`` on a cubic polynomial schedule over the
    first two thirds of the steps, then holds, so the last third recovers accuracy at the target.
    ``2:4``: in every block of four weights two are zeroed (the layout sparse tensor cores and
    some CPUs accelerate); ``sparsity`` is then 0.5 by construction.

    The first convolution (it sees the raw windows through a handful of weights) and the logits
    layer stay dense: they hold well under 1% of the weights, and pruning them cost the most
    accuracy on the embedded head-CT set.

    Returns:
        (wrapped model, the callbacks that must run during training, first epoch at full sparsity
        expressed as a fraction of the steps).
    """
    import tensorflow_model_optimization as tfmot

    from .._tf import keras  # TF_USE_LEGACY_KERAS before tfmot touches Keras

    if structure not in STRUCTURES:
        raise ConfigError(f"unknown pruning structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    if not 0 < sparsity < 1:
        raise ConfigError(f"sparsity must be between 0 and 1, got {sparsity}")
    end_step = max(1, int(steps * 2 / 3))
    frequency = max(1, end_step // 20)
    sparsity_api = tfmot.sparsity.keras
    if structure == "2:4":
        schedule = sparsity_api.ConstantSparsity(0.5, begin_step=0, frequency=frequency)
        options = {"pruning_schedule": schedule, "sparsity_m_by_n": (2, 4)}
    else:
        schedule = sparsity_api.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=end_step, frequency=frequency
        )
        options = {"pruning_schedule": schedule}
    weighted = [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]
    keep_dense = {weighted[0].name, weighted[-1].name} if len(weighted) > 2 else set()

    prunable_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)

    def wrap(layer):  # wrapping (or reusing) the layer object keeps its trained weights
        if layer.name in keep_dense or not isinstance(layer, prunable_types):
            return layer
        return sparsity_api.prune_low_magnitude(layer, **options)

    wrapped = keras.models.clone_model(model, clone_function=wrap)
    return wrapped, [sparsity_api.UpdatePruningStep()], end_step


def strip(model):
    """Remove the pruning wrappers, leaving a plain model whose pruned weights are exact zeros."""
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(model)


def kernel_sparsity(model) -> float:
    """Fraction of zeros over the kernels of Conv2D, DepthwiseConv2D and Dense layers."""
    zeros = total = 0
    for weight in model.weights:
        name = weight.name
        if "kernel" in name and "quantize" not in name and len(weight.shape) > 1:
            values = np.asarray(weight.numpy())
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
    return zeros / total if total else 0.0
