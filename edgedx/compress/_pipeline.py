"""``edgedx compress``: distill -> prune -> quantize a bundle, measuring what every step costs."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from .. import metrics as clinical
from ..bundle import (
    ArchRecord,
    Bundle,
    CompressionRecord,
    LossRecord,
    Manifest,
    ModelRecord,
    read_bundle,
    write_bundle,
)
from ..calibration import Calibration, fit_to_labels, logits_of, recalibrate
from ..data import Augmentation, input_batches, recorded_dataset
from ..data.cache import same_data
from ..devices import DeviceProfile, device_figures, load_profile
from ..errors import CompressionRefused, ConfigError
from ..outputs import decisions, probabilities
from ..precision import KERAS_ROLE, PRECISIONS, QUANTIZE_CHOICES, role_of
from ..runtime.probe import LATENCY_SAMPLE, LATENCY_TIE, run_probe, summarize_latency
from ..train import EpochFn, PreparedData, ProgressFn, TrainConfig, fit, predict_scores, prepare_data
from .prune import DISTRIBUTIONS, STRUCTURES, kernel_sparsity
from .quantize import ConvertedModel

#: What converting to and running each engine's models needs here, beyond the [train] extra's TensorFlow.
ENGINE_MODULES = {"tflite": (), "onnx": ("tf2onnx", "onnxruntime")}
#: Distillation runs this many epochs per teacher epoch unless told, by how the student started.
#: From random weights the head-CT student needed twice the teacher's (validation AUC 0.970 after
#: 40 epochs, 0.936 after 20). From the teacher's channels, the teacher's own epochs are a trade
#: for time: with one teacher 20 gave validation / test AUC 0.950 / 0.979 where 20 from random
#: weights gave 0.929 / 0.929; with another, 20 gave 0.935 / 0.968 where 40 from random weights
#: gave 0.978 / 0.977 (benchmarks/README.md).
DISTILL_EPOCHS_PER_TEACHER_EPOCH = {"teacher": 1, "scratch": 2}
#: How a distilled student's weights start: sliced from the teacher's most active channels, or random.
STUDENT_INITS = ("teacher", "scratch")
#: Training inputs the teacher's channels are ranked on when a student inherits them.
INHERIT_SAMPLES = 256
#: The --target-kb frontier plot, in the bundle.
FRONTIER_FILE = "frontier.png"
#: Called with each step's report row as the step ends.
StepFn = Callable[[dict[str, Any]], None]
#: int8 whose flips exceed ``max_flips`` is retried with this many leading ops in float, fewest first.
FLOAT_OP_COUNTS = (1, 2, 3)


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """What ``edgedx compress`` does; steps run in the order distill -> prune -> quantize."""

    distill: bool = False
    student: str | None = None  # None: the teacher's architecture, narrowed
    width: float | None = None  # None: the widest student deploying <= 1/8 of the teacher's (non-zero) parameters
    temperature: float = 4.0
    alpha: float = 0.3
    mixup: float = 1.0  # distillation on mixed pairs of images too, Beta(mixup, mixup) weights; 0: off
    distill_epochs: int | None = None  # None: as many as the teacher trained for, twice that from scratch
    student_init: str = "teacher"  # teacher: the teacher's most active channels (inherit.py); scratch: random
    prune: bool = False
    sparsity: float = 0.5  # of the pruned kernels; 0.75 lost 0.016 validation AUC in the main job
    structure: str = "unstructured"
    layer_sparsity: str = "erk"  # how the unstructured target is shared among layers: erk or uniform
    prune_epochs: int = 4  # 8 gave the same validation AUC from a student started from its teacher
    prune_with_teacher: bool = True  # with --distill: fine-tune the pruned student under the distillation loss
    quantize: str = "int8"
    target_kb: float | None = None  # search student width and sparsity for the best int8 model this size
    search_candidates: int = 3  # --target-kb: how many (width, sparsity) candidates to train
    device: str | None = None  # with quantize="auto": the device profile to measure candidates on
    auto_runs: int = 200  # --quantize auto: timed single-image calls per candidate and round
    auto_rounds: int = 3  # --quantize auto: rounds that each time every candidate once, in turns
    qat: bool = False
    qat_epochs: int = 3
    max_auc_drop: float = 0.01  # validation AUC, against the parent over the pipeline and per quantization
    max_sensitivity_drop: float = 0.02  # validation sensitivity, against the parent over the pipeline
    accept_loss: bool = False  # write the bundle even when the pipeline loses more than allowed
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
        if self.student_init not in STUDENT_INITS:
            raise ConfigError(f"unknown student start {self.student_init!r}; choose from {', '.join(STUDENT_INITS)}")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"unknown pruning structure {self.structure!r}; choose from {', '.join(STRUCTURES)}")
        if self.layer_sparsity not in DISTRIBUTIONS:
            raise ConfigError(f"unknown layer sparsity {self.layer_sparsity!r}; choose from {', '.join(DISTRIBUTIONS)}")
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be between 0 and 1, got {self.sparsity}")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1 or self.mixup < 0:
            raise ConfigError(
                f"need temperature > 0, alpha in [0, 1] and mixup >= 0, got {self.temperature}, {self.alpha} "
                f"and {self.mixup}"
            )
        if not 0 <= self.max_auc_drop < 1:
            raise ConfigError(f"max AUC drop must be in [0, 1), got {self.max_auc_drop}")
        if not 0 <= self.max_sensitivity_drop <= 1:
            raise ConfigError(f"max sensitivity drop must be in [0, 1], got {self.max_sensitivity_drop}")
        if not 0 <= self.max_flips < 1:
            raise ConfigError(f"max flips must be in [0, 1), got {self.max_flips}")
        counts = ("prune_epochs", "qat_epochs", "calibration_samples", "auto_runs", "auto_rounds", "search_candidates")
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.target_kb is not None and (self.target_kb <= 0 or not self.distill or self.quantize != "int8"):
            raise ConfigError(
                "--target-kb searches student width and sparsity for an int8 file: use a positive size "
                "with --distill --quantize int8 (pruning is chosen by the search)"
            )
        if not (self.distill or self.prune or self.quantize != "none"):
            raise ConfigError("nothing to do: choose at least one of --distill, --prune, --quantize")


@dataclass(frozen=True)
class CompressResult:
    bundle: Bundle | None  # None on a worker of a multi-worker job that is not the chief
    steps: list[dict[str, Any]]
    seconds: float


@dataclass(kw_only=True)
class _Stage:
    """The model as it leaves a step: a Keras model or a converted (TFLite or ONNX) one, its threshold and scores."""

    name: str
    keras_model: Any
    threshold: float | None
    scores: dict[str, np.ndarray]
    arch: ArchRecord  # name, width and kernel sparsity; its counts are filled in when written
    converted: ConvertedModel | None = None  # a converted stage: the TFLite or ONNX model it deploys
    float32: ConvertedModel | None = None  # a Keras stage's float32 TFLite, converted once (size, deployment)
    notes: list[str] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)  # the step report, filled in by _Run.stage
    auto_precision: dict[str, Any] | None = None  # --quantize auto: every candidate and the choice


def _gzip_size(content: bytes) -> int:
    return len(gzip.compress(content, compresslevel=9))


def _converted_scores(model: ConvertedModel, data: PreparedData, activation: str) -> dict[str, np.ndarray]:
    """A converted model's validation and test probabilities, computed by the runtime that deploys it."""
    from ..runtime import open_runner

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{PRECISIONS[model.precision].suffix}"
        path.write_bytes(model.content)
        runner = open_runner(path, model.precision, input_record=model.input, output_record=model.output)
        return {
            s: probabilities(np.concatenate([runner.logits(b) for b in input_batches(data.x[s], 256)]), activation)
            for s in ("val", "test")
        }


def _matching_threshold(
    scores_val: np.ndarray, reference_val: np.ndarray, reference_threshold: float | None
) -> float | None:
    """The threshold at which a model's validation decisions agree most with a reference model's.

    Every compressed model keeps the operating point of the model it replaces this way: the
    distilled or pruned student that of the parent bundle, a quantized model that of its float
    model. Quantization can shift every score a little; keeping the float threshold then flipped
    11.9% of test cases for the default head-CT model at an AUC cost of only 0.006. Choosing a
    student's threshold afresh (Youden's J) traded sensitivity for specificity against its parent.
    Ties go to the candidate closest to the reference threshold. Validation data only.
    """
    if scores_val.ndim != 1 or reference_threshold is None:
        return reference_threshold
    wanted = decisions(reference_val, reference_threshold).astype(bool)
    order = np.argsort(scores_val, kind="stable")
    ranked, wanted_ranked = scores_val[order], wanted[order]
    positives_below = np.concatenate([[0], np.cumsum(wanted_ranked)])  # reference positives among the i lowest
    candidates = np.unique(np.append(scores_val, reference_threshold))
    below = np.searchsorted(ranked, candidates, side="left")  # cases a candidate calls negative
    # agreement = reference positives at or above the candidate + reference negatives below it
    agreement = (positives_below[-1] - positives_below[below]) + (below - positives_below[below])
    best = np.flatnonzero(agreement == agreement.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - reference_threshold))]])


def _validation_flips(scores_val: np.ndarray, float_stage: _Stage) -> float:
    """The fraction of validation decisions a quantized model changes, at its matched threshold."""
    wanted = decisions(float_stage.scores["val"], float_stage.threshold)
    matched = _matching_threshold(scores_val, float_stage.scores["val"], float_stage.threshold)
    return float(np.mean(decisions(scores_val, matched) != wanted))


@dataclass(frozen=True)
class _Int8Candidate:
    model: ConvertedModel
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

    def measured(model: ConvertedModel) -> _Int8Candidate:
        scores = _converted_scores(model, prepared, activation)
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


def _pruned(arch: ArchRecord) -> bool:
    """Whether a stage's network was pruned (the prune step records its kernel sparsity): such
    models are converted to TFLite's sparse tensor encoding."""
    return arch.kernel_sparsity is not None


def _row(stage: _Stage, run: _Run, seconds: float) -> dict:
    from ..models import count_macs, count_parameters

    params, nonzero = count_parameters(stage.keras_model)
    content = (stage.converted or stage.float32).content
    data, seed = run.data, run.config.seed
    measured = {
        s: clinical.evaluate(data.y[s], stage.scores[s], stage.threshold, resamples=200, seed=seed)
        for s in ("val", "test")
    }
    flips = float(np.mean(decisions(stage.scores["test"], stage.threshold) != run.parent_decisions))
    return {
        "step": stage.name,
        "format": role_of(stage.converted.precision) if stage.converted else "keras (size as float32 TFLite)",
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


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What every step reads: the settings, the parent and its data, and where progress goes."""

    config: CompressConfig
    parent: Bundle
    teacher: Any
    data: PreparedData
    augmentation: Augmentation
    train_config: TrainConfig
    parent_scores: dict[str, np.ndarray]  # the parent's (uncalibrated) validation and test scores
    parent_threshold: float | None  # on those scores
    strategy: Any  # MultiWorkerMirroredStrategy under TF_CONFIG, else TensorFlow's default
    progress: ProgressFn | None = None
    on_epoch: EpochFn | None = None
    on_step: StepFn | None = None  # every step, --target-kb candidates' too

    @property
    def activation(self) -> str:
        return self.parent.manifest.task.activation

    @functools.cached_property
    def mirrored_teacher(self):
        """The teacher as students train against it: its variables mirrored on every worker of a
        cluster (``teacher`` itself on one machine). Scores and channel ranking use ``teacher``."""
        return distributed.mirrored_copy(self.strategy, self.teacher)

    @functools.cached_property
    def parent_decisions(self) -> np.ndarray:
        """The parent's test decisions, which every step's flips count against."""
        return decisions(self.parent_scores["test"], self.parent_threshold)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.y["train"]) / self.train_config.batch_size)

    def train(
        self, model, *, epochs: int, callbacks: list | None = None, select_from_epoch: int = 1, **changes
    ) -> None:
        """Train with the parent's recipe, ``epochs`` and any other ``changes`` to it."""
        fit(
            model,
            self.data,
            replace(self.train_config, epochs=epochs, **changes),
            activation=self.activation,
            augmentation=self.augmentation,
            progress=self.progress,
            on_epoch=self.on_epoch,
            callbacks=callbacks,
            select_from_epoch=select_from_epoch,
        )

    def scores(self, model) -> dict[str, np.ndarray]:
        return {s: predict_scores(model, self.data.x[s], self.activation) for s in ("val", "test")}

    @functools.cached_property
    def calibration_inputs(self) -> np.ndarray:
        """The training inputs every quantization of this run calibrates on (drawn once)."""
        from .quantize import representative_samples

        return representative_samples(self.data.x["train"], self.config.calibration_samples, self.config.seed)

    def stage(self, name: str, began: float, **fields: Any) -> _Stage:
        """A step's result with its report row (measured now, timed from ``began``).

        A Keras stage is converted to float32 TFLite here, once: in the sparse encoding it would
        deploy with, for its size in the report and, for the last one, the bundle.
        """
        from .quantize import convert

        stage = _Stage(name=name, **fields)
        if stage.converted is None:
            stage.float32 = convert(stage.keras_model, "float32", sparse=_pruned(stage.arch))
        stage.row = _row(stage, self, time.perf_counter() - began)
        if self.on_step and name != "parent":
            self.on_step(stage.row)
        return stage

    def keras_stage(self, name: str, model, arch: ArchRecord, began: float, notes: list[str]) -> _Stage:
        scores = self.scores(model)
        threshold = _matching_threshold(scores["val"], self.parent_scores["val"], self.parent_threshold)
        return self.stage(name, began, keras_model=model, threshold=threshold, scores=scores, arch=arch, notes=notes)


def compress(
    parent: Path | str,
    out: Path | str,
    config: CompressConfig = CompressConfig(),
    *,
    data: Path | str | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    on_step: StepFn | None = None,
    overwrite: bool = False,
) -> CompressResult:
    """Compress a trained bundle and write the result as a new bundle.

    The parent's float Keras model is the reference: every step reports its size, speed-relevant
    counts, validation and test metrics and decision flips against it, and the whole pipeline is
    held to ``config.max_auc_drop`` and ``config.max_sensitivity_drop`` against it on validation
    data. Choices (thresholds, the accuracy guard) use validation data only; test data is
    reported, never tuned on.

    Args:
        parent: A bundle written by ``edgedx train``.
        out: Bundle folder to create.
        config: Which steps, and their settings.
        data: Training data to fine-tune on; default: the source the parent records.
        on_step: Called with each step's report row as the step ends.

    Raises:
        CompressionRefused: the result loses more validation AUC or sensitivity than allowed
            against the parent (and ``config.accept_loss`` is not set); nothing is written.
    """
    from .._tf import keras, tf

    start = time.perf_counter()
    out = Path(out)
    cluster = distributed.cluster_from_env()
    writes = cluster is None or cluster.chief  # several workers may share one --out: the chief writes it
    if writes and out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or remove it first")
    if cluster is not None and config.target_kb is not None:
        raise ConfigError("--target-kb searches on one machine; run it without TF_CONFIG")
    parent_bundle = read_bundle(parent)
    manifest = parent_bundle.manifest
    if "keras" not in manifest.models or manifest.arch is None or manifest.training is None:
        raise ConfigError(f"{parent_bundle.path}: compress needs the float Keras model of a trained bundle")
    if manifest.task.kind == "multilabel" and (config.distill or config.prune or config.quantize == "auto"):
        raise ConfigError(
            f"{parent_bundle.path} is a multi-label model: compress quantizes it (--quantize int8, float16, "
            "dynamic) but does not distill, prune or choose a precision for it yet"
        )
    dataset = recorded_dataset(manifest.data or {}, data)
    prepared = prepare_data(dataset, parent_bundle.preprocess, progress)
    strategy = distributed.strategy(cluster)  # before TensorFlow makes any tensor
    recipe = manifest.training.config
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    teacher = keras.models.load_model(parent_bundle.model_path("keras"), compile=False)
    # Every stage works on uncalibrated scores (calibration is fitted at the end); the parent's
    # threshold is on its calibrated ones, so it is mapped back (the decisions are the same).
    parent_threshold = parent_bundle.calibration("keras").uncalibrated_threshold(parent_bundle.threshold)
    parent_scores = {s: predict_scores(teacher, prepared.x[s], manifest.task.activation) for s in ("val", "test")}
    run = _Run(
        config=config,
        parent=parent_bundle,
        teacher=teacher,
        data=prepared,
        augmentation=dataset.augmentation,
        train_config=TrainConfig(**{**recipe, "windows": tuple(recipe["windows"])}),
        parent_scores=parent_scores,
        parent_threshold=parent_threshold,
        strategy=strategy,
        progress=progress,
        on_epoch=on_epoch,
        on_step=on_step,
    )
    stages = [
        run.stage(
            "parent",
            time.perf_counter(),
            keras_model=teacher,
            threshold=parent_threshold,
            scores=parent_scores,
            # a parent pruned before keeps its sparsity, and its conversions the sparse encoding
            arch=ArchRecord(
                name=manifest.arch.name, width=manifest.arch.width, kernel_sparsity=manifest.arch.kernel_sparsity
            ),
        )
    ]

    if config.target_kb is None:  # every worker of a cluster trains the students
        for wanted, step in ((config.distill, _distill), (config.prune, _prune)):
            if wanted:
                stages.append(step(run, stages[-1]))
    if not writes:  # conversion, measurement and the bundle are the chief's
        distributed.barrier(strategy)  # until the chief has written the bundle (or failed)
        return CompressResult(bundle=None, steps=[s.row for s in stages[1:]], seconds=time.perf_counter() - start)
    try:
        search = None
        if config.target_kb is not None:  # refused on a cluster above
            chosen, search = _search_under_budget(run, stages[0])
            stages += chosen
        else:
            for wanted, step in (
                (config.quantize == "auto", _auto_precision),
                (config.quantize not in ("auto", "none"), _quantize),
            ):
                if wanted:
                    stages.append(step(run, stages[-1]))
        float_stage = next(s for s in reversed(stages) if s.converted is None)
        loss = _loss_against_parent(run, [s.row for s in stages])
        return _write(
            out,
            run=run,
            stages=stages,
            float_stage=float_stage,
            loss=loss,
            search=search,
            seconds=time.perf_counter() - start,
            overwrite=overwrite,
            workers=cluster.workers if cluster else 1,
        )
    finally:
        distributed.barrier(strategy)  # the other workers may exit now, refused or written


@dataclass(frozen=True)
class _Search:
    """What ``--target-kb`` tried: every trained candidate's figures, the choice, and the frontier plot."""

    record: dict[str, Any]
    frontier_png: bytes


def _search_under_budget(run: _Run, parent: _Stage) -> tuple[list[_Stage], _Search]:
    """Distill, prune and quantize to int8 each (width, sparsity) sized to fit ``config.target_kb``;
    keep the candidate with the best validation AUC among those within the budget and the guard's
    limits (or, if none is within the limits, the best within the budget, which the guard then refuses).
    """
    from .search import plot_frontier, sized_candidates, spread

    config = run.config
    budget = int(config.target_kb * 1024)
    arch = config.student or parent.arch.name
    sized = sized_candidates(
        run.teacher,
        arch,
        len(run.parent.class_names),
        budget_bytes=budget,
        calibration=run.calibration_inputs,
    )
    if not sized:
        raise CompressionRefused(
            f"no {arch} student fits --target-kb {config.target_kb:g} as int8, even at 90% sparsity; "
            "raise the budget or give a smaller --student"
        )
    trained, rows = [], []
    for candidate in spread(sized, config.search_candidates):
        settings = replace(
            config, width=candidate.width, prune=candidate.sparsity > 0, sparsity=candidate.sparsity or config.sparsity
        )
        trial = replace(run, config=settings)
        stages = [_distill(trial, parent)]
        if candidate.sparsity:
            stages.append(_prune(trial, stages[-1]))
        stages.append(_quantize(trial, stages[-1]))
        final = stages[-1].row
        rows.append(
            {
                "width": candidate.width,
                "sparsity": candidate.sparsity,
                "parameters": candidate.parameters,
                "nonzero_parameters": final["nonzero_parameters"],
                "predicted_bytes": candidate.predicted_bytes,
                "bytes": final["bytes"],
                "val_auc": final["val"]["auc"],
                "val_sensitivity": final["val"]["sensitivity"],
                "test_auc": final["test"]["auc"],
                "within_budget": final["bytes"] <= budget,
                "within_limits": not _over_limits(parent.row["val"], final["val"], config),
                "seconds": round(sum(s.row["seconds"] for s in stages), 1),
            }
        )
        trained.append(stages)
    fitting = [i for i, r in enumerate(rows) if r["within_budget"]]
    if not fitting:
        sizes = ", ".join(f"{r['bytes']:,} B (sized at {r['predicted_bytes']:,} B)" for r in rows)
        raise CompressionRefused(
            f"every candidate came out over --target-kb {config.target_kb:g} once trained ({sizes}); no bundle written"
        )
    passing = [i for i in fitting if rows[i]["within_limits"]] or fitting
    chosen = max(passing, key=lambda i: rows[i]["val_auc"])
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_frontier(
            rows,
            target_kb=config.target_kb,
            parent_val_auc=parent.row["val"]["auc"],
            chosen=chosen,
            path=Path(tmp) / "frontier.png",
        ).read_bytes()
    record = {"target_kb": config.target_kb, "candidates": rows, "chosen": chosen, "plot": FRONTIER_FILE}
    return trained[chosen], _Search(record=record, frontier_png=png)


def _distill(run: _Run, current: _Stage) -> _Stage:
    """Knowledge distillation from the parent into a narrower student (``distill.py``)."""
    from . import distill as distillation
    from .inherit import NotInheritable, inherit_channels
    from .quantize import representative_samples

    began, config = time.perf_counter(), run.config
    arch = config.student or current.arch.name
    student, width = distillation.choose_student(
        run.teacher,
        arch,
        len(run.parent.class_names),
        width=config.width,
        deployed_parameters=functools.partial(_nonzero_after_pruning, config=config) if config.prune else None,
    )
    start, how = "scratch", "from random weights"
    if config.student_init == "teacher":
        try:
            sample = representative_samples(run.data.x["train"], INHERIT_SAMPLES, config.seed)
            inherit_channels(run.teacher, student, sample)
            start, how = "teacher", "from the teacher's most active channels"
        except NotInheritable as reason:
            how = f"from random weights ({reason})"
    with run.strategy.scope():  # on a cluster every worker trains the same student
        trainee = distributed.mirrored_copy(run.strategy, student)
        trainer = distillation.distiller(
            run.mirrored_teacher, trainee, temperature=config.temperature, alpha=config.alpha, mixup=config.mixup
        )
    epochs = config.distill_epochs or DISTILL_EPOCHS_PER_TEACHER_EPOCH[start] * run.train_config.epochs
    run.train(trainer, epochs=epochs)
    student = distributed.local_model(trainee)  # on every worker
    mixed = f", mixup {config.mixup:g}" if config.mixup else ""
    notes = [
        f"student {arch} width {width} {how}, T={config.temperature}, alpha={config.alpha}{mixed}, {epochs} epochs"
    ]
    return run.keras_stage("distill", student, ArchRecord(name=arch, width=width), began, notes)


def _nonzero_after_pruning(model, *, config: CompressConfig) -> int:
    """The parameters ``model`` keeps non-zero once pruned as ``config`` says (what it deploys)."""
    from ..models import count_parameters
    from .prune import layer_sparsities

    targets = layer_sparsities(
        model, sparsity=config.sparsity, structure=config.structure, distribution=config.layer_sparsity
    )
    zeroed = sum(round(model.get_layer(name).kernel.shape.num_elements() * target) for name, target in targets.items())
    return count_parameters(model)[0] - zeroed


def _prune(run: _Run, current: _Stage) -> _Stage:
    """Magnitude pruning to ``config.sparsity`` with fine-tuning (``prune.py``)."""
    from . import distill as distillation
    from . import prune as pruning

    began, config = time.perf_counter(), run.config
    # On by default since distillation gained mixup: on the head-CT student, validation AUC 0.973
    # against 0.949 fine-tuned on the labels (benchmarks/README.md).
    with_teacher = config.distill and config.prune_with_teacher
    with run.strategy.scope():  # on a cluster every worker prunes the same model
        wrapped, callbacks, end_step = pruning.prunable(
            distributed.mirrored_copy(run.strategy, current.keras_model),
            sparsity=config.sparsity,
            structure=config.structure,
            steps=config.prune_epochs * run.steps_per_epoch,
            distribution=config.layer_sparsity,
        )
        trainee = (
            distillation.distiller(
                run.mirrored_teacher, wrapped, temperature=config.temperature, alpha=config.alpha, mixup=config.mixup
            )
            if with_teacher
            else wrapped
        )
    run.train(
        trainee,
        epochs=config.prune_epochs,
        patience=config.prune_epochs,
        learning_rate=run.train_config.learning_rate / 5,
        callbacks=callbacks,
        select_from_epoch=math.ceil(end_step / run.steps_per_epoch) + 1,
    )
    with run.strategy.scope():
        stripped = pruning.strip(wrapped)
    stripped = distributed.local_model(stripped)  # on every worker, outside the scope: a local copy
    achieved = pruning.kernel_sparsity(stripped)
    shared = f" ({config.layer_sparsity} over layers)" if config.structure == "unstructured" else ""
    notes = [f"{config.structure}{shared} to {config.sparsity:.0%}: {achieved:.1%} of kernel weights are zero"]
    notes.append("fine-tuned under the distillation loss" if with_teacher else "fine-tuned on the labels")
    return run.keras_stage("prune", stripped, replace(current.arch, kernel_sparsity=achieved), began, notes)


def _quantize(run: _Run, current: _Stage) -> _Stage:
    """Post-training quantization to ``config.quantize``; int8 that loses more than ``max_auc_drop``
    against its float model is retried with quantization-aware training."""
    from .quantize import convert, quantization_aware

    began, config = time.perf_counter(), run.config
    float_model, sparse = current.keras_model, _pruned(current.arch)
    calibration = run.calibration_inputs
    reference_auc = clinical.auc(run.data.y["val"], current.scores["val"])

    def converted(model) -> tuple[ConvertedModel, dict[str, np.ndarray], float]:
        q = convert(model, config.quantize, calibration, sparse=sparse)
        scores = _converted_scores(q, run.data, run.activation)
        return q, scores, reference_auc - clinical.auc(run.data.y["val"], scores["val"])

    notes: list[str] = []
    if config.quantize == "int8" and not config.qat:
        chosen, notes = _post_training_int8(float_model, calibration, current, run.data, run.activation, config)
        deploy, scores, drop = chosen.model, chosen.scores, chosen.auc_drop
    elif not config.qat:
        deploy, scores, drop = converted(float_model)
        notes.append(f"post-training {config.quantize}: validation AUC drop {drop:+.4f}")
    if config.quantize == "int8" and (config.qat or drop > config.max_auc_drop):
        qat_model = quantization_aware(float_model, preserve_sparsity=config.prune)
        run.train(
            qat_model,
            epochs=config.qat_epochs,
            patience=config.qat_epochs,
            learning_rate=run.train_config.learning_rate / 10,
        )
        deploy, scores, drop = converted(qat_model)
        kind = "sparsity-preserving QAT" if config.prune else "QAT"
        zeros = f", {kernel_sparsity(qat_model):.1%} of kernel weights zero" if config.prune else ""
        notes.append(f"{kind} {config.qat_epochs} epochs: validation AUC drop {drop:+.4f}{zeros}")
    return run.stage(
        f"quantize-{config.quantize}",
        began,
        keras_model=float_model,
        threshold=_matching_threshold(scores["val"], current.scores["val"], current.threshold),
        scores=scores,
        arch=current.arch,
        converted=deploy,
        notes=notes,
    )


def _loss_against_parent(run: _Run, rows: list[dict[str, Any]]) -> LossRecord:
    """What the whole pipeline cost against the parent bundle on validation data; refuses too much.

    Each step is also compared with the model it came from, but only this comparison sees the
    losses add up: the default head-CT pipeline once lost 0.048 test AUC over three steps that
    each passed their own check.
    """
    config, parent, final = run.config, rows[0], rows[-1]
    drops = {
        split: {k: parent[split][k] - final[split][k] for k in ("auc", "sensitivity")} for split in ("val", "test")
    }
    limits = _limits(config)
    over = _over_limits(parent["val"], final["val"], config)
    record = LossRecord(
        parent=run.parent.name,
        val_auc_drop=drops["val"]["auc"],
        val_sensitivity_drop=drops["val"]["sensitivity"],
        test_auc_drop=drops["test"]["auc"],
        test_sensitivity_drop=drops["test"]["sensitivity"],
        max_auc_drop=config.max_auc_drop,
        max_sensitivity_drop=config.max_sensitivity_drop,
        within_limits=not over,
        loss_accepted=bool(over) and config.accept_loss,
    )
    if over and not config.accept_loss:
        what = " and ".join(
            f"{drops['val'][k]:.4f} validation {'AUC' if k == 'auc' else k} ({parent['val'][k]:.4f} -> "
            f"{final['val'][k]:.4f}; limit --max-{k}-drop {limits[k]})"
            for k in over
        )
        raise CompressionRefused(
            f"the compressed model loses {what} against {run.parent.name}; no bundle written. "
            f"What each step cost:\n{steps_cost_table(rows)}\n"
            "Try gentler steps (less --sparsity, a wider --width, more --distill-epochs), or write it "
            "anyway with --accept-loss (the manifest records the loss)"
        )
    return record


def _limits(config: CompressConfig) -> dict[str, float]:
    return {"auc": config.max_auc_drop, "sensitivity": config.max_sensitivity_drop}


def _over_limits(parent_val: dict[str, float], final_val: dict[str, float], config: CompressConfig) -> list[str]:
    """The validation figures (``auc``, ``sensitivity``) that dropped more than the config allows."""
    return [
        k
        for k, limit in _limits(config).items()
        if np.isfinite(parent_val[k] - final_val[k]) and parent_val[k] - final_val[k] > limit + 1e-12
    ]


def steps_cost_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of each step's validation AUC and sensitivity and the drop from the parent."""
    parent = rows[0]["val"]
    lines = [f"{'step':<16} {'val AUC':>8} {'drop':>8} {'val sens':>8} {'drop':>8} {'non-zero':>10}"]
    for row in rows:
        v = row["val"]
        lines.append(
            f"{row['step']:<16} {v['auc']:>8.4f} {parent['auc'] - v['auc']:>+8.4f} {v['sensitivity']:>8.4f} "
            f"{parent['sensitivity'] - v['sensitivity']:>+8.4f} {row['nonzero_parameters']:>10,}"
        )
    return "\n".join(lines)


def _candidate_bundle(folder: Path, model: ConvertedModel, parent: Manifest, threshold: float | None) -> Path:
    """A minimal bundle around one converted candidate, so the device probe can load it like any bundle."""
    role = role_of(model.precision)
    manifest = Manifest(
        name=f"candidate-{model.precision}",
        task=parent.task,
        input=parent.input,
        preprocess=parent.preprocess,
        threshold=replace(parent.threshold, value=threshold),
        deploy=role,
        models={role: ModelRecord(input=model.input, output=model.output, threshold=threshold)},
    )
    file = folder / f"{model.precision}{PRECISIONS[model.precision].suffix}"
    file.write_bytes(model.content)
    return write_bundle(folder / manifest.name, manifest, models={role: file}).path


def _auto_precision(run: _Run, current: _Stage) -> _Stage:
    """Convert to every precision, measure each on the device, keep the fastest that passes the guard:
    its own AUC drop within ``max_auc_drop``, and the whole pipeline within its limits against the
    parent (which a faster precision losing one more positive case could otherwise break).

    Latency is measured as the device profile says (the same probe ``edgedx bench`` uses), on
    validation inputs, in ``auto_rounds`` rounds that each measure every candidate once, in turns.
    The stage's ``auto_precision`` holds every candidate's figures and the reason for the choice.
    """
    began, config, prepared = time.perf_counter(), run.config, run.data
    profile = load_profile(config.device)
    reference_auc = clinical.auc(prepared.y["val"], current.scores["val"])
    parent_val = _val_figures(run, run.parent_scores["val"], run.parent_threshold)
    candidates, models = [], {}
    formats, unavailable = auto_candidates(profile)
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for precision in formats:
            model, scores = _auto_candidate(run, current, precision)
            threshold = _matching_threshold(scores["val"], current.scores["val"], current.threshold)
            val = _val_figures(run, scores["val"], threshold)
            bundles[precision] = _candidate_bundle(Path(tmp), model, run.parent.manifest, threshold)
            models[precision] = (model, scores, threshold)
            candidates.append(
                {
                    "precision": precision,
                    "bytes": len(model.content),
                    **({"float_ops": list(model.float_ops)} if model.float_ops else {}),
                    "val_auc_drop": reference_auc - val["auc"],
                    "pipeline_val_drop": {k: round(parent_val[k] - val[k], 6) for k in val},
                    "over_pipeline_limits": _over_limits(parent_val, val, config),
                }
            )
        inputs = Path(tmp) / "val.npy"  # the probe times its first LATENCY_SAMPLE inputs; auto needs no more
        np.save(inputs, prepared.x["val"][:LATENCY_SAMPLE])
        timings = _latency_rounds(bundles, inputs, profile, runs=config.auto_runs, rounds=config.auto_rounds)
    for candidate in candidates:
        candidate |= timings[candidate["precision"]]
    winner, reason = _auto_choice(candidates, config, profile)
    record = {"device": profile.to_dict(), "runs": config.auto_runs, "rounds": config.auto_rounds}
    record |= {"candidates": candidates, "not_measured": unavailable, "winner": winner["precision"], "reason": reason}
    model, scores, threshold = models[winner["precision"]]
    return run.stage(
        f"quantize-auto:{model.precision}",
        began,
        keras_model=current.keras_model,
        threshold=threshold,
        scores=scores,
        arch=current.arch,
        converted=model,
        notes=[reason, *unavailable],
        auto_precision=record,
    )


def auto_candidates(profile: DeviceProfile) -> tuple[list[str], list[str]]:
    """The formats ``--quantize auto`` measures for a device, and why the others are not measured.

    A format is a candidate when the device profile lists its engine and this machine can convert
    to it and run it (ONNX needs tf2onnx and onnxruntime). float32 TFLite always is: it always
    passes the guard.
    """
    formats, unavailable = [], []
    for precision in PRECISIONS.values():
        missing = [m for m in ENGINE_MODULES[precision.engine] if importlib.util.find_spec(m) is None]
        if precision.name != "float32" and precision.engine not in profile.engines:
            unavailable.append(f"{precision.name} not measured: the {profile.name} profile has no {precision.engine}")
        elif missing:
            unavailable.append(f"{precision.name} not measured: {' and '.join(missing)} not installed here")
        else:
            formats.append(precision.name)
    return formats, unavailable


def _auto_choice(
    candidates: list[dict[str, Any]], config: CompressConfig, device: DeviceProfile
) -> tuple[dict[str, Any], str]:
    """The candidate ``--quantize auto`` deploys, and why; marks each candidate's ``passes_guard``
    and the device budgets (latency, memory, size) it misses.

    Of the candidates that pass the accuracy guard, those within the device's budgets compete; if
    none is, all that pass the guard do (``edgedx bench`` then reports the budget missed).
    """
    # A quantized candidate must keep the pipeline within its limits against the parent, unless the
    # float model it was converted from does not: then only its own AUC drop is held to the limit.
    float_within = not next(c for c in candidates if c["precision"] == "float32")["over_pipeline_limits"]
    for c in candidates:
        c["passes_guard"] = c["precision"] == "float32" or (
            c["val_auc_drop"] <= config.max_auc_drop and not (float_within and c["over_pipeline_limits"])
        )
        c["budgets_missed"] = device.check(
            device_figures(latency_p95_ms=c["p95_ms"], peak_rss_mb=c["peak_rss_mb"], model_bytes=c["bytes"])
        )
    passing = [c for c in candidates if c["passes_guard"]]
    within_budgets = [c for c in passing if not c["budgets_missed"]]
    winner, tied = _fastest_then_smallest(within_budgets or passing)
    ranked = ", ".join(f"{c['precision']} {c['p50_ms']:.3f} ms" for c in sorted(candidates, key=lambda c: c["p50_ms"]))
    refused = [_refusal(c, config) for c in candidates if not c["passes_guard"]]
    pool = "the formats that pass the accuracy guard" + (" and meet its budgets" if within_budgets else "")
    where = f"{device.name} ({device.regime})"
    choice = (
        f"{winner['precision']} is the smallest of {', '.join(c['precision'] for c in tied)}, which the fastest "
        f"did not beat by more than {LATENCY_TIE:.0%} in all {config.auto_rounds} rounds on {where}"
        if len(tied) > 1
        else f"{winner['precision']} is the fastest on {where}"
    )
    refusals = f"; refused for accuracy: {', '.join(refused)}" if refused else ""
    over = [f"{c['precision']} ({'; '.join(c['budgets_missed'])})" for c in passing if c["budgets_missed"]]
    if over:
        refusals += f"; {'over' if within_budgets else 'all over'} the {device.name} budgets: {', '.join(over)}"
    reason = f"{choice}, of {pool} (median latency: {ranked}){refusals}"
    return winner, reason


def _auto_candidate(run: _Run, current: _Stage, precision: str) -> tuple[ConvertedModel, dict[str, np.ndarray]]:
    """``current`` converted to ``precision`` as ``compress --quantize`` would keep it, and its scores."""
    from .quantize import convert

    if precision == "int8":  # with the float-op retries of --quantize int8
        chosen, _ = _post_training_int8(
            current.keras_model, run.calibration_inputs, current, run.data, run.activation, run.config
        )
        return chosen.model, chosen.scores
    if precision == "float32":
        model = current.float32
    else:  # every candidate stored like the float32 one
        model = convert(current.keras_model, precision, run.calibration_inputs, sparse=current.float32.sparse)
    return model, _converted_scores(model, run.data, run.activation)


def _refusal(candidate: dict[str, Any], config: CompressConfig) -> str:
    """Why ``--quantize auto`` did not deploy a candidate."""
    if candidate["val_auc_drop"] > config.max_auc_drop:
        return f"{candidate['precision']} (validation AUC {-candidate['val_auc_drop']:+.4f} against the float model)"
    return f"{candidate['precision']} (the pipeline's {' and '.join(candidate['over_pipeline_limits'])} over its limit)"


def _val_figures(run: _Run, scores: np.ndarray, threshold: float | None) -> dict[str, float]:
    """Validation AUC and sensitivity of ``scores``, the figures the pipeline's limits are on."""
    figures = clinical.evaluate(run.data.y["val"], scores, threshold, resamples=0)  # no interval needed
    return {k: figures[k] for k in ("auc", "sensitivity")}


def _latency_rounds(
    bundles: dict[str, Path], inputs: Path, profile: DeviceProfile, *, runs: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Single-image latency of each candidate bundle, ``runs`` calls per round, the candidates in turns.

    Each round starts the order one candidate later, so none is always measured first or last; a
    drift of the machine's speed then falls on every candidate, not on one. Per candidate: the
    latency summary over all rounds, the median of each round, and the peak RSS.
    """
    names = list(bundles)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    round_p50: dict[str, list[float]] = {name: [] for name in names}
    peak_rss: dict[str, float] = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            probe = run_probe(
                "edgedx.runtime.probe",
                bundle=bundles[name],
                role=role_of(name),
                inputs=inputs,
                threads=profile.threads,
                workers=profile.workers,
                cpu_affinity=profile.cpu_affinity,
                memory_limit_mb=profile.memory_limit_mb,
                runs=runs,
            )
            latencies[name] += probe["latency_ms"]
            round_p50[name].append(round(float(np.median(probe["latency_ms"])), 4))
            peak_rss[name] = max(peak_rss[name], probe["peak_rss_mb"])
    return {
        name: {k: round(v, 4) for k, v in summarize_latency(latencies[name]).items()}
        | {"round_p50_ms": round_p50[name], "peak_rss_mb": round(peak_rss[name], 1)}
        for name in names
    }


def _fastest_then_smallest(passing: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The candidate to deploy, and those the fastest did not beat by more than ``LATENCY_TIE`` in every round.

    The fastest is the one with the lowest median over all rounds. A larger file is worth deploying
    only if it is faster in every round by more than the tie; otherwise the difference is the
    machine's noise, and among the tied candidates the smallest file wins.
    """
    fastest = min(passing, key=lambda c: c["p50_ms"])

    def tied_with_fastest(c: dict[str, Any]) -> bool:
        rounds = zip(c["round_p50_ms"], fastest["round_p50_ms"], strict=True)
        return any(mine <= best * (1 + LATENCY_TIE) for mine, best in rounds)

    tied = [c for c in passing if tied_with_fastest(c)]
    return min(tied, key=lambda c: (c["bytes"], c["p50_ms"])), tied


def _write(
    out: Path,
    *,
    run: _Run,
    stages: list[_Stage],
    float_stage: _Stage,
    loss: LossRecord,
    search: _Search | None,
    seconds: float,
    overwrite: bool,
    workers: int = 1,
) -> CompressResult:
    from ..models import count_macs, count_parameters

    parent, manifest, config, prepared = run.parent, run.parent.manifest, run.config, run.data
    final, float_tflite = stages[-1], float_stage.float32
    deploy = final.converted or float_tflite
    rows = [s.row for s in stages]
    float_model = float_stage.keras_model
    float_calibration, deploy_calibration = _calibrations(run, float_stage, final, deploy)
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
    deploy_role = role_of(deploy.precision)
    float_record = ModelRecord(threshold=float_threshold, calibration=float_calibration)
    body = replace(
        manifest,
        name=out.name,
        arch=replace(final.arch, parameters=params, nonzero_parameters=nonzero, macs=count_macs(float_model)),
        threshold=replace(manifest.threshold, value=deploy_threshold),
        deploy=deploy_role,
        metrics=metrics,
        compression=CompressionRecord(
            parent=parent.parent_record(),
            config=asdict(config),
            data_matches_parent=same_data(prepared.fingerprints["train"], manifest.train_fingerprint),
            steps=tuple(rows),
            loss_against_parent=loss,
            search=search.record if search else None,
            seconds=round(seconds, 1),
            auto_precision=final.auto_precision,
            workers=workers,
        ),
        models={
            "keras": float_record,
            "tflite-float32": replace(
                float_record, input=float_tflite.input, output=float_tflite.output, sparse_encoding=float_tflite.sparse
            ),
            deploy_role: ModelRecord(
                input=deploy.input,
                output=deploy.output,
                threshold=deploy_threshold,
                calibration=deploy_calibration,
                sparse_encoding=deploy.sparse,
                float_ops=tuple(deploy.float_ops),
            ),
        },
    )
    guard_file = (manifest.guard or {}).get("file")
    extra_files = {guard_file: (parent.path / guard_file).read_bytes()} if guard_file else {}
    if search:
        extra_files[FRONTIER_FILE] = search.frontier_png
    with tempfile.TemporaryDirectory() as tmp:
        files = {"keras": Path(tmp) / "model.keras", "tflite-float32": Path(tmp) / "model-float32.tflite"}
        float_model.save(files["keras"])
        files["tflite-float32"].write_bytes(float_tflite.content)
        if deploy_role != "tflite-float32":
            files[deploy_role] = Path(tmp) / f"model-{deploy.precision}{PRECISIONS[deploy.precision].suffix}"
            files[deploy_role].write_bytes(deploy.content)
        bundle = write_bundle(out, body, models=files, files=extra_files, overwrite=overwrite)
    return CompressResult(bundle=bundle, steps=rows, seconds=seconds)


def _calibrations(
    run: _Run, float_stage: _Stage, final: _Stage, deploy: ConvertedModel
) -> tuple[Calibration, Calibration]:
    """Calibrations of the compressed float model and of the deployed one.

    Each model made here is fitted to the validation labels on its own logits, as ``train`` fits
    the parent: Platt scaling (per label for multi-label), temperature for multi-class. The parent
    keeps its own. Fitting a compressed model onto the parent's calibrated logits instead gave
    higher held-out ECE on four main-job pairs (cross-validated over validation studies: 4 of 4;
    test: 3 of 4, mean 0.063 against 0.051; ``benchmarks/calibration_fits.py``,
    ``benchmarks/README.md``): a student that agrees with its parent on most slices still differs
    on the uncertain ones, where calibration is decided.
    """
    multilabel = run.data.y["val"].ndim == 2

    def own_fit(stage: _Stage) -> Calibration:
        if stage.name == "parent":
            return run.parent.calibration(KERAS_ROLE)
        return fit_to_labels(logits_of(stage.scores["val"], multilabel), run.data.y["val"])

    float_calibration = own_fit(float_stage)
    if deploy.precision == "float32" or final is float_stage:
        return float_calibration, float_calibration
    return float_calibration, own_fit(final)  # final's scores are the deployed model's
