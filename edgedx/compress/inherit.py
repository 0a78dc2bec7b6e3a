"""Start a narrower student from its teacher's most active channels instead of random weights.

A student of the teacher's architecture at a smaller width has the same layers with fewer
channels. Channels that residual additions join (and those that batch norm, activations, pooling
and depthwise convolutions pass through) must be chosen together, so the teacher's graph is first
split into *channel spaces*: a convolution or dense layer opens a new one; an addition merges its
inputs'. In every space the channels kept are those with the largest mean absolute activation on
sample inputs (each tensor's figures scaled to its own mean, then summed over the space's
tensors), and every weight is sliced to them. This is width pruning before distillation, as in
Minitron (Sreenivas et al. 2024, "LLM pruning and distillation in practice"): the student starts
from the teacher's features rather than from noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

#: Sample inputs are pushed through the teacher this many at a time.
BATCH = 32


class NotInheritable(Exception):
    """The student is not the teacher's architecture at another width; its message says where."""


class _Spaces:
    """Union-find over layers' output channel spaces."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent[name] = name

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, name: str, others: Iterable[str]) -> None:
        self.parent[name] = name
        for other in others:
            self.parent[self.find(other)] = name


def _inbound(layer) -> list[str]:
    from .._tf import tf

    return [t._keras_history.layer.name for t in tf.nest.flatten(layer.input)]


def _channel_spaces(model) -> tuple[_Spaces, dict[str, str]]:
    """Each layer's output space, and each convolution's or dense layer's input space (by layer name)."""
    from .._tf import keras

    layers = keras.layers
    passing = (
        layers.BatchNormalization,
        layers.ReLU,
        layers.Activation,
        layers.Dropout,
        layers.MaxPooling2D,
        layers.AveragePooling2D,
        layers.GlobalAveragePooling2D,
        layers.GlobalMaxPooling2D,
        layers.ZeroPadding2D,
        layers.Add,
        layers.DepthwiseConv2D,
    )
    spaces, inputs_of = _Spaces(), {}
    for layer in model.layers:
        if isinstance(layer, layers.InputLayer):
            spaces.add(layer.name)
        elif isinstance(layer, passing):
            spaces.join(layer.name, _inbound(layer))
        elif isinstance(layer, (layers.Conv2D, layers.Dense)) and not isinstance(layer, layers.Conv2DTranspose):
            # a transposed convolution subclasses Conv2D but stores its kernel (h, w, out, in)
            (source,) = _inbound(layer)
            inputs_of[layer.name] = source
            spaces.add(layer.name)
        else:
            raise NotInheritable(f"{type(layer).__name__} layers are not supported")
    return spaces, inputs_of


def _mean_activations(model, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, the mean absolute value of each output channel over ``inputs``."""
    from .._tf import keras, tf

    probed = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    reduced = [tf.reduce_mean(tf.abs(layer.output), axis=list(range(len(layer.output.shape) - 1))) for layer in probed]
    probe = keras.Model(model.inputs, reduced)
    totals = [np.zeros(int(layer.output.shape[-1])) for layer in probed]
    for start in range(0, len(inputs), BATCH):
        batch = np.asarray(inputs[start : start + BATCH], dtype=np.float32)
        for total, value in zip(totals, probe(batch, training=False), strict=True):
            total += np.asarray(value) * len(batch)
    return {layer.name: total / len(inputs) for layer, total in zip(probed, totals, strict=True)}


def _kept_channels(teacher, student, spaces: _Spaces, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel space (its root's name), the sorted indices of the teacher's channels kept."""
    wanted: dict[str, int] = {}
    for t_layer, s_layer in zip(teacher.layers, student.layers, strict=True):
        root, width = spaces.find(t_layer.name), int(s_layer.output.shape[-1])
        if wanted.setdefault(root, width) != width or width > int(t_layer.output.shape[-1]):
            raise NotInheritable(f"the student's {s_layer.name} has {width} channels; its space needs {wanted[root]}")
    importance: dict[str, np.ndarray] = {}
    for name, activity in _mean_activations(teacher, inputs).items():
        root = spaces.find(name)
        importance[root] = importance.get(root, 0) + activity / (activity.mean() + 1e-12)
    kept = {}
    for root, width in wanted.items():
        score = importance.get(root)
        every = int(teacher.get_layer(root).output.shape[-1])
        kept[root] = np.arange(every) if score is None or width == every else np.sort(np.argsort(-score)[:width])
    return kept


def _sliced(layer, weights: list[np.ndarray], out_idx: np.ndarray, in_idx: np.ndarray | None) -> Iterator[np.ndarray]:
    from .._tf import keras

    layers = keras.layers
    if isinstance(layer, layers.DepthwiseConv2D):
        kernel, *bias = weights
        if kernel.shape[-1] != 1:
            raise NotInheritable("depthwise convolutions with a depth multiplier are not supported")
        yield kernel[:, :, out_idx, :]
        yield from (b[out_idx] for b in bias)
    elif isinstance(layer, (layers.Conv2D, layers.Dense)):
        kernel, *bias = weights
        yield np.take(np.take(kernel, in_idx, axis=-2), out_idx, axis=-1)
        yield from (b[out_idx] for b in bias)
    else:  # batch norm: every weight is one value per channel
        yield from (w[out_idx] for w in weights)


def inherit_channels(teacher, student, inputs: np.ndarray) -> None:
    """Set ``student``'s weights to the teacher's on its most active channels (see the module docstring).

    Args:
        teacher: The trained Keras model.
        student: The same architecture at a smaller width, freshly built.
        inputs: Sample model inputs (a few hundred training images) to rank channels on.

    Raises:
        NotInheritable: the student is not the teacher's architecture at another width (other
            layers, or layers this does not know how to slice); the student is left untouched.
    """
    if len(teacher.layers) != len(student.layers):
        raise NotInheritable("different layer counts")
    for t_layer, s_layer in zip(teacher.layers, student.layers, strict=True):
        if type(t_layer) is not type(s_layer):
            kinds = type(t_layer).__name__, type(s_layer).__name__
            raise NotInheritable(f"the teacher's {t_layer.name} is a {kinds[0]}, the student's a {kinds[1]}")
    spaces, inputs_of = _channel_spaces(teacher)
    kept = _kept_channels(teacher, student, spaces, inputs)
    updates = []
    for t_layer, s_layer in zip(teacher.layers, student.layers, strict=True):
        if not t_layer.weights:
            continue
        source = inputs_of.get(t_layer.name)
        in_idx = kept[spaces.find(source)] if source else None
        new = list(_sliced(t_layer, t_layer.get_weights(), kept[spaces.find(t_layer.name)], in_idx))
        if [w.shape for w in new] != [tuple(w.shape) for w in s_layer.weights]:
            raise NotInheritable(f"the teacher's sliced weights do not fit the student's {s_layer.name}")
        updates.append((s_layer, new))
    for layer, weights in updates:
        layer.set_weights(weights)
