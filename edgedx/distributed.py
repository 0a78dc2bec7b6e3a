"""Multi-worker training on TensorFlow's own engine, configured the way cluster schedulers do it.

Kubeflow's TFJob and the cloud trainers start one process per worker with ``TF_CONFIG`` set:
``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}``. With two
or more workers, ``edgedx train`` builds its model, and ``edgedx compress`` its students, under
``tf.distribute.MultiWorkerMirroredStrategy`` (synchronous data parallelism: each worker takes its
share of every batch, gradients are summed by all-reduce), and only the chief (worker 0, or a task
of type ``chief``) writes the bundle.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

TF_CONFIG = "TF_CONFIG"


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker job."""

    workers: int  # processes that train (a chief counts as one)
    task: str  # "worker" or "chief"
    index: int
    has_chief_task: bool = False  # without one, worker 0 is the chief

    @property
    def chief(self) -> bool:
        return self.task == "chief" or (self.index == 0 and not self.has_chief_task)


def cluster_from_env(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster ``TF_CONFIG`` describes, or None when it is unset or names a single worker."""
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        jobs = config["cluster"]
        task = config["task"]
        kind, index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{TF_CONFIG} is not a cluster description ({exc}): {text[:200]}") from None
    chiefs, workers = len(jobs.get("chief", [])), len(jobs.get("worker", []))
    if kind not in ("chief", "worker"):
        raise ConfigError(f"{TF_CONFIG}: edgedx trains as a 'chief' or 'worker' task, not {kind!r}")
    if chiefs + workers < 2:
        return None
    return Cluster(workers=chiefs + workers, task=kind, index=index, has_chief_task=chiefs > 0)


def strategy(cluster: Cluster | None):
    """MultiWorkerMirroredStrategy for a cluster, else TensorFlow's default (no distribution).

    Must run before TensorFlow creates any tensor in this process.
    """
    from ._tf import tf

    if cluster is None:
        return tf.distribute.get_strategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def local_model(model):
    """A plain copy of a model trained under the strategy: the same weights, no distributed variables.

    Every worker has to call this at the same point. Reading a batch-normalisation statistic of a
    model trained under ``MultiWorkerMirroredStrategy`` is an all-reduce over the workers, so
    anything the chief alone does with that model (count its parameters, save it) would wait on a
    collective the others never join. ``get_weights`` here is the one read, made by all; the copy,
    made outside the strategy's scope, reads locally ever after.
    """
    from ._tf import keras, tf

    if not isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return model
    weights = model.get_weights()
    local = keras.models.clone_model(model)
    local.set_weights(weights)
    return local


def mirrored_copy(strategy, model):
    """A copy of ``model`` whose variables ``strategy`` mirrors on every worker (the inverse of
    :func:`local_model`); ``model`` itself when there is no cluster.

    Every worker has to call this at the same point: creating a mirrored variable broadcasts
    worker 0's value to the others.
    """
    from ._tf import keras, tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return model
    with strategy.scope():
        copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def barrier(strategy) -> None:
    """Return once every worker has called this (an all-reduce of one number); no-op on one machine.

    Training ends with the chief still at work (calibration, the guard, writing the bundle). A
    worker that exits meanwhile stops sending heartbeats, and the chief's coordination service then
    fails the whole job (tensorflow/tensorflow#58434), so every worker waits here for the chief.
    """
    from ._tf import tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def local_addresses(count: int) -> list[str]:
    """``count`` free ``localhost:port`` addresses: a cluster on one machine (tests, benchmarks, a first try)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [f"localhost:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
