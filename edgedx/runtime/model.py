"""Run a bundle's TFLite model with nothing but numpy, pydicom and a TFLite interpreter.

Everything comes from the bundle's manifest: preprocessing, quantization parameters, output
activation, threshold and class names. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, read_bundle
from ..data.dicom import image_from_dataset, read_dataset
from ..errors import BundleError, DataError
from ..outputs import decisions, probabilities
from ..preprocess import PreprocessSpec, to_model_input
from ._backends import Backend, load_backend

TFLITE_ROLES = ("tflite-int8", "tflite-dynamic", "tflite-float16", "tflite-float32")


@dataclass(frozen=True)
class Prediction:
    """One case: class probabilities (positive-class probability for binary models) and the decision."""

    probabilities: np.ndarray
    decision: int
    label: str
    threshold: float | None


@dataclass(frozen=True)
class _Quantization:
    scale: float
    zero_point: int
    dtype: np.dtype

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> _Quantization:
        return cls(float(record.get("scale", 0.0)), int(record.get("zero_point", 0)), np.dtype(record["dtype"]))

    @property
    def quantized(self) -> bool:
        return self.dtype.kind in "iu" and self.scale > 0


class TFLiteRunner:
    """One TFLite model in an interpreter: quantises inputs and dequantises outputs as recorded.

    ``input_record`` and ``output_record`` are the manifest's ``{dtype, scale, zero_point}`` for
    the model's input and output tensors; they are checked against the interpreter.
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        input_record: dict[str, Any],
        output_record: dict[str, Any],
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
        x = np.asarray(x, np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.shape[1:] != self.input_shape[1:]:
            raise DataError(f"input has shape {x.shape[1:]}, the model takes {self.input_shape[1:]}")
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


class Model:
    """A loaded bundle model; build it with :meth:`Model.load`."""

    def __init__(self, bundle: Bundle, role: str, runner: TFLiteRunner) -> None:
        self.bundle = bundle
        self.role = role
        self.runner = runner
        self.backend = runner.backend
        self.spec: PreprocessSpec = bundle.preprocess
        self.activation: str = bundle.manifest["task"]["activation"]
        self.class_names: list[str] = bundle.class_names
        self.threshold: float | None = bundle.manifest["models"][role].get("threshold", bundle.threshold)
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
        """Open a bundle, verify every file's SHA-256, and load one of its TFLite models.

        Args:
            bundle: A bundle folder (or an already read :class:`Bundle`, which is verified again).
            role: Which model (``tflite-int8``, ``tflite-float32``, ...); default: the manifest's
                ``deploy`` role, else the first TFLite model present.
            threads: Interpreter threads (default: the interpreter's own choice).
            backend: ``litert`` or ``tflite-runtime`` (default: the first installed).
        """
        b = read_bundle(bundle.path if isinstance(bundle, Bundle) else bundle)
        models = b.manifest["models"]
        if role is None:
            role = b.manifest.get("deploy") or next((r for r in TFLITE_ROLES if r in models), None)
            if role is None:
                raise BundleError(
                    f"{b.path}: no TFLite model in this bundle (it has {', '.join(models)}); "
                    "make one with `edgedx compress`"
                )
        if role not in models or not role.startswith("tflite"):
            tflite = [r for r in models if r.startswith("tflite")]
            raise BundleError(f"{b.path}: no {role!r} TFLite model; it has {', '.join(tflite) or 'none'}")
        record = models[role]
        runner = TFLiteRunner(
            b.model_path(role),
            input_record=record["input"],
            output_record=record["output"],
            threads=threads,
            backend=backend,
        )
        return cls(b, role, runner)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed inputs float32 (N, S, S, C) -> raw model outputs (N, outputs), dequantised."""
        return self.runner.logits(x)

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (N, S, S, C) -> probabilities: (N,) for binary, (N, K) otherwise."""
        return probabilities(self.runner.logits(x), self.activation)

    # -- raw images and DICOM ----------------------------------------------------------------------
    def predict_images(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Raw 2-D images (HU for CT, grey levels otherwise) -> probabilities, one row per image."""
        return np.concatenate([self.predict_inputs(to_model_input(im, self.spec)[None]) for im in images])

    def predict(self, source: Any) -> Prediction:
        """One case: a DICOM path, a pydicom dataset, or a 2-D array (HU or grey levels)."""
        return self.predict_batch([source])[0]

    def predict_batch(self, sources: Iterable[Any]) -> list[Prediction]:
        """Many cases, each a DICOM path, a pydicom dataset or a 2-D array; one prediction each."""
        images = [self._image(source) for source in sources]
        if not images:
            return []
        probs = self.predict_images(images)
        labels = decisions(probs, self.threshold)
        return [
            Prediction(probabilities=p, decision=int(d), label=self.class_names[int(d)], threshold=self.threshold)
            for p, d in zip(probs, labels, strict=True)
        ]

    def _image(self, source: Any) -> np.ndarray:
        if isinstance(source, (str, Path)):
            image = image_from_dataset(
                read_dataset(source), name=Path(source).name, modalities=self.bundle.manifest["input"].get("modality")
            )
        elif isinstance(source, np.ndarray):
            image = source
        elif hasattr(source, "PixelData") or hasattr(source, "Modality"):
            image = image_from_dataset(source, modalities=self.bundle.manifest["input"].get("modality"))
        else:
            raise DataError(
                f"cannot predict on a {type(source).__name__}; give a DICOM path, a pydicom dataset or a 2-D array"
            )
        return image
