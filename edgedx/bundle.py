"""Model bundles: a folder with the model file(s), ``manifest.json`` and the training history.

A bundle is self-describing: its :class:`Manifest` says how to preprocess an input
(:class:`~edgedx.preprocess.PreprocessSpec`), what the outputs mean, the decision threshold, each
model's calibration and tensor quantization, the metrics measured on validation and test data,
and the SHA-256 of every file, so the runtime needs nothing but the folder.

The manifest is typed: the dataclasses below are its schema (format version
:data:`FORMAT_VERSION`), and this module is the only one that reads or writes its JSON. Sections
that another module owns stay plain mappings and are read there: ``data`` (see
:func:`edgedx.data.recorded_dataset`), ``guard`` (:class:`edgedx.guard.InputGuard`), ``metrics``
(:func:`edgedx.metrics.evaluate`) and the recorded configs of training and compression.
Standard library and numpy only (TensorFlow-free).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .calibration import Calibration, Threshold
from .errors import BundleError, ConfigError
from .guard import InputGuard
from .preprocess import PreprocessSpec

FORMAT = "edgedx-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Section = Mapping[str, Any]  # a manifest section another module owns (data, guard, metrics, configs)


@dataclass(frozen=True, kw_only=True)
class TaskRecord:
    kind: str  # binary | multiclass | multilabel
    class_names: tuple[str, ...]
    activation: str  # sigmoid | softmax, applied by the runtime to the model's logits
    output: str = "logits"


@dataclass(frozen=True, kw_only=True)
class InputRecord:
    shape: tuple[int, ...]  # (1, S, S, C)
    dtype: str = "float32"
    modality: tuple[str, ...] | None = None  # DICOM modalities the model is for (None: any image)


@dataclass(frozen=True, kw_only=True)
class TensorRecord:
    """A deployable model's input or output tensor: type, quantization and shape (an ONNX model's
    batch is free; its records say 1, as TFLite's do)."""

    dtype: str
    scale: float = 0.0  # 0: not quantized
    zero_point: int = 0
    shape: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """One model file of the bundle; ``file``, ``sha256`` and ``bytes`` are filled in by :func:`write_bundle`."""

    file: str = ""
    sha256: str = ""
    bytes: int = 0
    threshold: Threshold = None  # on this model's calibrated probabilities (None: the manifest's)
    calibration: Calibration = field(default_factory=Calibration)
    input: TensorRecord | None = None  # deployable (TFLite, ONNX) models only
    output: TensorRecord | None = None
    sparse_encoding: bool = False  # pruned weights stored sparse in the file
    float_ops: tuple[str, ...] = ()  # ops an int8 model keeps in float


@dataclass(frozen=True, kw_only=True)
class ThresholdRecord:
    value: Threshold  # one per label for multi-label models, None for argmax (multi-class)
    policy: str  # youden | sensitivity | argmax
    target_sensitivity: float | None = None


@dataclass(frozen=True, kw_only=True)
class ArchRecord:
    name: str
    width: float | None = None
    parameters: int = 0
    nonzero_parameters: int = 0
    macs: int = 0
    kernel_sparsity: float | None = None  # pruned models


@dataclass(frozen=True, kw_only=True)
class ParentRecord:
    """The bundle a model was made from (fine-tuning, compression): its name and Keras model's SHA-256."""

    name: str
    keras_sha256: str


@dataclass(frozen=True, kw_only=True)
class TrainingRecord:
    config: Section  # the TrainConfig it was trained with
    epochs_run: int
    best_epoch: int
    seconds: float
    tensorflow: str
    workers: int = 1
    init: ParentRecord | None = None  # fine-tuned from (edgedx train --init)


@dataclass(frozen=True, kw_only=True)
class LossRecord:
    """What a compression pipeline lost against its parent bundle (drops are parent minus result)."""

    parent: str
    val_auc_drop: float
    val_sensitivity_drop: float
    test_auc_drop: float
    test_sensitivity_drop: float
    max_auc_drop: float
    max_sensitivity_drop: float
    within_limits: bool  # on validation data, against both limits
    loss_accepted: bool  # over a limit and written anyway (--accept-loss)


@dataclass(frozen=True, kw_only=True)
class CompressionRecord:
    parent: ParentRecord
    config: Section  # the CompressConfig
    data_matches_parent: bool | None  # None: the parent's fingerprint predates edgedx.data.cache's scheme
    steps: tuple[Section, ...]  # one report row per step
    seconds: float
    loss_against_parent: LossRecord | None = None
    search: Section | None = None  # --target-kb: every candidate and the choice
    auto_precision: Section | None = None  # --quantize auto: every precision measured and the choice
    workers: int = 1  # processes that trained the students together (TF_CONFIG)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a bundle says about itself; see the module docstring for the sections' owners."""

    name: str
    task: TaskRecord
    input: InputRecord
    preprocess: PreprocessSpec
    threshold: ThresholdRecord
    models: Mapping[str, ModelRecord]  # role ("keras", "tflite-int8", ...) -> its file and figures
    deploy: str | None = None  # the role the runtime loads by default
    arch: ArchRecord | None = None
    data: Section | None = None
    metrics: Mapping[str, Section] = field(default_factory=dict)  # split -> figures of the deployed model
    guard: Section | None = None
    training: TrainingRecord | None = None
    compression: CompressionRecord | None = None
    intended_use: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)  # every other file -> its SHA-256
    created: str = ""
    edgedx_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def synthetic_only(self) -> bool:
        """Whether the model was trained on the embedded synthetic data alone."""
        return bool((self.data or {}).get("synthetic"))

    @property
    def train_fingerprint(self) -> str | None:
        """SHA-256 of the training split it was trained on."""
        return ((self.data or {}).get("fingerprint") or {}).get("train")

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_dict(cls, record: Any, where: str) -> Manifest:
        """Check the format and version, then every section; :class:`BundleError` names what is wrong."""
        if not isinstance(record, Mapping) or record.get("format") != FORMAT:
            raise BundleError(f"{where}: not an edgedx bundle manifest (format is not {FORMAT!r})")
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format version {version}; this edgedx ({__version__}) reads version "
                f"{FORMAT_VERSION}, so use the edgedx that wrote it or make the bundle again"
            )
        r = _fields(cls, record, where)
        try:
            return cls._from_fields(r, where)
        except ConfigError as exc:  # the preprocessing spec's own check
            raise BundleError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:  # a field of the wrong type: "class_names": 5, "shape": "x"
            raise BundleError(f"{where}: a field has the wrong type ({exc})") from None

    @classmethod
    def _from_fields(cls, r: dict[str, Any], where: str) -> Manifest:
        plain = ("name", "deploy", "data", "guard", "intended_use", "created", "edgedx_version")
        return cls(
            **{k: r[k] for k in plain if k in r},
            task=_task(r["task"], f"{where}: task"),
            input=_input(r["input"], f"{where}: input"),
            preprocess=PreprocessSpec.from_dict(r["preprocess"]),
            threshold=ThresholdRecord(**_fields(ThresholdRecord, r["threshold"], f"{where}: threshold")),
            models={role: _model(m, f"{where}: models.{role}") for role, m in _mapping(r["models"], where).items()},
            arch=ArchRecord(**_fields(ArchRecord, r["arch"], f"{where}: arch")) if r.get("arch") else None,
            metrics=dict(r.get("metrics") or {}),
            training=_training(r["training"], f"{where}: training") if r.get("training") else None,
            compression=_compression(r["compression"], f"{where}: compression") if r.get("compression") else None,
            files=dict(r.get("files") or {}),
        )


def _encode(value: Any) -> Any:
    """A manifest (or any part of it) -> JSON-ready values; None-valued optional sections are left out."""
    if isinstance(value, (PreprocessSpec, Calibration)):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _encode(getattr(value, f.name))
            for f in fields(value)
            if getattr(value, f.name) is not None or f.default is MISSING
        }
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _mapping(record: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise BundleError(f"{where}: expected an object, found {type(record).__name__}")
    return record


def _fields(cls: type, record: Any, where: str) -> dict[str, Any]:
    """``record``'s keys checked against ``cls``'s fields: an unknown or a missing one is an error."""
    record = _mapping(record, where)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise BundleError(f"{where}: unknown field {', '.join(map(repr, unknown))} (a newer edgedx's bundle?)")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in record]
    if missing:
        raise BundleError(f"{where}: missing {', '.join(map(repr, missing))}")
    return dict(record)


def _task(record: Any, where: str) -> TaskRecord:
    r = _fields(TaskRecord, record, where)
    return TaskRecord(**{**r, "class_names": tuple(r["class_names"])})


def _input(record: Any, where: str) -> InputRecord:
    r = _fields(InputRecord, record, where)
    modality = r.get("modality")
    return InputRecord(**{**r, "shape": tuple(r["shape"]), "modality": tuple(modality) if modality else None})


def _tensor(record: Any, where: str) -> TensorRecord | None:
    if record is None:
        return None
    r = _fields(TensorRecord, record, where)
    return TensorRecord(**{**r, "shape": tuple(r.get("shape", ()))})


def _model(record: Any, where: str) -> ModelRecord:
    r = _fields(ModelRecord, record, where)
    return ModelRecord(
        **{
            **r,
            "calibration": Calibration.from_dict(r.get("calibration")),
            "input": _tensor(r.get("input"), f"{where}.input"),
            "output": _tensor(r.get("output"), f"{where}.output"),
            "float_ops": tuple(r.get("float_ops", ())),
        }
    )


def _parent(record: Any, where: str) -> ParentRecord:
    return ParentRecord(**_fields(ParentRecord, record, where))


def _training(record: Any, where: str) -> TrainingRecord:
    r = _fields(TrainingRecord, record, where)
    init = r.get("init")
    return TrainingRecord(**{**r, "init": _parent(init, f"{where}.init") if init else None})


def _compression(record: Any, where: str) -> CompressionRecord:
    r = _fields(CompressionRecord, record, where)
    loss = r.get("loss_against_parent")
    return CompressionRecord(
        **{
            **r,
            "parent": _parent(r["parent"], f"{where}.parent"),
            "steps": tuple(r["steps"]),
            "loss_against_parent": LossRecord(**_fields(LossRecord, loss, f"{where}.loss_against_parent"))
            if loss
            else None,
        }
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A model bundle on disk; build one with :func:`read_bundle` or :func:`write_bundle`."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.manifest.preprocess

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.task.class_names)

    @property
    def threshold(self) -> Threshold:
        """The decision threshold: one for binary models, one per label for multi-label, None for argmax."""
        return self.manifest.threshold.value

    def model_record(self, role: str) -> ModelRecord:
        """The manifest's record of the model with ``role`` (``keras``, ``tflite-int8``, ...)."""
        models = self.manifest.models
        if role not in models:
            raise BundleError(f"{self.path}: no {role!r} model; this bundle has {', '.join(models) or 'none'}")
        return models[role]

    def model_threshold(self, role: str) -> Threshold:
        """The threshold on the calibrated probabilities of the model with ``role``."""
        record = self.model_record(role)
        return record.threshold if record.threshold is not None else self.threshold

    def calibration(self, role: str) -> Calibration:
        """The calibration of the model with ``role`` (none recorded: identity)."""
        record = self.manifest.models.get(role)
        return record.calibration if record else Calibration()

    def load_guard(self) -> InputGuard | None:
        """The out-of-distribution guard, or None for a bundle made before guards existed."""
        summary = self.manifest.guard
        if not summary:
            return None
        path = self.path / summary.get("file", "")
        if not path.is_file():
            raise BundleError(f"{self.path}: the guard file {summary.get('file')!r} is missing")
        return InputGuard.load(summary, path.read_bytes())

    @property
    def synthetic_only(self) -> bool:
        """Whether the model was trained on the embedded synthetic data alone."""
        return self.manifest.synthetic_only

    def model_path(self, role: str) -> Path:
        """Path of the model file with ``role`` (``keras``, ``tflite-int8``, ...)."""
        return self.path / self.model_record(role).file

    def parent_record(self) -> ParentRecord:
        """How a model made from this bundle names it: its name and its Keras model's SHA-256."""
        return ParentRecord(name=self.name, keras_sha256=self.model_record("keras").sha256)

    def verify(self) -> None:
        """Check every listed file exists and matches its SHA-256; raise :class:`BundleError` if not."""
        expected = {rec.file: rec.sha256 for rec in self.manifest.models.values()}
        expected |= dict(self.manifest.files)
        for name, sha in expected.items():
            path = self.path / name
            if not path.is_file():
                raise BundleError(f"{self.path}: {name} is listed in {MANIFEST} but missing")
            actual = sha256_file(path)
            if actual != sha:
                raise BundleError(
                    f"{self.path}: {name} fails its checksum (SHA-256 {actual[:12]}..., manifest "
                    f"says {sha[:12]}...); the file was changed or truncated, re-copy the bundle"
                )


def read_bundle(path: Path | str, *, verify: bool = True) -> Bundle:
    """Open a bundle folder, check its manifest and (by default) every file's SHA-256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST})")
    try:
        record = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    bundle = Bundle(path=path, manifest=Manifest.from_dict(record, str(manifest_path)))
    if verify:
        bundle.verify()
    return bundle


def write_bundle(
    out: Path | str,
    manifest: Manifest,
    *,
    models: Mapping[str, Path],
    files: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle atomically: everything goes to a temporary folder that is renamed into place.

    Args:
        out: Bundle folder to create.
        manifest: What the bundle says of itself; each model's file name, SHA-256 and size, the
            other files' SHA-256, the creation time and the edgedx version are filled in here.
        models: Role -> model file to copy in, one for each of ``manifest.models``.
        files: Extra file name -> bytes (written as they are) or JSON-serialisable content
            (``history.json``, ...).
        overwrite: Replace an existing bundle at ``out``; otherwise an existing ``out`` is an error.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another --out or remove it first")
    if set(models) != set(manifest.models):
        raise BundleError(f"model files for {sorted(models)} but records for {sorted(manifest.models)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        records = {}
        for role, src in models.items():
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"model file for {role!r} is missing: {src}")
            dest = staging / src.name
            shutil.copy2(src, dest)
            records[role] = replace(
                manifest.models[role], file=dest.name, sha256=sha256_file(dest), bytes=dest.stat().st_size
            )
        file_records = {}
        for name, content in (files or {}).items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(json.dumps(content, indent=2) + "\n")
            file_records[name] = sha256_file(staging / name)
        written = replace(
            manifest,
            models=records,
            files=file_records,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            edgedx_version=__version__,
        )
        with open(staging / MANIFEST, "w") as f:
            f.write(json.dumps(written.to_dict(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(path=out, manifest=written)
