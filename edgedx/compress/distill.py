"""Knowledge distillation (Hinton et al. 2015) from a trained teacher to a smaller student.

loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

A binary model's single logit z is treated as the two logits (0, z), whose softmax is the sigmoid,
so one loss serves binary and multi-class heads.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..models import count_parameters, create_model

#: Width multipliers tried, widest first, when the student's width is not given.
WIDTHS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.2, 0.15, 0.125, 0.1, 0.075, 0.05)


def choose_student(teacher, arch: str, num_classes: int, *, max_fraction: float = 1 / 8, width: float | None = None):
    """The widest ``arch`` student with at most ``max_fraction`` of the teacher's parameters.

    Returns:
        (student model, the width used).
    """
    shape = tuple(teacher.input_shape[1:])
    budget = count_parameters(teacher)[0] * max_fraction
    if width is not None:
        return create_model(arch, shape, num_classes, width=width), width
    for candidate in WIDTHS:
        student = create_model(arch, shape, num_classes, width=candidate)
        if count_parameters(student)[0] <= budget:
            return student, candidate
    raise ConfigError(
        f"no width of {arch!r} fits in {max_fraction:.3g} of the teacher's parameters ({int(budget):,}); "
        "give --student with a smaller architecture or --width"
    )


def distiller(teacher, student, *, temperature: float, alpha: float):
    """A Keras model that trains ``student`` against labels and ``teacher``; predicts with the student."""
    from .._tf import keras, tf

    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    teacher.trainable = False

    def as_two_class(logits):
        return tf.concat([tf.zeros_like(logits), logits], axis=-1) if logits.shape[-1] == 1 else logits

    class Distiller(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.student = student
            self.teacher = teacher

        def call(self, x, training=False):
            return self.student(x, training=training)

        def train_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            soft_targets = tf.nn.softmax(as_two_class(self.teacher(x, training=False)) / temperature)
            with tf.GradientTape() as tape:
                logits = as_two_class(self.student(x, training=True))
                labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
                hard = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                soft = keras.losses.kl_divergence(soft_targets, tf.nn.softmax(logits / temperature))
                per_case = alpha * hard + (1 - alpha) * temperature**2 * soft
                if sample_weight is not None:
                    per_case = per_case * tf.reshape(tf.cast(sample_weight, per_case.dtype), [-1])
                loss = tf.reduce_mean(per_case)
            grads = tape.gradient(loss, self.student.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.student.trainable_variables, strict=True))
            return {"loss": loss}

    return Distiller()
