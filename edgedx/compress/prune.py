"""Magnitude pruning with tensorflow-model-optimization: polynomial schedule or 2:4 structure."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

STRUCTURES = ("unstructured", "2:4")
DISTRIBUTIONS = ("uniform", "erk")


def erk_sparsities(kernel_shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities with the Erdos-Renyi-Kernel rule (Evci et al. 2020, "Rigging the Lottery").

    A layer's density is proportional to sum(shape) / prod(shape), scaled so the zeros make up
    ``sparsity`` of all the given weights: narrow layers (few weights, each carrying more of the
    signal) stay denser and wide ones are pruned harder. Layers the rule would make denser than
    dense are kept dense and the rest rescaled.
    """
    sizes = {name: int(np.prod(shape)) for name, shape in kernel_shapes.items()}
    scores = {name: sum(shape) / sizes[name] for name, shape in kernel_shapes.items()}
    budget = (1 - sparsity) * sum(sizes.values())  # non-zero weights to share out
    dense: set[str] = set()
    while True:
        rest = [n for n in sizes if n not in dense]
        scale = (budget - sum(sizes[n] for n in dense)) / sum(scores[n] * sizes[n] for n in rest)
        overfull = {n for n in rest if scale * scores[n] > 1}
        if not overfull:
            return {n: 0.0 if n in dense else 1 - scale * scores[n] for n in sizes}
        dense |= overfull


def prunable(model, *, sparsity: float, structure: str, steps: int, distribution: str = "erk"):
    """Wrap every prunable layer of ``model`` for magnitude pruning over ``steps`` training steps.

    Unstructured: sparsity rises from 0 to ``sparsity`` on a cubic polynomial schedule over the
    first two thirds of the steps, then holds, so the last third recovers accuracy at the target.
    ``2:4``: in every block of four weights two are zeroed (the layout sparse tensor cores and
    some CPUs accelerate); ``sparsity`` is then 0.5 by construction. ``distribution`` (unstructured
    only): ``uniform``, every pruned layer to ``sparsity``; ``erk``, per-layer targets from
    ``erk_sparsities`` that add up to ``sparsity`` over the pruned layers.

    The first convolution (it sees the raw windows through a handful of weights) and the logits
    layer stay dense: they hold well under 1% of the weights, and pruning them cost the most
    accuracy on the embedded head-CT set.

    Returns:
        (wrapped model, the callbacks that must run during training, first epoch at full sparsity
        expressed as a fraction of the steps).
    """
    import tensorflow_model_optimization as tfmot

    from .._tf import keras  # TF_USE_LEGACY_KERAS before tfmot touches Keras

    end_step = max(1, int(steps * 2 / 3))
    frequency = max(1, end_step // 20)
    sparsity_api = tfmot.sparsity.keras
    targets = layer_sparsities(model, sparsity=sparsity, structure=structure, distribution=distribution)

    def options(target: float) -> dict:
        if structure == "2:4":
            schedule = sparsity_api.ConstantSparsity(0.5, begin_step=0, frequency=frequency)
            return {"pruning_schedule": schedule, "sparsity_m_by_n": (2, 4)}
        schedule = sparsity_api.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step, frequency=frequency
        )
        return {"pruning_schedule": schedule}

    def wrap(layer):  # wrapping (or reusing) the layer object keeps its trained weights
        if targets.get(layer.name, 0) == 0:
            return layer
        return sparsity_api.prune_low_magnitude(layer, **options(targets[layer.name]))

    wrapped = keras.models.clone_model(model, clone_function=wrap)
    return wrapped, [sparsity_api.UpdatePruningStep()], end_step


def layer_sparsities(model, *, sparsity: float, structure: str = "unstructured", distribution: str = "erk"):
    """Each prunable layer's target sparsity, by layer name (see ``prunable`` for the rules)."""
    from .._tf import keras

    if structure not in STRUCTURES:
        raise ConfigError(f"unknown pruning structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    if not 0 < sparsity < 1:
        raise ConfigError(f"sparsity must be between 0 and 1, got {sparsity}")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown sparsity distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    weighted = [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]
    keep_dense = {weighted[0].name, weighted[-1].name} if len(weighted) > 2 else set()
    prunable_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    pruned = {
        layer.name: tuple(layer.kernel.shape)
        for layer in weighted
        if layer.name not in keep_dense and isinstance(layer, prunable_types)
    }
    if structure == "2:4":
        return dict.fromkeys(pruned, 0.5)
    if distribution == "uniform":
        return dict.fromkeys(pruned, sparsity)
    return erk_sparsities(pruned, sparsity)


def zero_smallest(model, targets: dict[str, float]) -> None:
    """Set the smallest-magnitude ``targets[name]`` of each named layer's kernel to zero, in place:
    the sparsity pattern pruning would reach, for sizing a model before it is trained."""
    for layer in model.layers:
        if targets.get(layer.name, 0) <= 0:
            continue
        kernel = layer.kernel.numpy()
        cut = np.quantile(np.abs(kernel), targets[layer.name])
        layer.kernel.assign(np.where(np.abs(kernel) <= cut, 0, kernel))


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
