"""Training on tiny data: it learns, picks a threshold on validation data, and writes a usable bundle."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_tf

from edgedx.bundle import MANIFEST, ParentRecord, read_bundle
from edgedx.data import Augmentation, load_dataset, recorded_dataset
from edgedx.data.cache import FINGERPRINT_SCHEME
from edgedx.errors import ConfigError
from edgedx.preprocess import to_model_inputs
from edgedx.train import TrainConfig, predict_scores, train  # TF itself is imported lazily

pytestmark = [pytest.mark.tf, needs_tf]


@pytest.fixture(scope="module")
def trained(tiny_npz, tmp_path_factory):
    dataset = load_dataset(tiny_npz)
    out = tmp_path_factory.mktemp("train") / "toy"
    epochs = []
    result = train(
        dataset,
        out,
        TrainConfig(arch="seed-cnn", width=0.25, epochs=8, batch_size=16),
        on_epoch=lambda e, row: epochs.append(row),
    )
    return dataset, result, epochs


def test_learns_toy_task(trained):
    _, result, epochs = trained
    assert result.metrics["test"]["auc"] > 0.95
    assert 1 <= len(epochs) <= 8 and all(0 <= row["val_auc"] <= 1 for row in epochs)


def test_manifest_is_complete(trained):
    _, result, _ = trained
    m = read_bundle(result.bundle.path).manifest
    for split in ("val", "test"):
        assert {"auc", "auc_ci95", "accuracy", "sensitivity", "specificity", "ppv", "npv"} <= set(m.metrics[split])
    assert m.input.shape == (1, 16, 16, 1) and m.task.class_names == ("class-0", "class-1")
    assert 0 <= m.threshold.value <= 1 and m.threshold.policy == "youden"
    assert (
        m.train_fingerprint.startswith(FINGERPRINT_SCHEME) and len(m.train_fingerprint) == len(FINGERPRINT_SCHEME) + 64
    )
    assert m.arch.name == "seed-cnn" and m.arch.parameters > 0
    assert m.preprocess.mean and m.preprocess.std
    assert (result.bundle.path / "history.json").is_file()


def test_bundle_replays_preprocessing(trained):
    """The saved model on spec-preprocessed raw images reproduces the recorded test AUC."""
    from edgedx._tf import keras
    from edgedx.metrics import auc

    dataset, result, _ = trained
    bundle = read_bundle(result.bundle.path)
    model = keras.models.load_model(bundle.model_path("keras"))
    split = dataset.splits["test"]
    scores = predict_scores(model, to_model_inputs(split.images(), bundle.preprocess), "sigmoid")
    assert auc(split.labels, scores) == pytest.approx(bundle.manifest.metrics["test"]["auc"], abs=1e-6)


def test_deterministic(trained, tiny_npz, tmp_path):
    dataset, result, _ = trained
    again = train(dataset, tmp_path / "again", TrainConfig(arch="seed-cnn", width=0.25, epochs=8, batch_size=16))
    assert again.metrics["test"]["auc"] == result.metrics["test"]["auc"]
    assert again.bundle.threshold == pytest.approx(result.bundle.threshold)


def test_headct_hu_pipeline(tiny_headct, tmp_path):
    """DICOM in HU through three windows; a multi-window spec lands in the manifest."""
    result = train(
        load_dataset(tiny_headct),
        tmp_path / "hct",
        TrainConfig(arch="seed-cnn", width=0.25, input_size=32, epochs=1, batch_size=8),
    )
    spec = result.bundle.preprocess
    assert [w.name for w in spec.windows] == ["brain", "subdural", "bone"] and spec.channels == 3
    m = result.bundle.manifest
    assert m.input.modality == ("CT",)
    # synthetic data is recorded by what made it, never by a machine path, and says so everywhere
    assert m.data["source"] == "synthetic" and m.data["synthetic"]["studies"] == 10
    assert str(tiny_headct) not in (result.bundle.path / MANIFEST).read_text() and result.bundle.synthetic_only
    assert m.intended_use.startswith("Trained on synthetic head-CT data only")
    assert recorded_dataset(m.data).splits["test"].ids == load_dataset(tiny_headct).splits["test"].ids
    assert set(result.bundle.load_guard().scope.body_parts) == {"HEAD", "BRAIN", "SKULL"}


def test_bundle_carries_its_guard_and_calibration(trained):
    _, result, _ = trained
    bundle = read_bundle(result.bundle.path)
    guard = bundle.load_guard()
    assert guard is not None and (bundle.path / "guard.npz").is_file()
    n_val = bundle.manifest.data["splits"]["val"]["images"]
    assert bundle.manifest.guard["flag_rate"]["val"] <= max(0.01, 2 / n_val)  # a tiny set: its top one per statistic
    assert "test" in bundle.manifest.guard["flag_rate"]
    calibration = bundle.calibration("keras")
    assert calibration.method == "platt" and calibration.scale > 0
    assert 0 <= bundle.manifest.metrics["test"]["ece"] <= 1
    stripes = np.zeros((1, 16, 16, 1), np.float32)
    stripes[..., ::2, :] = 10.0
    assert guard.scores(stripes)[0] > 1


def test_init_fine_tunes_from_a_bundle_with_frozen_layers(trained, tmp_path):
    from edgedx._tf import keras

    dataset, result, _ = trained
    parent = read_bundle(result.bundle.path)
    tuned = train(
        dataset,
        tmp_path / "tuned",
        TrainConfig(arch="resnet-small", epochs=1, batch_size=16, freeze_layers=1),  # arch comes from the parent
        init=parent.path,
    )
    m = tuned.bundle.manifest
    assert m.training.init == ParentRecord(name=parent.name, keras_sha256=parent.manifest.models["keras"].sha256)
    assert m.arch.name == "seed-cnn" and m.preprocess == parent.manifest.preprocess
    before = keras.models.load_model(parent.model_path("keras"), compile=False)
    after = keras.models.load_model(tuned.bundle.model_path("keras"), compile=False)
    first = next(i for i, layer in enumerate(before.layers) if layer.weights)
    for w0, w1 in zip(before.layers[first].get_weights(), after.layers[first].get_weights(), strict=True):
        np.testing.assert_array_equal(w0, w1)  # frozen
    assert any(
        not np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights(), strict=True)
    )  # the rest trained
    three = load_dataset(_three_classes(tmp_path))
    with pytest.raises(ConfigError, match="predicts class-0, class-1"):
        train(three, tmp_path / "no", TrainConfig(epochs=1), init=parent.path)


def _three_classes(folder) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 60), ("val", 30), ("test", 30)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 30, (n, 12, 12)).astype(np.uint8)
        images += (80 * labels).astype(np.uint8)[:, None, None]  # class = brightness level
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(folder / "three.npz", **arrays)
    return folder / "three.npz"


def test_multiclass(tmp_path):
    result = train(
        load_dataset(_three_classes(tmp_path)),
        tmp_path / "b",
        TrainConfig(arch="seed-cnn", width=0.25, epochs=15, batch_size=16, learning_rate=3e-3),
    )
    assert result.bundle.manifest.task.activation == "softmax" and result.bundle.threshold is None
    assert result.metrics["test"]["accuracy"] > 0.8
    assert result.bundle.calibration("keras").method == "temperature"


def test_organ_crops_are_not_shifted_rotated_or_zoomed(tiny_npz, tmp_path):
    """An OrganMNIST image is the organ's bounding box resized: its frame is evidence, so only
    data without that property gets geometric augmentation (and laterality classes no flip)."""
    import shutil

    from edgedx._tf import keras
    from edgedx.train import _augmenter

    organ = tmp_path / "organamnist.npz"
    shutil.copy(tiny_npz, organ)
    assert load_dataset(organ).augmentation == Augmentation(hflip=False, geometric=False)
    assert load_dataset(tiny_npz).augmentation == Augmentation(hflip=True, geometric=True)
    assert _augmenter(keras, Augmentation(hflip=False, geometric=False)) is None
    names = [layer.name for layer in _augmenter(keras, Augmentation(hflip=False, geometric=True)).layers]
    assert not any("flip" in n for n in names) and any("zoom" in n for n in names)


def test_refuses_existing_output(trained):
    dataset, result, _ = trained
    with pytest.raises(ConfigError, match="already exists"):
        train(dataset, result.bundle.path, TrainConfig(epochs=1))


def test_bad_config():
    with pytest.raises(ConfigError, match="needs a target sensitivity"):
        TrainConfig(threshold_policy="sensitivity")
    with pytest.raises(ConfigError, match="unknown window"):
        TrainConfig(windows=("brian",))


@pytest.mark.slow
def test_real_pneumoniamnist_short_run(tmp_path):
    """Three epochs on the real chest X-rays already separate pneumonia well (full run: benchmarks/)."""
    from conftest import shared_file

    result = train(load_dataset(shared_file("pneumoniamnist.npz")), tmp_path / "pneu", TrainConfig(epochs=3))
    assert result.metrics["test"]["auc"] > 0.9


def test_multilabel_any_and_subtypes(tiny_headct, tmp_path):
    """RSNA labels: one sigmoid and one threshold per label, per-label metrics, quantized and run like any bundle."""
    from edgedx.calibration import fit_to_labels
    from edgedx.compress import CompressConfig, compress
    from edgedx.data import RSNA_LABELS
    from edgedx.preprocess import to_model_inputs
    from edgedx.runtime import Model

    dataset = load_dataset(tiny_headct, labels=RSNA_LABELS)
    assert dataset.task == "multilabel" and dataset.splits["train"].labels.shape[1] == 6
    result = train(
        dataset, tmp_path / "ml", TrainConfig(arch="seed-cnn", width=0.25, input_size=32, epochs=2, batch_size=8)
    )
    m = result.bundle.manifest
    assert m.task.kind == "multilabel" and m.task.class_names == tuple(RSNA_LABELS)
    assert m.data["labels"] == list(RSNA_LABELS) and len(m.threshold.value) == 6
    per_label = m.metrics["test"]["per_label"]
    assert list(per_label) == list(RSNA_LABELS) and per_label["any"]["auc"] == m.metrics["test"]["auc"]
    assert len(result.bundle.calibration("keras").to_dict()["scale"]) == 6
    with pytest.raises(ConfigError, match="multi-label"):
        compress(result.bundle.path, tmp_path / "d", CompressConfig(distill=True, quantize="none"))
    small = compress(result.bundle.path, tmp_path / "q", CompressConfig(quantize="int8"))
    model = Model.load(small.bundle.path)
    val = dataset.splits["val"]  # the int8 gets its own Platt fit per label on its validation logits
    val_logits = model.logits(to_model_inputs(list(val.images()), small.bundle.preprocess))
    expected = fit_to_labels(val_logits, val.labels)
    assert model.calibration.method == expected.method == "platt"
    assert np.allclose(model.calibration.scale, expected.scale, rtol=1e-4)
    assert np.allclose(model.calibration.shift, expected.shift, rtol=1e-4, atol=1e-6)
    first = next(tiny_headct.rglob("*.dcm"))
    prediction = model.predict(first)
    assert np.shape(prediction.probabilities) == (6,) and set(prediction.findings) <= set(RSNA_LABELS)
    assert prediction.decision == int("any" in prediction.findings) or not prediction.in_distribution
    assert recorded_dataset(small.bundle.manifest.data).task == "multilabel"


def test_training_reads_every_example_once_per_epoch_from_the_cache(tiny_npz, tmp_path, monkeypatch):
    """A new order each epoch, every example exactly once, pools of shards mixed, the same run for the same seed."""
    from edgedx._tf import tf
    from edgedx.data import cache as cache_module
    from edgedx.data import cache_split
    from edgedx.preprocess import PreprocessSpec
    from edgedx.train import _shuffled_batches

    monkeypatch.setattr(cache_module, "SHARD_BYTES", 10 * 4 * 4 * 4)  # 10 images a shard, 7 shards, 2 pools
    cached = cache_split(load_dataset(tiny_npz), "train", PreprocessSpec(size=4, input="intensity"), root=tmp_path)
    targets = np.arange(len(cached.inputs), dtype=np.int64)  # each example's own index as its label
    expected = np.asarray(cached.inputs)

    def epochs(seed: int) -> list[list[int]]:
        batches = _shuffled_batches(tf, cached.inputs, targets, 16, seed)
        seen = []
        for _ in range(2):
            order = []
            for images, labels in batches:
                assert len(labels) <= 16
                np.testing.assert_array_equal(images.numpy(), expected[labels.numpy()])  # images keep their labels
                order += labels.numpy().tolist()
            seen.append(order)
        return seen

    first, second = epochs(seed=3)
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second
    assert any(abs(a - b) >= 10 for a, b in itertools.pairwise(first))  # neighbours from other shards
    assert epochs(seed=3) == [first, second]


@pytest.mark.parametrize(
    ("val_aucs", "epochs_run"),
    [
        ((0.55, 0.52, 0.51, 0.53, 0.99, 0.97), 6),  # at chance, then learning: patience waits for it
        ((0.99, 0.97, 0.96, 0.98, 0.99, 0.97), 3),  # learning from the start: stops after 2 stale epochs
    ],
)
def test_patience_counts_only_once_validation_auc_leaves_chance(tiny_npz, tmp_path, monkeypatch, val_aucs, epochs_run):
    from edgedx import metrics

    real_auc, scripted = metrics.auc, iter(val_aucs)
    monkeypatch.setattr(metrics, "auc", lambda y, scores: next(scripted, None) or real_auc(y, scores))
    epochs = []
    train(
        load_dataset(tiny_npz),
        tmp_path / "b",
        TrainConfig(arch="seed-cnn", width=0.25, epochs=6, batch_size=16, patience=2),
        on_epoch=lambda e, row: epochs.append(row["val_auc"]),
    )
    assert epochs == list(val_aucs[:epochs_run])
