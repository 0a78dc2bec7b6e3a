"""Run a bundle's model with nothing but numpy, pydicom and a TFLite interpreter (or ONNX Runtime).

Everything comes from the bundle's manifest: preprocessing, quantization parameters, output
activation, threshold and class names. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset

from ..bundle import Bundle, TensorRecord, read_bundle
from ..calibration import Threshold
from ..data.dicom import image_from_dataset, read_dataset
from ..errors import BundleError, DataError
from ..guard import GuardResult, Scope
from ..outputs import decisions, probabilities
from ..precision import PRECISIONS, deployed_role, precision_of_role
from ..preprocess import PreprocessSpec, to_model_input
from ._backends import Backend, BackendUnavailable, load_backend


@dataclass(frozen=True)
class Prediction:
    """One case: probabilities, the decision, whether the input is in distribution, and step times.

    ``probabilities`` is the calibrated positive-class probability (a 0-d array) for a binary model
    and one probability per class or label (K,) otherwise. A multi-label model's ``decision`` is its
    first label's (the headline, e.g. ``any``), its ``findings`` every label over its threshold and
    its ``label`` those joined by commas (``none`` if there are none). An input the bundle's guard flags has
    ``in_distribution`` False, its ``ood_reasons``, and no ``decision`` or ``label``; one its header
    already puts out of scope (another modality or body part, a localizer, a non-axial plane) is not
    run at all, so it has no ``probabilities`` either. ``ood_score`` above 1 is out of distribution.
    ``timings_ms`` has ``read``, ``decode``, ``preprocess``, ``guard`` and ``inference`` for the
    steps the input went through.
    """

    probabilities: np.ndarray | None
    decision: int | None
    label: str | None
    threshold: float | list[float] | None
    in_distribution: bool = True
    ood_score: float | None = None
    ood_reasons: tuple[str, ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)
    findings: tuple[str, ...] = ()  # multi-label: every label at or over its threshold

    def scores(self, class_names: list[str]) -> dict[str, float]:
        """Probability per class name (binary: both classes, the negative as 1 - p); empty if not run."""
        if self.probabilities is None:
            return {}
        p = np.asarray(self.probabilities, np.float64)
        if p.ndim == 0:
            return {class_names[0]: round(1.0 - float(p), 6), class_names[1]: round(float(p), 6)}
        return {name: round(float(v), 6) for name, v in zip(class_names, p, strict=True)}


@dataclass(frozen=True)
class _Quantization:
    scale: float
    zero_point: int
    dtype: np.dtype

    @classmethod
    def from_record(cls, record: TensorRecord) -> _Quantization:
        return cls(record.scale, record.zero_point, np.dtype(record.dtype))

    @property
    def quantized(self) -> bool:
        return self.dtype.kind in "iu" and self.scale > 0


def input_batch(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Preprocessed inputs as the float32 batch (N, S, S, C) a runner takes; one (S, S, C) input is a batch of one."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.shape[1:] != tuple(input_shape[1:]):
        raise DataError(f"input has shape {x.shape[1:]}, the model takes {tuple(input_shape[1:])}")
    return x


class TFLiteRunner:
    """One TFLite model in an interpreter: quantises inputs and dequantises outputs as recorded.

    ``input_record`` and ``output_record`` are the manifest's records of the model's input and
    output tensors (type and quantization); they are checked against the interpreter.
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        input_record: TensorRecord,
        output_record: TensorRecord,
        threads: int | None = None,
        backend: str | Backend | None = None,
    ) -> None:
        chosen = backend if isinstance(backend, Backend) else load_backend(backend)
        self.backend = chosen.name
        self.path = Path(model_path)
        self._interpreter = chosen.create(str(model_path), threads)
        self._in = self._interpreter.get_input_details()[0]
        self._out = self._interpreter.get_output_details()[0]
        self._in_q = _Quantization.from_record(input_record)
        self._out_q = _Quantization.from_record(output_record)
        one = (1, *(int(d) for d in self._in["shape"][1:]))
        self._buffers = (np.empty(one, np.float32), np.empty(one, self._in_q.dtype))
        if self._in_q.quantized:
            info = np.iinfo(self._in_q.dtype)
            self._inverse_scale = np.float32(1.0 / self._in_q.scale)
            self._limits = (info.min, info.max)
        for name, q, details in (("input", self._in_q, self._in), ("output", self._out_q, self._out)):
            scale, zero = details["quantization"]
            if np.dtype(details["dtype"]) != q.dtype or (
                q.quantized and (abs(scale - q.scale) > 1e-9 * max(1.0, scale) or zero != q.zero_point)
            ):
                raise BundleError(
                    f"{self.path.name}: {name} is {np.dtype(details['dtype'])} scale {scale} zero "
                    f"point {zero}; the manifest says {q.dtype} scale {q.scale} zero point {q.zero_point}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._in["shape"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed inputs float32 (N, S, S, C) -> raw model outputs (N, outputs), dequantised."""
        x = input_batch(x, self.input_shape)
        out = np.empty((len(x), int(self._out["shape"][-1])), np.float32)
        interpreter, in_index, out_index = self._interpreter, self._in["index"], self._out["index"]
        for i in range(len(x)):
            interpreter.set_tensor(in_index, self._quantize(x[i : i + 1]))
            interpreter.invoke()
            out[i] = self._dequantize(interpreter.get_tensor(out_index))[0]
        return out

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        """One float input (1, S, S, C) -> the interpreter's input dtype, in preallocated buffers.

        Per image this runs beside an ``invoke()`` of a few hundred microseconds, so it avoids
        temporaries: the runtime's overhead over a bare interpreter is measured in benchmarks/.
        """
        q = self._in_q
        if not q.quantized:
            return x.astype(q.dtype, copy=False)
        scaled, quantized = self._buffers
        np.multiply(x, self._inverse_scale, out=scaled)
        np.rint(scaled, out=scaled)
        np.add(scaled, q.zero_point, out=scaled)
        np.clip(scaled, self._limits[0], self._limits[1], out=scaled)
        quantized[...] = scaled
        return quantized

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        q = self._out_q
        if not q.quantized:
            return y.astype(np.float32, copy=False)
        return (y.astype(np.float32) - q.zero_point) * q.scale


class Runner(Protocol):
    """A loaded model file on its engine: what :class:`Model` runs, whatever the engine."""

    backend: str
    path: Path

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def logits(self, x: np.ndarray) -> np.ndarray: ...


def open_runner(
    model_path: Path | str,
    precision: str,
    *,
    input_record: TensorRecord,
    output_record: TensorRecord,
    threads: int | None = None,
    backend: str | Backend | None = None,
) -> Runner:
    """The model file of a deployable format (a name in ``edgedx.precision.PRECISIONS``) on its engine.

    ``backend`` chooses the TFLite interpreter (``litert`` or ``tflite-runtime``); ONNX models run
    on ONNX Runtime, the only backend of that engine.
    """
    if PRECISIONS[precision].engine == "onnx":
        from ._onnx import BACKEND, OnnxRunner

        if backend is not None and getattr(backend, "name", backend) != BACKEND:
            raise BackendUnavailable(f"an ONNX model runs on {BACKEND}, not {getattr(backend, 'name', backend)}")
        return OnnxRunner(model_path, input_record=input_record, output_record=output_record, threads=threads)
    return TFLiteRunner(
        model_path, input_record=input_record, output_record=output_record, threads=threads, backend=backend
    )


class Model:
    """A loaded bundle model; build it with :meth:`Model.load`."""

    def __init__(self, bundle: Bundle, role: str, runner: Runner) -> None:
        self.bundle = bundle
        self.role = role
        self.runner = runner
        self.backend = runner.backend
        self.spec: PreprocessSpec = bundle.preprocess
        self.activation: str = bundle.manifest.task.activation
        self.class_names: list[str] = bundle.class_names
        self.threshold: Threshold = bundle.model_threshold(role)
        self.calibration = bundle.calibration(role)
        self.guard = bundle.load_guard()
        self.scope = self.guard.scope if self.guard else Scope(modalities=tuple(self.modalities or ()))
        expected = (1, self.spec.size, self.spec.size, self.spec.channels)
        if runner.input_shape != expected:
            raise BundleError(
                f"{bundle.path}: {role} takes input {list(runner.input_shape)}, the manifest's "
                f"preprocessing makes {list(expected)}"
            )

    @classmethod
    def load(
        cls,
        bundle: Bundle | Path | str,
        *,
        role: str | None = None,
        threads: int | None = None,
        backend: str | Backend | None = None,
    ) -> Model:
        """Open a bundle, verify every file's SHA-256, and load one of its deployable models.

        Args:
            bundle: A bundle folder (or an already read :class:`Bundle`, which is verified again).
            role: Which model (``tflite-int8``, ``tflite-float32``, ``onnx-float32``, ...); default:
                the manifest's ``deploy`` role, else the first TFLite model present.
            threads: Interpreter threads (default: the engine's own choice).
            backend: For TFLite models, ``litert`` or ``tflite-runtime`` (default: the first
                installed); ONNX models run on ONNX Runtime.
        """
        b = read_bundle(bundle.path if isinstance(bundle, Bundle) else bundle)
        models = b.manifest.models
        if role is None:
            role = deployed_role(models, b.manifest.deploy)
            if role is None:
                raise BundleError(
                    f"{b.path}: no deployable model in this bundle (it has {', '.join(models)}); "
                    "make one with `edgedx compress`"
                )
        precision = precision_of_role(role)
        if role not in models or precision is None:
            deployable = [r for r in models if precision_of_role(r)]
            raise BundleError(f"{b.path}: no {role!r} model to deploy; it has {', '.join(deployable) or 'none'}")
        record = models[role]
        if record.input is None or record.output is None:
            raise BundleError(f"{b.path}: the manifest does not record {role}'s input and output tensors")
        runner = open_runner(
            b.model_path(role),
            precision.name,
            input_record=record.input,
            output_record=record.output,
            threads=threads,
            backend=backend,
        )
        return cls(b, role, runner)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed inputs float32 (N, S, S, C) -> raw model outputs (N, outputs), dequantised."""
        return self.runner.logits(x)

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (N, S, S, C) -> calibrated probabilities: (N,) for binary, (N, K) otherwise."""
        return probabilities(self.runner.logits(x), self.activation, self.calibration)

    def ood_scores(self, x: np.ndarray) -> np.ndarray | None:
        """Preprocessed inputs (N, S, S, C) -> the guard's score each (above 1: flagged); None without a guard."""
        return self.guard.scores(x) if self.guard else None

    # -- raw images and DICOM ----------------------------------------------------------------------
    def predict_images(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Raw 2-D images (HU for CT, grey levels otherwise) -> probabilities, one row per image."""
        return np.concatenate([self.predict_inputs(to_model_input(im, self.spec)[None]) for im in images])

    def predict(self, source: Any, *, name: str | None = None) -> Prediction:
        """One case, through the one path every caller uses: read -> decode -> preprocess -> predict -> decide.

        Args:
            source: A DICOM file (path or bytes), a pydicom dataset, a 2-D image (HU for CT, grey
                levels otherwise) or an already preprocessed ``(S, S, C)`` input.
            name: What error messages call the input (default: the file name, or ``input``).

        Raises:
            DicomError: the DICOM cannot be read or used (message names the input and the reason).
            DataError: an array of the wrong shape or type.
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[step] = round((now - clock) * 1e3, 3)
            clock = now

        if isinstance(source, (str, Path, bytes, bytearray)):
            name = name or (Path(source).name if isinstance(source, (str, Path)) else "input")
            source = read_dataset(source, name=name)
            lap("read")
        if isinstance(source, np.ndarray):
            model_input = self._array_input(source, name or "input")
        elif isinstance(source, Dataset):
            out_of_scope = self.scope.violations(source)
            if out_of_scope:
                return Prediction(
                    probabilities=None,
                    decision=None,
                    label=None,
                    threshold=self.threshold,
                    in_distribution=False,
                    ood_reasons=tuple(out_of_scope),
                    timings_ms=timings,
                )
            image = image_from_dataset(source, name=name or "dataset")
            lap("decode")
            model_input = to_model_input(image, self.spec)
        else:
            raise DataError(
                f"cannot predict on a {type(source).__name__}; give a DICOM path or bytes, a pydicom dataset "
                "or an array"
            )
        lap("preprocess")
        checked = self.guard.check(model_input) if self.guard else GuardResult(True, None)
        lap("guard")
        probs = self.predict_inputs(model_input[None])
        lap("inference")
        decision, label, findings = None, None, ()
        if checked.in_distribution:
            decided = decisions(probs, self.threshold)[0]
            if decided.ndim:  # multi-label: one 0/1 per label
                findings = tuple(name for name, hit in zip(self.class_names, decided, strict=True) if hit)
                decision, label = int(decided[0]), ", ".join(findings) or "none"
            else:
                decision = int(decided)
                label = self.class_names[decision]
        return Prediction(
            probabilities=probs[0],
            decision=decision,
            label=label,
            findings=findings,
            threshold=self.threshold,
            in_distribution=checked.in_distribution,
            ood_score=None if checked.score is None else round(checked.score, 4),
            ood_reasons=checked.reasons,
            timings_ms=timings,
        )

    def predict_batch(self, sources: Iterable[Any]) -> list[Prediction]:
        """Many cases, each as :meth:`predict` takes it; one prediction each."""
        return [self.predict(source) for source in sources]

    @property
    def modalities(self) -> list[str] | None:
        modality = self.bundle.manifest.input.modality
        return list(modality) if modality else None

    def _array_input(self, array: np.ndarray, name: str) -> np.ndarray:
        """A 2-D image -> preprocessed; an (S, S, C) array is taken as already preprocessed."""
        if array.dtype.kind not in "fiub":
            raise DataError(f"{name}: array of {array.dtype} is not numeric")
        spec = self.spec
        if array.ndim == 2:
            if not np.isfinite(array).all():
                raise DataError(f"{name}: image has values that are not finite")
            return to_model_input(array.astype(np.float32, copy=False), spec)
        if array.shape == (spec.size, spec.size, spec.channels):
            return array.astype(np.float32)
        raise DataError(
            f"{name}: array has shape {array.shape}; give a 2-D image or a preprocessed "
            f"({spec.size}, {spec.size}, {spec.channels}) input"
        )
