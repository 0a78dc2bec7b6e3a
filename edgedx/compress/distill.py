"""Knowledge distillation (Hinton et al. 2015) from a trained teacher to a smaller student.

loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

A binary model's single logit z is treated as the two logits (0, z), whose softmax is the sigmoid,
so one loss serves binary and multi-class heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..models import count_parameters, create_model

#: Width multipliers tried, widest first, when the student's width is not given. 0.375 gives
#: resnet-small 12/24/48 channels, whose training step took 327 ms a batch against 486 ms for
#: 0.35's 11/22/44 on this CPU (benchmarks/README.md).
WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.35, 0.25, 0.2, 0.15, 0.125, 0.1, 0.075, 0.05)
#: A default student deploys at most this fraction of the teacher's parameters (non-zero, when pruned).
STUDENT_FRACTION = 1 / 8


def choose_student(
    teacher,
    arch: str,
    num_classes: int,
    *,
    width: float | None = None,
    deployed_parameters: Callable[[Any], int] | None = None,
):
    """The widest ``arch`` student that deploys at most ``STUDENT_FRACTION`` of the teacher's parameters.

    Args:
        width: Use this width instead of searching.
        deployed_parameters: How many parameters a student will deploy (the non-zero ones when it
            is to be pruned); default: all of them.

    Returns:
        (student model, the width used).
    """
    shape = tuple(teacher.input_shape[1:])
    budget = count_parameters(teacher)[0] * STUDENT_FRACTION
    if width is not None:
        return create_model(arch, shape, num_classes, width=width), width
    deployed = deployed_parameters or (lambda model: count_parameters(model)[0])
    for candidate in WIDTHS:
        student = create_model(arch, shape, num_classes, width=candidate)
        if deployed(student) <= budget:
            return student, candidate
    raise ConfigError(
        f"no width of {arch!r} deploys at most {STUDENT_FRACTION:.3g} of the teacher's parameters ({int(budget):,}); "
        "give --student with a smaller architecture or --width"
    )


def distiller(teacher, student, *, temperature: float, alpha: float, mixup: float = 0.0):
    """A Keras model that trains ``student`` against labels and ``teacher``; predicts with the student.

    With ``mixup`` > 0 every batch is doubled by mixed pairs of its own images (weights drawn from
    Beta(mixup, mixup)) that only the teacher labels: "function matching" (Beyer et al. 2022,
    "Knowledge distillation: A good teacher is patient and consistent"). The student then learns
    the teacher's function between the training images as well as on them, which a small data set
    leaves it little of otherwise. The teacher always sees exactly the (augmented) input the
    student sees.
    """
    from .._tf import keras, tf

    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if mixup < 0:
        raise ConfigError(f"mixup must be >= 0 (0: off), got {mixup}")
    teacher.trainable = False

    def as_two_class(logits):
        return tf.concat([tf.zeros_like(logits), logits], axis=-1) if logits.shape[-1] == 1 else logits

    def with_mixed_pairs(x):
        if not mixup:
            return x
        n = tf.shape(x)[0]
        a, b = tf.random.gamma([n, 1, 1, 1], mixup), tf.random.gamma([n, 1, 1, 1], mixup)
        weight = a / (a + b)  # Beta(mixup, mixup)
        partner = tf.gather(x, tf.random.shuffle(tf.range(n)))
        return tf.concat([x, weight * x + (1 - weight) * partner], axis=0)

    class Distiller(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.student = student
            self.teacher = teacher

        def call(self, x, training=False):
            return self.student(x, training=training)

        def train_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            n = tf.shape(x)[0]
            inputs = with_mixed_pairs(x)
            soft_targets = tf.nn.softmax(as_two_class(self.teacher(inputs, training=False)) / temperature)
            weights = tf.ones([n]) if sample_weight is None else tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
            with tf.GradientTape() as tape:
                logits = as_two_class(self.student(inputs, training=True))
                labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
                hard = keras.losses.sparse_categorical_crossentropy(labels, logits[:n], from_logits=True)
                soft = keras.losses.kl_divergence(soft_targets, tf.nn.softmax(logits / temperature))
                # mixed images have no label and no class weight: the teacher alone speaks for them
                soft_weights = tf.concat([weights, tf.ones([tf.shape(inputs)[0] - n])], axis=0)
                loss = alpha * tf.reduce_mean(hard * weights) + (1 - alpha) * temperature**2 * tf.reduce_mean(
                    soft * soft_weights
                )
            grads = tape.gradient(loss, self.student.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.student.trainable_variables, strict=True))
            return {"loss": loss}

    return Distiller()
