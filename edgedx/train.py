"""Float training (TensorFlow side): dataset -> tf_keras model -> model bundle.

Inputs are made by :func:`edgedx.preprocess.scale_and_resize` and normalised with statistics of
the training split, so the runtime replays them exactly from the bundle's spec. Augmentation
(flip, rotation, shift) happens after that, on training batches only.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as clinical
from .bundle import (
    ArchRecord,
    Bundle,
    InputRecord,
    Manifest,
    ModelRecord,
    TaskRecord,
    ThresholdRecord,
    TrainingRecord,
    read_bundle,
    write_bundle,
)
from .calibration import Calibration, fit_to_labels
from .data import Augmentation, CachedInputs, Dataset, cache_split, input_batches
from .errors import ConfigError, DataError
from .guard import GUARD_FILE, Scope, fit_guard, flag_rate
from .outputs import probabilities
from .preprocess import PreprocessSpec, channel_statistics, parse_windows

#: ``progress(stage, done, total)``: long steps report through this (the CLI draws progress bars).
ProgressFn = Callable[[str, int, int], None]
#: ``on_epoch(epoch, logs)``: called after each epoch with its loss, validation AUC and time.
EpochFn = Callable[[int, dict[str, float]], None]

THRESHOLD_POLICIES = ("youden", "sensitivity")
#: Cache shards (16 MB each) whose examples are shuffled together: 64 MB, the embedded default's
#: whole training split; a bigger data set takes no more memory.
POOLED_SHARDS = 4
#: Validation AUCs closer than this are a tie for early stopping.
AUC_TIE = 1e-4
SYNTHETIC_ONLY = (
    "Trained on synthetic head-CT data only (edgedx data synth): it has never seen a real scan, and its "
    "results on real scans mean nothing until it is fine-tuned and validated on them."
)
INTENDED_USE = (
    "Research and engineering evaluation of on-device inference. Not a medical device; "
    "not for diagnosis or clinical decisions."
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How ``edgedx train`` trains; every field has a command-line option of the same name."""

    arch: str = "resnet-small"
    width: float | None = None
    input_size: int | None = None  # None: the dataset's own default
    windows: tuple[str, ...] = ("brain", "subdural", "bone")
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 8
    seed: int = 0
    augment: bool = True
    threshold_policy: str = "youden"
    target_sensitivity: float | None = None
    freeze_layers: int = 0  # with an initial bundle: keep its first N layers as they are

    def __post_init__(self) -> None:
        if self.freeze_layers < 0:
            raise ConfigError(f"freeze layers must be >= 0, got {self.freeze_layers}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"learning rate must be in (0, 1), got {self.learning_rate}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1 epoch, got {self.patience}")
        if self.threshold_policy not in THRESHOLD_POLICIES:
            raise ConfigError(
                f"threshold policy must be one of {', '.join(THRESHOLD_POLICIES)}, got {self.threshold_policy!r}"
            )
        if self.threshold_policy == "sensitivity" and not (self.target_sensitivity or 0) > 0:
            raise ConfigError("the 'sensitivity' threshold policy needs a target sensitivity, e.g. 0.95")
        parse_windows(self.windows)


@dataclass(frozen=True)
class TrainResult:
    bundle: Bundle | None  # None on a worker of a multi-worker job that is not the chief
    metrics: dict[str, dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class PreparedData:
    """A dataset's normalised model inputs, read from the preprocessed cache, with the spec that made them."""

    spec: PreprocessSpec
    x: dict[str, CachedInputs]
    y: dict[str, np.ndarray]
    fingerprints: dict[str, str]


def prepare_data(dataset: Dataset, spec: PreprocessSpec, progress: ProgressFn | None = None) -> PreparedData:
    """Every split scaled with ``spec`` into the preprocessed cache (or found there), normalised on read.

    A spec without normalisation statistics gets them from the training split (training); a spec
    that has them (a bundle's, when compressing) is used as it is, so inputs match the parent model.
    """
    if spec.input != dataset.input:
        raise ConfigError(f"{dataset.source} holds {dataset.input!r} images; the preprocessing expects {spec.input!r}")
    cached = {}
    for name in dataset.splits:
        report = (lambda done, total, n=name: progress(f"preprocess {n}", done, total)) if progress else None
        cached[name] = cache_split(dataset, name, spec, progress=report)
    if not spec.mean:
        spec = spec.with_normalization(*channel_statistics(cached["train"].inputs.shards()))
    return PreparedData(
        spec=spec,
        x={n: c.inputs.normalised(spec.mean, spec.std) for n, c in cached.items()},
        y={n: c.y for n, c in cached.items()},
        fingerprints={n: c.fingerprint for n, c in cached.items()},
    )


def training_spec(dataset: Dataset, size: int, windows: tuple[str, ...]) -> PreprocessSpec:
    """The preprocessing a new model on ``dataset`` uses (normalisation is fitted later)."""
    return PreprocessSpec(
        size=size, input=dataset.input, windows=parse_windows(windows) if dataset.input == "hu" else ()
    )


def predict_logits(model, x: np.ndarray | CachedInputs, batch_size: int = 256) -> np.ndarray:
    """Raw outputs of a Keras model, (N, outputs), computed batch by batch (inputs may be on disk).

    A model trained by several workers is called on this worker alone: its ``predict`` would
    shard the inputs over the workers, and every worker needs every output (each chooses the same
    best epoch from the same validation AUC).
    """
    from ._tf import tf

    alone = isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy)
    outputs = [
        np.asarray(model(batch, training=False) if alone else model.predict_on_batch(batch), np.float64)
        for batch in input_batches(x, batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.empty((0, model.output_shape[-1]))


def predict_scores(
    model, x: np.ndarray | CachedInputs, activation: str, batch_size: int = 256, calibration: Calibration | None = None
) -> np.ndarray:
    """Probabilities from a Keras model: (N,) positive class for binary, (N, K) otherwise."""
    return probabilities(predict_logits(model, x, batch_size), activation, calibration)


def _shuffled_batches(tf, x: CachedInputs, targets: np.ndarray, batch_size: int, seed: int):
    """Training batches, every example once per epoch, read from the cache :data:`POOLED_SHARDS`
    shards at a time: the shards in a new order each epoch, each pool's examples permuted.

    Memory holds one pool, whatever the split's size (the embedded default's training split is one
    pool, so it is shuffled whole). Shuffling in numpy, not in a ``tf.data`` shuffle buffer, is on
    purpose: buffered elements are slices that keep their whole shard alive, which made memory grow
    with the number of shards.
    """
    bounds = np.cumsum((0, *x.shard_sizes))
    epochs = itertools.count()

    def batches():
        rng = np.random.default_rng([seed, next(epochs)])
        order = rng.permutation(len(x.shard_sizes))
        left_x, left_y = np.empty((0, *x.image_shape), np.float32), targets[:0]
        for first in range(0, len(order), POOLED_SHARDS):
            pool = order[first : first + POOLED_SHARDS]
            images = np.concatenate([left_x, *(x.shard(i) for i in pool)])
            labels = np.concatenate([left_y, *(targets[bounds[i] : bounds[i + 1]] for i in pool)])
            mixed = rng.permutation(len(images))
            whole = len(mixed) - len(mixed) % batch_size
            for start in range(0, whole, batch_size):
                yield images[mixed[start : start + batch_size]], labels[mixed[start : start + batch_size]]
            left_x, left_y = images[mixed[whole:]], labels[mixed[whole:]]
        if len(left_x):
            yield left_x, left_y

    signature = (
        tf.TensorSpec((None, *x.image_shape), tf.float32),
        tf.TensorSpec((None, *targets.shape[1:]), tf.as_dtype(targets.dtype)),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=signature)


def _augmenter(keras, augmentation: Augmentation):
    """Flip, rotate up to 9 degrees, shift up to 8%, zoom up to 10%, as far as ``augmentation``
    allows; None if it allows nothing. Zoom stands in for the spread of patient and organ sizes
    between hospitals and patients."""
    layers = [keras.layers.RandomFlip("horizontal")] if augmentation.hflip else []
    if augmentation.geometric:
        layers += [
            keras.layers.RandomRotation(0.025, fill_mode="nearest"),
            keras.layers.RandomTranslation(0.08, 0.08, fill_mode="nearest"),
            keras.layers.RandomZoom(0.1, fill_mode="nearest"),
        ]
    return keras.Sequential(layers, name="augment") if layers else None


def fit(
    model,
    data: PreparedData,
    config: TrainConfig,
    *,
    activation: str,
    augmentation: Augmentation,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    loss=None,
    callbacks: list | None = None,
    select_from_epoch: int = 1,
) -> list[dict[str, float]]:
    """Train ``model`` in place with early stopping on validation AUC; restores the best epoch.

    Args:
        loss: Replaces the default cross-entropy (distillation passes its own).
        callbacks: More Keras callbacks (pruning passes its step updater).
        select_from_epoch: Epochs before this one are neither kept as best nor count towards
            early stopping (pruning: the weights are not at their final sparsity yet).

    Returns:
        One dict per epoch run: ``epoch``, ``loss``, ``val_auc``, ``seconds``.
    """
    from ._tf import keras, tf

    x, y = data.x["train"], data.y["train"]
    if y.ndim == 2:  # multi-label: Keras weighs classes of one output only
        class_weight, targets = None, y.astype(np.float32)
    else:
        counts = np.bincount(y, minlength=2)
        class_weight = {c: len(y) / (len(counts) * n) for c, n in enumerate(counts) if n}
        targets = y.astype(np.float32)[:, None] if activation == "sigmoid" else y
    # the global batch: several workers split each one
    ds = _shuffled_batches(tf, x, targets, config.batch_size, config.seed)
    shard = tf.data.Options()
    shard.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(shard)
    augment = _augmenter(keras, augmentation) if config.augment else None
    if augment is not None:
        ds = ds.map(lambda a, b: (augment(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    steps = int(np.ceil(len(x) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps * config.epochs)
    if loss is None:
        loss = (
            keras.losses.BinaryCrossentropy(from_logits=True)
            if activation == "sigmoid"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss)
    monitor = _ValidationAUC(keras, data, config, activation, steps, progress, on_epoch, select_from_epoch)
    # One iterator for the whole run (each pass is one epoch): under MultiWorkerMirroredStrategy
    # making a new one every epoch cost about 20 s of idle workers per epoch (benchmarks/README.md).
    # Repeated exactly ``epochs`` times, not forever: tearing down an endless pipeline with batches
    # still in flight took 7-20 s at the end of every fit.
    model.fit(
        ds.repeat(config.epochs),
        steps_per_epoch=steps,
        epochs=config.epochs,
        verbose=0,
        class_weight=class_weight,
        callbacks=[*(callbacks or []), monitor],
    )
    if monitor.best_weights is not None:
        model.set_weights(monitor.best_weights)
    return monitor.history


def _ValidationAUC(
    keras,
    data: PreparedData,
    config: TrainConfig,
    activation: str,
    steps: int,
    progress: ProgressFn | None,
    on_epoch: EpochFn | None,
    select_from_epoch: int,
):
    """A Keras callback (built lazily: keras is imported only on the TF side)."""

    class ValidationAUC(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best_auc, self.best_weights, self.stale = -np.inf, None, 0
            # Patience runs only once validation AUC has left chance: the head-CT teacher sits at
            # chance for its first 4-13 epochs, and a lucky epoch there once ended a run at
            # epoch 10 with test AUC 0.639 (benchmarks/README.md).
            self.chance_bound, self.left_chance = clinical.chance_auc_bound(data.y["val"]), False
            self.history: list[dict[str, float]] = []
            self.epoch_start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if progress:
                progress(f"epoch {len(self.history) + 1}/{config.epochs}", batch + 1, steps)

        def on_epoch_end(self, epoch, logs=None):
            scores = predict_scores(self.model, data.x["val"], activation)
            auc = clinical.auc(data.y["val"], scores)
            row = {
                "epoch": epoch + 1,
                "loss": float((logs or {}).get("loss", np.nan)),
                "val_auc": auc,
                "seconds": time.perf_counter() - self.epoch_start,
            }
            self.history.append(row)
            if on_epoch:
                on_epoch(epoch + 1, row)
            self.left_chance = self.left_chance or auc > self.chance_bound
            if epoch + 1 < select_from_epoch:
                return
            if auc > self.best_auc + AUC_TIE or self.best_weights is None:
                self.best_auc, self.best_weights, self.stale = auc, self.model.get_weights(), 0
            elif auc >= self.best_auc - AUC_TIE:
                # a tie on a saturated validation AUC: keep the later weights (lower learning rate)
                self.best_weights = self.model.get_weights()
            elif self.left_chance:
                self.stale += 1
                if self.stale >= config.patience:
                    self.model.stop_training = True

    return ValidationAUC()


def evaluate_model(
    model,
    data: PreparedData,
    activation: str,
    config: TrainConfig,
    calibration: Calibration | None = None,
    label_names: list[str] | None = None,
) -> tuple[float | list[float] | None, dict[str, dict[str, Any]]]:
    """Choose the threshold (one per label for multi-label) on (calibrated) validation scores, then
    measure validation and test metrics."""
    scores = {s: predict_scores(model, data.x[s], activation, calibration=calibration) for s in ("val", "test")}
    threshold: float | list[float] | None = None
    choose = partial(
        clinical.choose_threshold, policy=config.threshold_policy, target_sensitivity=config.target_sensitivity
    )
    y_val = data.y["val"]
    if y_val.ndim == 2:  # a label with no positive (or no negative) validation case keeps 0.5
        threshold = [
            choose(y_val[:, i], scores["val"][:, i]) if np.unique(y_val[:, i]).size == 2 else 0.5
            for i in range(y_val.shape[1])
        ]
    elif activation == "sigmoid":
        threshold = choose(y_val, scores["val"])
    return threshold, {
        s: clinical.evaluate(data.y[s], scores[s], threshold, seed=config.seed, label_names=label_names) for s in scores
    }


def train(
    dataset: Dataset,
    out: Path | str,
    config: TrainConfig = TrainConfig(),
    *,
    init: Path | str | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a float model on ``dataset`` and write it as a bundle at ``out``.

    Besides the model, the bundle gets its calibration (Platt or temperature scaling on validation
    logits), the threshold on calibrated validation scores, and the out-of-distribution guard.

    Args:
        dataset: Labelled images with train/val/test splits (see :func:`edgedx.data.load_dataset`).
        out: Bundle folder to create.
        config: Architecture, input size, windows, epochs and the threshold policy.
        init: A trained bundle to fine-tune from (a site adapting a shipped model to its own data):
            its architecture, weights and preprocessing are kept; the manifest records its hash.
        progress: Progress callback for preprocessing and training batches.
        on_epoch: Called after every epoch with its figures.
        overwrite: Replace an existing bundle at ``out``.

    Returns:
        The bundle, its validation and test metrics and the wall time.
    """
    from . import distributed
    from ._tf import keras, tf
    from .models import count_macs, count_parameters

    out = Path(out)
    cluster = distributed.cluster_from_env()
    writes = cluster is None or cluster.chief  # several workers may share one --out: the chief writes it
    if writes and out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or remove it first")
    _check_classes(dataset)
    start = time.perf_counter()
    parent = read_bundle(init) if init is not None else None
    if parent is not None:
        _check_parent(parent, dataset)
        spec = parent.preprocess  # the parent's inputs, normalisation included
        arch = parent.manifest.arch
        if arch is None:
            raise ConfigError(
                f"{parent.path}: --init needs a bundle that records its architecture (one made by edgedx train)"
            )
        config = replace(config, arch=arch.name, width=arch.width)
    else:
        spec = training_spec(dataset, config.input_size or dataset.default_size, config.windows)
    data = prepare_data(dataset, spec, progress)  # forks its workers before TensorFlow starts threads
    strategy = distributed.strategy(cluster)  # before TensorFlow makes any tensor
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    with strategy.scope():  # variables mirrored on every worker; fit() compiles in the same scope
        model = _initial_model(parent, config, data.spec, dataset)
    activation = "softmax" if dataset.task == "multiclass" else "sigmoid"
    history = fit(
        model,
        data,
        config,
        activation=activation,
        augmentation=dataset.augmentation,
        progress=progress,
        on_epoch=on_epoch,
    )
    for layer in model.layers:  # a bundle's model is whole again, whatever was frozen for fine-tuning
        layer.trainable = True
    model = distributed.local_model(model)  # on every worker; from here on no worker waits on another
    calibration = fit_to_labels(predict_logits(model, data.x["val"]), data.y["val"])
    threshold, measured = evaluate_model(model, data, activation, config, calibration, list(dataset.class_names))
    if not writes:
        distributed.barrier(strategy)  # until the chief has written the bundle
        return TrainResult(bundle=None, metrics=measured, seconds=time.perf_counter() - start)
    guard = fit_guard(data.x["train"], data.x["val"], Scope.for_training(_modalities(dataset), dataset.body_parts))
    guard = guard.with_rates(test=flag_rate(guard, data.x["test"]))
    params, nonzero = count_parameters(model)
    seconds = time.perf_counter() - start
    best = max(history, key=lambda row: row["val_auc"])
    manifest = Manifest(
        name=out.name,
        arch=ArchRecord(
            name=config.arch, width=config.width, parameters=params, nonzero_parameters=nonzero, macs=count_macs(model)
        ),
        task=TaskRecord(kind=dataset.task, class_names=tuple(dataset.class_names), activation=activation),
        input=InputRecord(shape=(1, data.spec.size, data.spec.size, data.spec.channels), modality=_modalities(dataset)),
        preprocess=data.spec,
        threshold=ThresholdRecord(
            value=threshold,
            policy=config.threshold_policy if threshold is not None else "argmax",
            target_sensitivity=config.target_sensitivity,
        ),
        models={"keras": ModelRecord(calibration=calibration)},
        guard=guard.summary(),
        data={**dataset.summary(), "fingerprint": data.fingerprints},
        training=TrainingRecord(
            config=asdict(config),
            epochs_run=len(history),
            best_epoch=best["epoch"],
            seconds=round(seconds, 1),
            tensorflow=tf.__version__,
            workers=cluster.workers if cluster else 1,
            init=parent.parent_record() if parent is not None else None,
        ),
        metrics=measured,
        intended_use=intended_use(dataset),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.keras"
        deployable = keras.models.clone_model(model)  # uncompiled: no optimizer state in the bundle
        deployable.set_weights(model.get_weights())
        deployable.save(model_file)
        bundle = write_bundle(
            out,
            manifest,
            models={"keras": model_file},
            files={"history.json": history, GUARD_FILE: guard.arrays()},
            overwrite=overwrite,
        )
    distributed.barrier(strategy)  # the other workers may exit now
    return TrainResult(bundle=bundle, metrics=measured, seconds=seconds)


def intended_use(dataset: Dataset) -> str:
    """The manifest's intended-use statement; a model of synthetic data says so first."""
    if dataset.synthetic:
        return f"{SYNTHETIC_ONLY} {INTENDED_USE}"
    return INTENDED_USE


def _modalities(dataset: Dataset) -> tuple[str, ...] | None:
    return ("CT",) if dataset.input == "hu" else None


def _check_classes(dataset: Dataset) -> None:
    for split in ("train", "val"):
        labels = dataset.splits[split].labels
        if dataset.multilabel:  # the headline label has to be learnable; rarer ones may be missing here
            if np.unique(labels[:, 0]).size < 2:
                raise DataError(
                    f"{dataset.source}: the {split} split has no {'negative' if labels[:, 0].all() else 'positive'} "
                    f"{dataset.class_names[0]!r} case; training and threshold selection need both"
                )
            continue
        present = np.unique(labels).size
        if present < dataset.num_classes:
            raise DataError(
                f"{dataset.source}: the {split} split has {present} of {dataset.num_classes} classes; "
                "training and threshold selection need every class in both train and val"
            )


def _check_parent(parent: Bundle, dataset: Dataset) -> None:
    """An initial bundle must take the same kind of input and predict the same classes."""
    if "keras" not in parent.manifest.models:
        raise ConfigError(f"{parent.path}: --init needs a bundle with its Keras model (one made by edgedx train)")
    if parent.preprocess.input != dataset.input:
        raise ConfigError(
            f"{parent.path} takes {parent.preprocess.input!r} images; {dataset.source} holds {dataset.input!r} ones"
        )
    if parent.class_names != list(dataset.class_names):
        raise ConfigError(
            f"{parent.path} predicts {', '.join(parent.class_names)}; {dataset.source} is labelled "
            f"{', '.join(dataset.class_names)}"
        )


def _initial_model(parent: Bundle | None, config: TrainConfig, spec: PreprocessSpec, dataset: Dataset):
    """A new network, or the initial bundle's with its first ``config.freeze_layers`` layers frozen."""
    from ._tf import keras
    from .models import create_model

    if parent is None:
        shape = (spec.size, spec.size, spec.channels)
        return create_model(config.arch, shape, dataset.num_classes, width=config.width, multilabel=dataset.multilabel)
    model = keras.models.load_model(parent.model_path("keras"), compile=False)
    weighted = [layer for layer in model.layers if layer.weights]
    if config.freeze_layers > len(weighted):
        raise ConfigError(f"--freeze-layers {config.freeze_layers}: the model has {len(weighted)} layers with weights")
    for layer in weighted[: config.freeze_layers]:
        layer.trainable = False
    return model
