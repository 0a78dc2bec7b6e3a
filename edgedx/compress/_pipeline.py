"""``edgedx compress``: distill -> prune -> quantize a bundle, measuring what every step costs."""

from __future__ import annotations

import datetime as dt
import gzip
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics as clinical
from ..bundle import Bundle, read_bundle, write_bundle
from ..calibration import Calibration, fit_to_labels, fit_to_reference, logits_of, recalibrate
from ..data import recorded_dataset
from ..errors import CompressionRefused, ConfigError
from ..outputs import decisions, probabilities
from ..train import EpochFn, PreparedData, ProgressFn, TrainConfig, fit, predict_scores, prepare_data
from .prune import DISTRIBUTIONS, STRUCTURES
from .quantize import QUANTIZATIONS, TFLiteModel

QUANTIZE_CHOICES = (*[q for q in QUANTIZATIONS if q != "float32"], "auto", "none")
#: ``--quantize auto`` tries these, measured on the device; float32 always passes the guard.
AUTO_CANDIDATES = ("float32", "float16", "dynamic", "int8")
#: int8 whose flips exceed ``max_flips`` is retried with this many leading ops in float, fewest first.
FLOAT_OP_COUNTS = (1, 2, 3)


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """What ``edgedx compress`` does; steps run in the order distill -> prune -> quantize."""

    distill: bool = False
    student: str | None = None  # None: the teacher's architecture, narrowed
    width: float | None = None  # None: the widest student with <= 1/8 of the teacher's parameters
    temperature: float = 4.0
    alpha: float = 0.3
    distill_epochs: int | None = None  # None: as many as the teacher trained for
    prune: bool = False
    sparsity: float = 0.75
    structure: str = "unstructured"
    layer_sparsity: str = "erk"  # how the unstructured target is shared among layers: erk or uniform
    prune_epochs: int = 8
    prune_with_teacher: bool = False  # after --distill: fine-tune the pruned student under the distillation loss
    quantize: str = "int8"
    device: str | None = None  # with quantize="auto": the device profile to measure candidates on
    auto_runs: int = 200
    qat: bool = False
    qat_epochs: int = 3
    max_auc_drop: float = 0.01
    max_flips: float = 0.02  # int8: validation decisions allowed to differ from the float model's
    integer_only: bool = False  # int8: never keep an op in float, even when flips exceed max_flips
    calibration_samples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"unknown quantization {self.quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
        if (self.quantize == "auto") != (self.device is not None):
            raise ConfigError("--quantize auto measures the candidates on a device: use it with --device NAME")
        if self.qat and self.quantize != "int8":
            raise ConfigError("--qat trains for full-integer int8; use it with --quantize int8")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"unknown pruning structure {self.structure!r}; choose from {', '.join(STRUCTURES)}")
        if self.layer_sparsity not in DISTRIBUTIONS:
            raise ConfigError(f"unknown layer sparsity {self.layer_sparsity!r}; choose from {', '.join(DISTRIBUTIONS)}")
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be between 0 and 1, got {self.sparsity}")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(f"need temperature > 0 and alpha in [0, 1], got {self.temperature} and {self.alpha}")
        if not 0 <= self.max_auc_drop < 1:
            raise ConfigError(f"max AUC drop must be in [0, 1), got {self.max_auc_drop}")
        if not 0 <= self.max_flips < 1:
            raise ConfigError(f"max flips must be in [0, 1), got {self.max_flips}")
        for name in ("prune_epochs", "qat_epochs", "calibration_samples", "auto_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.prune_with_teacher and not (self.distill and self.prune):
            raise ConfigError("--prune-with-teacher fine-tunes a distilled student: use it with --distill --prune")
        if not (self.distill or self.prune or self.quantize != "none"):
            raise ConfigError("nothing to do: choose at least one of --distill, --prune, --quantize")


@dataclass(frozen=True)
class CompressResult:
    bundle: Bundle
    steps: list[dict[str, Any]]
    seconds: float


@dataclass
class _Stage:
    """The model as it leaves a step: a Keras model or a TFLite one, its threshold and scores."""

    name: str
    keras_model: Any
    threshold: float | None
    scores: dict[str, np.ndarray]
    arch: dict[str, Any]
    tflite: TFLiteModel | None = None
    notes: list[str] = field(default_factory=list)


def _gzip_size(content: bytes) -> int:
    return len(gzip.compress(content, compresslevel=9))


def _tflite_scores(model: TFLiteModel, data: PreparedData, activation: str) -> dict[str, np.ndarray]:
    from ..runtime import TFLiteRunner

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(model.content)
        runner = TFLiteRunner(path, input_record=model.input, output_record=model.output, threads=None)
        return {s: probabilities(runner.logits(data.x[s]), activation) for s in ("val", "test")}


def _choose_threshold(stage_scores: np.ndarray, data: PreparedData, parent: Bundle) -> float | None:
    if stage_scores.ndim != 1:
        return None
    policy = parent.manifest["threshold"]["policy"]
    return clinical.choose_threshold(
        data.y["val"],
        stage_scores,
        policy=policy,
        target_sensitivity=parent.manifest["threshold"].get("target_sensitivity"),
    )


def _matching_threshold(scores_val: np.ndarray, float_stage: _Stage) -> float | None:
    """The threshold at which a quantized model's validation decisions agree most with its float model's.

    Quantization can shift every score a little; keeping the float threshold then flips many cases
    near it (11.9% of test cases for the default head-CT model, at an AUC cost of only 0.006). The
    quantized model keeps its float model's operating point instead. Ties go to the candidate
    closest to the float threshold. Validation data only.
    """
    if scores_val.ndim != 1 or float_stage.threshold is None:
        return float_stage.threshold
    wanted = decisions(float_stage.scores["val"], float_stage.threshold).astype(bool)
    order = np.argsort(scores_val, kind="stable")
    ranked, wanted_ranked = scores_val[order], wanted[order]
    positives_below = np.concatenate([[0], np.cumsum(wanted_ranked)])  # float positives among the i lowest
    candidates = np.unique(np.append(scores_val, float_stage.threshold))
    below = np.searchsorted(ranked, candidates, side="left")  # cases a candidate calls negative
    # agreement = float positives at or above the candidate + float negatives below it
    agreement = (positives_below[-1] - positives_below[below]) + (below - positives_below[below])
    best = np.flatnonzero(agreement == agreement.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - float_stage.threshold))]])


def _validation_flips(scores_val: np.ndarray, float_stage: _Stage) -> float:
    """The fraction of validation decisions a quantized model changes, at its matched threshold."""
    wanted = decisions(float_stage.scores["val"], float_stage.threshold)
    return float(np.mean(decisions(scores_val, _matching_threshold(scores_val, float_stage)) != wanted))


@dataclass(frozen=True)
class _Int8Candidate:
    model: TFLiteModel
    scores: dict[str, np.ndarray]
    auc_drop: float
    flips: float

    def describe(self) -> str:
        kept = f"first {len(self.model.float_ops)} op(s) in float" if self.model.float_ops else "full int8"
        size = len(self.model.content)
        return f"{kept}: {self.flips:.1%} validation flips, AUC drop {self.auc_drop:+.4f}, {size:,} B"


def _post_training_int8(
    float_model, calibration: np.ndarray, float_stage: _Stage, prepared: PreparedData, activation: str, config
) -> tuple[_Int8Candidate, list[str]]:
    """Full int8, or, when it flips more than ``max_flips`` of validation decisions, int8 with the first ops in float.

    Tries one, two, then three leading ops in float (``int8_keeping_first_ops_float``) and keeps
    the first that meets both ``max_flips`` and ``max_auc_drop``; if none does, see
    ``_fewest_flips``. Validation data only.
    """
    from .quantize import convert, int8_keeping_first_ops_float

    reference_auc = clinical.auc(prepared.y["val"], float_stage.scores["val"])
    sparse = _pruned(float_stage.arch)

    def measured(model: TFLiteModel) -> _Int8Candidate:
        scores = _tflite_scores(model, prepared, activation)
        drop = reference_auc - clinical.auc(prepared.y["val"], scores["val"])
        return _Int8Candidate(model, scores, drop, _validation_flips(scores["val"], float_stage))

    def acceptable(c: _Int8Candidate) -> bool:
        return c.flips <= config.max_flips and c.auc_drop <= config.max_auc_drop

    tried = [measured(convert(float_model, "int8", calibration, sparse=sparse))]
    if not acceptable(tried[0]) and not config.integer_only:
        for model in int8_keeping_first_ops_float(float_model, calibration, FLOAT_OP_COUNTS, sparse=sparse):
            tried.append(measured(model))
            if acceptable(tried[-1]):
                break
    chosen = next((c for c in tried if acceptable(c)), None) or _fewest_flips(
        tried, config.max_auc_drop, resolution=1 / len(prepared.y["val"])
    )
    notes = [f"post-training int8, {c.describe()}" + (" (kept)" if c is chosen else "") for c in tried]
    if chosen.flips > config.max_flips:
        notes.append(
            f"{chosen.flips:.1%} of validation decisions differ from the float model's, more than "
            f"--max-flips {config.max_flips:.1%}" + ("" if config.integer_only else " even with the first ops in float")
        )
    return chosen, notes


def _fewest_flips(tried: list[_Int8Candidate], max_auc_drop: float, resolution: float) -> _Int8Candidate:
    """Of int8 candidates (fewest float ops first) none of which meets every budget, the one to keep.

    The fewest validation flips within ``max_auc_drop``, except that a candidate with fewer float
    ops is kept when it flips at most one more validation case (``resolution``): one case is the
    limit of what the validation set can tell apart, and every op kept in float costs speed. Full
    int8 when no candidate is within ``max_auc_drop`` (the QAT retry and the guard take it from there).
    """
    within = [c for c in tried if c.auc_drop <= max_auc_drop]
    if not within:
        return tried[0]
    fewest = min(c.flips for c in within)
    return next(c for c in within if c.flips <= fewest + resolution + 1e-12)


def _pruned(arch: dict[str, Any]) -> bool:
    """Whether a stage's network was pruned (the prune step records its kernel sparsity): such
    models are converted to TFLite's sparse tensor encoding."""
    return "kernel_sparsity" in arch


def _row(stage: _Stage, data: PreparedData, parent_decisions: np.ndarray, seconds: float, seed: int) -> dict:
    from ..models import count_macs, count_parameters
    from .quantize import convert

    params, nonzero = count_parameters(stage.keras_model)
    sparse = _pruned(stage.arch)  # stored in the sparse encoding it deploys with
    content = stage.tflite.content if stage.tflite else convert(stage.keras_model, "float32", sparse=sparse).content
    measured = {
        s: clinical.evaluate(data.y[s], stage.scores[s], stage.threshold, resamples=200, seed=seed)
        for s in ("val", "test")
    }
    flips = float(np.mean(decisions(stage.scores["test"], stage.threshold) != parent_decisions))
    return {
        "step": stage.name,
        "format": f"tflite-{stage.tflite.mode}" if stage.tflite else "keras (size as float32 TFLite)",
        "parameters": params,
        "nonzero_parameters": nonzero,
        "macs": count_macs(stage.keras_model),
        "bytes": len(content),
        "gzip_bytes": _gzip_size(content),
        "threshold": stage.threshold,
        "val": {k: measured["val"][k] for k in ("auc", "sensitivity", "specificity", "accuracy")},
        "test": {k: measured["test"][k] for k in ("auc", "auc_ci95", "sensitivity", "specificity", "accuracy")},
        "flips": flips,
        "seconds": round(seconds, 1),
        "notes": stage.notes,
    }


def compress(
    parent: Path | str,
    out: Path | str,
    config: CompressConfig = CompressConfig(),
    *,
    data: Path | str | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    overwrite: bool = False,
) -> CompressResult:
    """Compress a trained bundle and write the result as a new bundle.

    The parent's float Keras model is the reference: every step reports its size, speed-relevant
    counts, validation and test metrics and decision flips against it. Choices (thresholds, the
    accuracy guard) use validation data only; test data is reported, never tuned on.

    Args:
        parent: A bundle written by ``edgedx train``.
        out: Bundle folder to create.
        config: Which steps, and their settings.
        data: Training data to fine-tune on; default: the source the parent records.

    Raises:
        CompressionRefused: int8 lost more than ``config.max_auc_drop`` validation AUC even
            after quantization-aware training; nothing is written.
    """
    from .._tf import keras, tf
    from . import distill as distillation
    from . import prune as pruning
    from .quantize import convert, quantization_aware, representative_samples

    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or remove it first")
    parent_bundle = read_bundle(parent)
    manifest = parent_bundle.manifest
    if "keras" not in manifest["models"]:
        raise ConfigError(f"{parent_bundle.path}: compress needs the float Keras model of a trained bundle")
    multilabel = manifest["task"]["kind"] == "multilabel"
    if multilabel and (config.distill or config.prune or config.quantize == "auto"):
        raise ConfigError(
            f"{parent_bundle.path} is a multi-label model: compress quantizes it (--quantize int8, float16, "
            "dynamic) but does not distill, prune or choose a precision for it yet"
        )
    dataset = recorded_dataset(manifest["data"], data)
    prepared = prepare_data(dataset, parent_bundle.preprocess, progress)
    activation = manifest["task"]["activation"]
    train_config = TrainConfig(
        **{**manifest["training"]["config"], "windows": tuple(manifest["training"]["config"]["windows"])}
    )
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    steps_per_epoch = math.ceil(len(prepared.y["train"]) / train_config.batch_size)

    teacher = keras.models.load_model(parent_bundle.model_path("keras"), compile=False)
    # Every stage works on uncalibrated scores (calibration is fitted at the end); the parent's
    # threshold is on its calibrated ones, so it is mapped back (the decisions are the same).
    parent_scores = {s: predict_scores(teacher, prepared.x[s], activation) for s in ("val", "test")}
    parent_threshold = parent_bundle.calibration("keras").uncalibrated_threshold(parent_bundle.threshold)
    parent_decisions = decisions(parent_scores["test"], parent_threshold)
    parent_arch = {"name": manifest["arch"]["name"], "width": manifest["arch"].get("width")}
    current = _Stage("parent", teacher, parent_threshold, parent_scores, parent_arch)
    rows = [_row(current, prepared, parent_decisions, 0.0, config.seed)]

    def keras_stage(name: str, model, arch: dict[str, Any], began: float, notes: list[str]) -> _Stage:
        scores = {s: predict_scores(model, prepared.x[s], activation) for s in ("val", "test")}
        threshold = _choose_threshold(scores["val"], prepared, parent_bundle)
        stage = _Stage(name, model, threshold, scores, arch, notes=notes)
        rows.append(_row(stage, prepared, parent_decisions, time.perf_counter() - began, config.seed))
        return stage

    if config.distill:
        began = time.perf_counter()
        arch = config.student or manifest["arch"]["name"]
        student, width = distillation.choose_student(teacher, arch, len(parent_bundle.class_names), width=config.width)
        trainer = distillation.distiller(teacher, student, temperature=config.temperature, alpha=config.alpha)
        epochs = config.distill_epochs or train_config.epochs
        fit(
            trainer,
            prepared,
            replace(train_config, epochs=epochs),
            activation=activation,
            hflip=dataset.hflip_ok,
            progress=progress,
            on_epoch=on_epoch,
        )
        notes = [f"student {arch} width {width}, T={config.temperature}, alpha={config.alpha}, {epochs} epochs"]
        current = keras_stage("distill", student, {"name": arch, "width": width}, began, notes)

    if config.prune:
        began = time.perf_counter()
        wrapped, callbacks, end_step = pruning.prunable(
            current.keras_model,
            sparsity=config.sparsity,
            structure=config.structure,
            steps=config.prune_epochs * steps_per_epoch,
            distribution=config.layer_sparsity,
        )
        # Off by default: keeping the teacher in the loop helped the PneumoniaMNIST students (width
        # 0.3: 0.957 -> 0.963 test AUC) but hurt the head-CT one (0.856 -> 0.796); benchmarks/README.md.
        with_teacher = config.distill and config.prune_with_teacher
        trainee = (
            distillation.distiller(teacher, wrapped, temperature=config.temperature, alpha=config.alpha)
            if with_teacher
            else wrapped
        )
        fit(
            trainee,
            prepared,
            replace(
                train_config,
                epochs=config.prune_epochs,
                patience=config.prune_epochs,
                learning_rate=train_config.learning_rate / 5,
            ),
            activation=activation,
            hflip=dataset.hflip_ok,
            progress=progress,
            on_epoch=on_epoch,
            callbacks=callbacks,
            select_from_epoch=math.ceil(end_step / steps_per_epoch) + 1,
        )
        stripped = pruning.strip(wrapped)
        achieved = pruning.kernel_sparsity(stripped)
        shared = f" ({config.layer_sparsity} over layers)" if config.structure == "unstructured" else ""
        notes = [f"{config.structure}{shared} to {config.sparsity:.0%}: {achieved:.1%} of kernel weights are zero"]
        notes.append("fine-tuned under the distillation loss" if with_teacher else "fine-tuned on the labels")
        current = keras_stage("prune", stripped, {**current.arch, "kernel_sparsity": achieved}, began, notes)

    float_stage = current
    float_model = current.keras_model
    sparse = _pruned(current.arch)
    float_tflite = convert(float_model, "float32", sparse=sparse)
    deploy = float_tflite
    auto_record = None
    if config.quantize == "auto":
        began = time.perf_counter()
        calibration = representative_samples(prepared.x["train"], config.calibration_samples, config.seed)
        deploy, q_scores, auto_record = _auto_precision(
            float_model, float_tflite, calibration, current, prepared, manifest, config
        )
        step_name, notes = f"quantize-auto:{deploy.mode}", [auto_record["reason"]]
    elif config.quantize != "none":
        began = time.perf_counter()
        calibration = representative_samples(prepared.x["train"], config.calibration_samples, config.seed)
        reference_auc = clinical.auc(prepared.y["val"], current.scores["val"])
        notes: list[str] = []

        def quantize_once(model) -> tuple[TFLiteModel, dict[str, np.ndarray], float]:
            q = convert(model, config.quantize, calibration, sparse=sparse)
            scores = _tflite_scores(q, prepared, activation)
            return q, scores, reference_auc - clinical.auc(prepared.y["val"], scores["val"])

        qat_model = None
        if config.quantize == "int8" and not config.qat:
            chosen, int8_notes = _post_training_int8(float_model, calibration, current, prepared, activation, config)
            deploy, q_scores, drop = chosen.model, chosen.scores, chosen.auc_drop
            notes += int8_notes
        elif not config.qat:
            deploy, q_scores, drop = quantize_once(float_model)
            notes.append(f"post-training {config.quantize}: validation AUC drop {drop:+.4f}")
        if config.quantize == "int8" and (config.qat or drop > config.max_auc_drop):
            qat_model = quantization_aware(float_model, preserve_sparsity=config.prune)
            fit(
                qat_model,
                prepared,
                replace(
                    train_config,
                    epochs=config.qat_epochs,
                    patience=config.qat_epochs,
                    learning_rate=train_config.learning_rate / 10,
                ),
                activation=activation,
                hflip=dataset.hflip_ok,
                progress=progress,
                on_epoch=on_epoch,
            )
            deploy, q_scores, drop = quantize_once(qat_model)
            kind = "sparsity-preserving QAT" if config.prune else "QAT"
            notes.append(
                f"{kind} {config.qat_epochs} epochs: validation AUC drop {drop:+.4f}"
                + (f", {pruning.kernel_sparsity(qat_model):.1%} of kernel weights zero" if config.prune else "")
            )
        if drop > config.max_auc_drop:
            raise CompressionRefused(
                f"{config.quantize} loses {drop:.4f} validation AUC against its float model "
                f"({reference_auc:.4f} -> {reference_auc - drop:.4f}), more than --max-auc-drop "
                f"{config.max_auc_drop}{', even after quantization-aware training' if qat_model else ''}; "
                "no bundle written. Try another --quantize (dynamic, float16) or a larger --max-auc-drop"
            )
        step_name = f"quantize-{config.quantize}"
    if config.quantize != "none":
        threshold = _matching_threshold(q_scores["val"], current)
        stage = _Stage(step_name, float_model, threshold, q_scores, current.arch, tflite=deploy, notes=notes)
        rows.append(_row(stage, prepared, parent_decisions, time.perf_counter() - began, config.seed))
        current = stage

    return _write(
        out,
        parent_bundle,
        manifest,
        config,
        rows,
        current,
        float_stage,
        float_tflite,
        deploy,
        prepared,
        time.perf_counter() - start,
        overwrite,
        auto_record,
    )


def _candidate_bundle(folder: Path, model: TFLiteModel, manifest: dict, threshold: float | None) -> Path:
    """A minimal bundle around one TFLite candidate, so the device probe can load it like any bundle."""
    role = f"tflite-{model.mode}"
    body = {
        **{k: manifest[k] for k in ("task", "input", "preprocess")},
        "threshold": {**manifest["threshold"], "value": threshold},
        "deploy": role,
        "models": {role: {"input": model.input, "output": model.output, "threshold": threshold}},
    }
    file = folder / f"{model.mode}.tflite"
    file.write_bytes(model.content)
    return write_bundle(folder / f"candidate-{model.mode}", body, models={role: file}).path


def _auto_precision(
    float_model,
    float_tflite: TFLiteModel,
    calibration: np.ndarray,
    current: _Stage,
    prepared: PreparedData,
    manifest: dict,
    config: CompressConfig,
) -> tuple[TFLiteModel, dict[str, np.ndarray], dict[str, Any]]:
    """Convert to every precision, measure each on the device, keep the fastest that passes the guard.

    Latency is the median of ``auto_runs`` single-image predictions in a runtime-only process limited
    as the device profile says (the same probe ``edgedx bench`` uses), on validation inputs.
    """
    from ..devices import load_profile
    from ..runtime.probe import run_probe, summarize_latency
    from .quantize import convert

    profile = load_profile(config.device)
    reference_auc = clinical.auc(prepared.y["val"], current.scores["val"])
    candidates, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "val.npy"
        np.save(inputs, prepared.x["val"][:256])
        activation = manifest["task"]["activation"]
        for mode in AUTO_CANDIDATES:
            if mode == "int8":  # the int8 that compress --quantize int8 would keep
                chosen, _ = _post_training_int8(float_model, calibration, current, prepared, activation, config)
                model, scores = chosen.model, chosen.scores
            else:
                sparse = float_tflite.sparse  # every candidate stored like the float32 one
                model = float_tflite if mode == "float32" else convert(float_model, mode, calibration, sparse=sparse)
                scores = _tflite_scores(model, prepared, activation)
            drop = reference_auc - clinical.auc(prepared.y["val"], scores["val"])
            bundle = _candidate_bundle(Path(tmp), model, manifest, current.threshold)
            probe = run_probe(
                "edgedx.runtime.probe",
                bundle=bundle,
                role=f"tflite-{mode}",
                inputs=inputs,
                threads=profile.threads,
                cpu_affinity=profile.cpu_affinity,
                memory_limit_mb=profile.memory_limit_mb,
                runs=config.auto_runs,
            )
            models[mode] = (model, scores)
            candidates.append(
                {
                    "precision": mode,
                    "bytes": len(model.content),
                    **({"float_ops": list(model.float_ops)} if model.float_ops else {}),
                    "val_auc_drop": drop,
                    "passes_guard": mode == "float32" or drop <= config.max_auc_drop,
                    **{k: round(v, 4) for k, v in summarize_latency(probe["latency_ms"]).items()},
                    "peak_rss_mb": round(probe["peak_rss_mb"], 1),
                }
            )
    passing = [c for c in candidates if c["passes_guard"]]
    winner = min(passing, key=lambda c: c["p50_ms"])
    ranked = ", ".join(f"{c['precision']} {c['p50_ms']:.3f} ms" for c in sorted(candidates, key=lambda c: c["p50_ms"]))
    refused = [c["precision"] for c in candidates if not c["passes_guard"]]
    reason = (
        f"{winner['precision']} is the fastest on {profile.name} of the precisions within --max-auc-drop "
        f"{config.max_auc_drop} (median latency: {ranked})"
        + (f"; refused for accuracy: {', '.join(refused)}" if refused else "")
    )
    record = {"device": profile.to_dict(), "runs": config.auto_runs, "candidates": candidates}
    record |= {"winner": winner["precision"], "reason": reason}
    model, scores = models[winner["precision"]]
    return model, scores, record


def _write(
    out: Path,
    parent: Bundle,
    manifest: dict,
    config: CompressConfig,
    rows: list[dict],
    final: _Stage,
    float_stage: _Stage,
    float_tflite: TFLiteModel,
    deploy: TFLiteModel,
    prepared: PreparedData,
    seconds: float,
    overwrite: bool,
    auto_record: dict[str, Any] | None = None,
) -> CompressResult:
    from ..models import count_macs, count_parameters

    float_model = float_stage.keras_model
    float_calibration, deploy_calibration = _calibrations(float_stage, final, deploy, prepared)
    float_threshold = float_calibration.probability_threshold(float_stage.threshold)
    deploy_threshold = deploy_calibration.probability_threshold(final.threshold)
    metrics = {
        s: clinical.evaluate(
            prepared.y[s],
            recalibrate(final.scores[s], deploy_calibration, prepared.y[s].ndim == 2),
            deploy_threshold,
            seed=config.seed,
            label_names=parent.class_names,
        )
        for s in ("val", "test")
    }
    params, nonzero = count_parameters(float_model)
    deploy_role = f"tflite-{deploy.mode}"
    body = {
        **{k: manifest[k] for k in ("task", "input", "preprocess", "guard", "data", "intended_use") if k in manifest},
        "name": out.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": {**final.arch, "parameters": params, "nonzero_parameters": nonzero, "macs": count_macs(float_model)},
        "threshold": {**manifest["threshold"], "value": deploy_threshold},
        "deploy": deploy_role,
        "metrics": metrics,
        "training": manifest.get("training"),
        "compression": {
            "parent": {"name": parent.name, "keras_sha256": manifest["models"]["keras"]["sha256"]},
            "config": asdict(config),
            "data_matches_parent": prepared.fingerprints["train"] == manifest["data"]["fingerprint"]["train"],
            "steps": rows,
            "seconds": round(seconds, 1),
            **({"auto_precision": auto_record} if auto_record else {}),
        },
        "models": {
            "keras": {"threshold": float_threshold, "calibration": float_calibration.to_dict()},
            "tflite-float32": {
                "input": float_tflite.input,
                "output": float_tflite.output,
                "threshold": float_threshold,
                "calibration": float_calibration.to_dict(),
                "sparse_encoding": float_tflite.sparse,
            },
            deploy_role: {
                "input": deploy.input,
                "output": deploy.output,
                "threshold": deploy_threshold,
                "calibration": deploy_calibration.to_dict(),
                "sparse_encoding": deploy.sparse,
                "float_ops": list(deploy.float_ops),
            },
        },
    }
    guard_file = manifest.get("guard", {}).get("file")
    extra_files = {guard_file: (parent.path / guard_file).read_bytes()} if guard_file else {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"keras": Path(tmp) / "model.keras", "tflite-float32": Path(tmp) / "model-float32.tflite"}
        float_model.save(files["keras"])
        files["tflite-float32"].write_bytes(float_tflite.content)
        if deploy_role != "tflite-float32":
            files[deploy_role] = Path(tmp) / f"model-{deploy.mode}.tflite"
            files[deploy_role].write_bytes(deploy.content)
        bundle = write_bundle(out, body, models=files, files=extra_files, overwrite=overwrite)
    return CompressResult(bundle=bundle, steps=rows, seconds=seconds)


def _calibrations(
    float_stage: _Stage, final: _Stage, deploy: TFLiteModel, prepared: PreparedData
) -> tuple[Calibration, Calibration]:
    """Calibrations of the compressed float model and of the deployed one, from validation data.

    The float model is fitted to the labels. A quantized binary model is fitted to the float
    model's calibrated logits instead, so both report the same probability for the same input;
    a multi-class one gets its own temperature.
    """
    y = prepared.y["val"]
    multilabel = y.ndim == 2
    float_logits = logits_of(float_stage.scores["val"], multilabel)
    float_calibration = fit_to_labels(float_logits, y)
    if deploy.mode == "float32" or final is float_stage:
        return float_calibration, float_calibration
    deploy_logits = logits_of(final.scores["val"], multilabel)
    if deploy_logits.ndim == 1 or multilabel:
        return float_calibration, fit_to_reference(deploy_logits, float_calibration.apply(float_logits))
    return float_calibration, fit_to_labels(deploy_logits, y)
