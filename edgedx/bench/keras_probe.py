"""The Keras counterpart of :mod:`edgedx.runtime.probe`: the float Keras model, in TensorFlow.

Same options, limits and output as the runtime probe, so ``edgedx bench`` can set a TensorFlow
process beside the runtime-only one: single-image latency is a direct Keras call
(``model(x, training=False)``), the fastest way Keras runs one image.
"""

from __future__ import annotations

import time

import numpy as np

from ..runtime.probe import NpyRows, measure, probe_main


def probe_keras(bundle: str, role: str, inputs: NpyRows, *, threads: int, workers: int, runs: int, warmup: int) -> dict:
    """The Keras model, called by ``workers`` threads at once (one model: Keras calls are thread-safe)."""
    from .._tf import keras, tf
    from ..bundle import read_bundle
    from ..outputs import probabilities

    # one process-wide pool: as many threads as the device's workers have between them
    tf.config.threading.set_intra_op_parallelism_threads(threads * workers)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    began = time.perf_counter()
    b = read_bundle(bundle)
    model = keras.models.load_model(b.model_path(role), compile=False)
    load_seconds = time.perf_counter() - began
    activation, calibration = b.manifest.task.activation, b.calibration(role)

    def one(x: np.ndarray) -> np.ndarray:
        return probabilities(model(x, training=False).numpy(), activation, calibration)

    def every(x: np.ndarray) -> np.ndarray:
        return probabilities(model.predict(x, batch_size=64, verbose=0), activation, calibration)

    return measure([one] * workers, every, inputs, runs, warmup) | {"load_seconds": load_seconds, "backend": "tf_keras"}


if __name__ == "__main__":
    probe_main(probe_keras)
