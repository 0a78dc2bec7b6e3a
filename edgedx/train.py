"""Float training (TensorFlow side): dataset -> tf_keras model -> model bundle.

Inputs are made by :func:`edgedx.preprocess.scale_and_resize` and normalised with statistics of
the training split, so the runtime replays them exactly from the bundle's spec. Augmentation
(flip, rotation, shift) happens after that, on training batches only.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as clinical
from .bundle import Bundle, write_bundle
from .data import Dataset, prepare_split
from .errors import ConfigError, DataError
from .outputs import probabilities
from .preprocess import PreprocessSpec, channel_statistics, normalize, parse_windows

#: ``progress(stage, done, total)``: long steps report through this (the CLI draws progress bars).
ProgressFn = Callable[[str, int, int], None]
#: ``on_epoch(epoch, logs)``: called after each epoch with its loss, validation AUC and time.
EpochFn = Callable[[int, dict[str, float]], None]

THRESHOLD_POLICIES = ("youden", "sensitivity")
#: Validation AUCs closer than this are a tie for early stopping.
AUC_TIE = 1e-4
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

    def __post_init__(self) -> None:
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
    bundle: Bundle
    metrics: dict[str, dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class PreparedData:
    """A dataset as normalised arrays, with the spec that made them."""

    spec: PreprocessSpec
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    fingerprints: dict[str, str]


def prepare_data(dataset: Dataset, spec: PreprocessSpec, progress: ProgressFn | None = None) -> PreparedData:
    """Preprocess every split with ``spec``.

    A spec without normalisation statistics gets them from the training split (training); a spec
    that has them (a bundle's, when compressing) is used as it is, so inputs match the parent model.
    """
    if spec.input != dataset.input:
        raise ConfigError(f"{dataset.source} holds {dataset.input!r} images; the preprocessing expects {spec.input!r}")
    prepared = {}
    for name, split in dataset.splits.items():
        report = (lambda done, total, n=name: progress(f"preprocess {n}", done, total)) if progress else None
        prepared[name] = prepare_split(split, spec, progress=report)
    if not spec.mean:
        spec = spec.with_normalization(*channel_statistics(prepared["train"].x))
    return PreparedData(
        spec=spec,
        x={n: normalize(p.x, spec.mean, spec.std) for n, p in prepared.items()},
        y={n: p.y for n, p in prepared.items()},
        fingerprints={n: p.fingerprint for n, p in prepared.items()},
    )


def training_spec(dataset: Dataset, size: int, windows: tuple[str, ...]) -> PreprocessSpec:
    """The preprocessing a new model on ``dataset`` uses (normalisation is fitted later)."""
    return PreprocessSpec(
        size=size, input=dataset.input, windows=parse_windows(windows) if dataset.input == "hu" else ()
    )


def predict_scores(model, x: np.ndarray, activation: str, batch_size: int = 256) -> np.ndarray:
    """Probabilities from a Keras model: (N,) positive class for binary, (N, K) otherwise."""
    return probabilities(model.predict(x, batch_size=batch_size, verbose=0), activation)


def _augmenter(keras, hflip: bool):
    """Flip (where laterality allows), rotate up to 9 degrees, shift up to 8%, zoom up to 10%.

    Zoom stands in for the spread of patient and organ sizes between hospitals and patients.
    """
    layers = [keras.layers.RandomFlip("horizontal")] if hflip else []
    layers += [
        keras.layers.RandomRotation(0.025, fill_mode="nearest"),
        keras.layers.RandomTranslation(0.08, 0.08, fill_mode="nearest"),
        keras.layers.RandomZoom(0.1, fill_mode="nearest"),
    ]
    return keras.Sequential(layers, name="augment")


def fit(
    model,
    data: PreparedData,
    config: TrainConfig,
    *,
    activation: str,
    hflip: bool,
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
    counts = np.bincount(y, minlength=2)
    class_weight = {c: len(y) / (len(counts) * n) for c, n in enumerate(counts) if n}
    targets = y.astype(np.float32)[:, None] if activation == "sigmoid" else y
    ds = tf.data.Dataset.from_tensor_slices((x, targets)).shuffle(
        len(x), seed=config.seed, reshuffle_each_iteration=True
    )
    ds = ds.batch(config.batch_size)
    if config.augment:
        augment = _augmenter(keras, hflip)
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
    model.fit(ds, epochs=config.epochs, verbose=0, class_weight=class_weight, callbacks=[*(callbacks or []), monitor])
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
            if epoch + 1 < select_from_epoch:
                return
            if auc > self.best_auc + AUC_TIE or self.best_weights is None:
                self.best_auc, self.best_weights, self.stale = auc, self.model.get_weights(), 0
            elif auc >= self.best_auc - AUC_TIE:
                # a tie on a saturated validation AUC: keep the later weights (lower learning rate)
                self.best_weights = self.model.get_weights()
            else:
                self.stale += 1
                if self.stale >= config.patience:
                    self.model.stop_training = True

    return ValidationAUC()


def evaluate_model(
    model, data: PreparedData, activation: str, config: TrainConfig
) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """Choose the threshold on validation data, then measure validation and test metrics."""
    scores = {s: predict_scores(model, data.x[s], activation) for s in ("val", "test")}
    threshold = None
    if activation == "sigmoid":
        threshold = clinical.choose_threshold(
            data.y["val"], scores["val"], policy=config.threshold_policy, target_sensitivity=config.target_sensitivity
        )
    return threshold, {s: clinical.evaluate(data.y[s], scores[s], threshold, seed=config.seed) for s in scores}


def train(
    dataset: Dataset,
    out: Path | str,
    config: TrainConfig = TrainConfig(),
    *,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a float model on ``dataset`` and write it as a bundle at ``out``.

    Args:
        dataset: Labelled images with train/val/test splits (see :func:`edgedx.data.load_dataset`).
        out: Bundle folder to create.
        config: Architecture, input size, windows, epochs and the threshold policy.
        progress: Progress callback for preprocessing and training batches.
        on_epoch: Called after every epoch with its figures.
        overwrite: Replace an existing bundle at ``out``.

    Returns:
        The bundle, its validation and test metrics and the wall time.
    """
    from ._tf import keras, tf
    from .models import count_macs, count_parameters, create_model

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or remove it first")
    for split in ("train", "val"):
        present = np.unique(dataset.splits[split].labels).size
        if present < dataset.num_classes:
            raise DataError(
                f"{dataset.source}: the {split} split has {present} of {dataset.num_classes} classes; "
                "training and threshold selection need every class in both train and val"
            )
    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    size = config.input_size or dataset.default_size
    data = prepare_data(dataset, training_spec(dataset, size, config.windows), progress)
    model = create_model(config.arch, (size, size, data.spec.channels), dataset.num_classes, width=config.width)
    activation = "sigmoid" if dataset.num_classes == 2 else "softmax"
    history = fit(
        model, data, config, activation=activation, hflip=dataset.hflip_ok, progress=progress, on_epoch=on_epoch
    )
    threshold, measured = evaluate_model(model, data, activation, config)
    params, nonzero = count_parameters(model)
    seconds = time.perf_counter() - start
    best = max(history, key=lambda row: row["val_auc"])
    manifest = {
        "name": out.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": {
            "name": config.arch,
            "width": config.width,
            "parameters": params,
            "nonzero_parameters": nonzero,
            "macs": count_macs(model),
        },
        "task": {
            "kind": "binary" if activation == "sigmoid" else "multiclass",
            "class_names": list(dataset.class_names),
            "output": "logits",
            "activation": activation,
        },
        "input": {
            "shape": [1, size, size, data.spec.channels],
            "dtype": "float32",
            "modality": ["CT"] if dataset.input == "hu" else None,
        },
        "preprocess": data.spec.to_dict(),
        "threshold": {
            "value": threshold,
            "policy": config.threshold_policy if threshold is not None else "argmax",
            "target_sensitivity": config.target_sensitivity,
        },
        "data": {**dataset.summary(), "fingerprint": data.fingerprints},
        "training": {
            "config": asdict(config),
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "seconds": round(seconds, 1),
            "tensorflow": tf.__version__,
        },
        "metrics": measured,
        "intended_use": INTENDED_USE,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.keras"
        deployable = keras.models.clone_model(model)  # uncompiled: no optimizer state in the bundle
        deployable.set_weights(model.get_weights())
        deployable.save(model_file)
        bundle = write_bundle(
            out, manifest, models={"keras": model_file}, files={"history.json": history}, overwrite=overwrite
        )
    return TrainResult(bundle=bundle, metrics=measured, seconds=seconds)
