"""Keras -> deployable formats: TFLite float32, float16, dynamic-range int8 and full-integer int8,
ONNX float32 (tf2onnx), and quantization-aware training."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._quiet import native_logs_hidden
from ..bundle import TensorRecord
from ..errors import ConfigError, DependencyError
from ..precision import PRECISIONS

#: The ONNX opset models are exported in: supported by every ONNX Runtime since 1.12.
ONNX_OPSET = 17


@dataclass(frozen=True)
class ConvertedModel:
    """A converted model (TFLite or ONNX): its bytes and the input/output tensor records the manifest stores."""

    precision: str  # a name in edgedx.precision.PRECISIONS
    content: bytes
    input: TensorRecord
    output: TensorRecord
    sparse: bool = False  # weights stored in TFLite's sparse tensor encoding
    float_ops: tuple[str, ...] = ()  # int8 only: output tensors of the ops kept in float32


def _tensor_record(details: dict[str, Any]) -> TensorRecord:
    scale, zero_point = details["quantization"]
    return TensorRecord(
        dtype=np.dtype(details["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
        shape=tuple(int(d) for d in details["shape"]),
    )


def _describe(precision: str, content: bytes, sparse: bool = False, float_ops: tuple[str, ...] = ()) -> ConvertedModel:
    from ..runtime import load_backend

    with tempfile.TemporaryDirectory() as tmp:  # the interpreter wants a path
        path = Path(tmp) / "m.tflite"
        path.write_bytes(content)
        interpreter = load_backend().create(str(path), 1)
        return ConvertedModel(
            precision,
            content,
            _tensor_record(interpreter.get_input_details()[0]),
            _tensor_record(interpreter.get_output_details()[0]),
            sparse,
            float_ops,
        )


def representative_samples(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded random subset of preprocessed training inputs for int8 calibration."""
    if count < 1:
        raise ConfigError(f"calibration needs at least 1 sample, got {count}")
    rng = np.random.default_rng(seed)
    return x[rng.choice(len(x), size=min(count, len(x)), replace=False)]


def convert(model, precision: str, calibration: np.ndarray | None = None, *, sparse: bool = False) -> ConvertedModel:
    """Convert a float Keras model (or a QAT model, for ``int8``) to a deployable format.

    Args:
        model: A tf_keras model with a fixed input shape.
        precision: A name in ``edgedx.precision.PRECISIONS``: TFLite ``float32``; ``float16``
            (weights stored as float16); ``dynamic`` (int8 weights, float activations); ``int8``
            (int8 weights per channel, int8 activations, int8 input and output; needs
            ``calibration`` unless the model was trained quantization-aware); or ``onnx-float32``.
        calibration: Preprocessed training inputs (N, S, S, C) for the int8 ranges.
        sparse: Store pruned weights in TFLite's sparse tensor encoding (for pruned models): the
            file shrinks with the zeros instead of storing them. On the pruned PneumoniaMNIST
            student it took int8 from 104,632 B to 79,904 B and float32 from 339,652 B to
            126,028 B at the same test AUC. Speed varies: that student ran 2.2-2.8x faster at one
            thread, the head-CT bundle at two threads no faster (benchmarks/README.md). Ignored
            for precisions the runtime cannot run so stored (dynamic range): they stay dense.
    """
    from .._tf import tf

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if PRECISIONS[precision].engine == "onnx":
        return to_onnx(model, precision)
    converter = _converter(model, precision, calibration)
    sparse = sparse and PRECISIONS[precision].sparse_encoding
    if sparse:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    with _quiet_converter():  # int8 prints "fully_quantize: 0, ..."
        content = converter.convert()
    return _describe(precision, content, sparse)


def to_onnx(model, precision: str = "onnx-float32") -> ConvertedModel:
    """The Keras model as float32 ONNX (tf2onnx, opset 17), taking any batch.

    Needs ``tf2onnx`` (the ``[train]`` extra installs it); the runtime runs it on ONNX Runtime.
    """
    from .._tf import tf

    try:
        import tf2onnx
    except ImportError as exc:
        raise DependencyError(f"ONNX export needs tf2onnx ({exc}); pip install tf2onnx") from None
    size = tuple(int(d) for d in model.input_shape[1:])
    spec = (tf.TensorSpec((None, *size), tf.float32, name="input"),)
    with native_logs_hidden(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf2onnx's deprecation warnings about TensorFlow's internals
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
    outputs = int(model.output_shape[-1])
    return ConvertedModel(
        precision,
        proto.SerializeToString(),
        TensorRecord(dtype="float32", shape=(1, *size)),
        TensorRecord(dtype="float32", shape=(1, outputs)),
    )


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """The converter's native log lines ("fully_quantize: 0, ...") and its own UserWarnings
    ("Statistics for quantized inputs were expected", the debugger's "tf.lite.Interpreter is
    deprecated") are about TensorFlow's internals, not the model: kept off the terminal."""
    with native_logs_hidden(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _calibration_samples(calibration: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    def samples() -> Iterator[list[np.ndarray]]:
        for i in range(len(calibration)):
            yield [calibration[i : i + 1].astype(np.float32)]

    return samples


def _converter(model, precision: str, calibration: np.ndarray | None):
    from .._tf import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        if calibration is None or not len(calibration):
            raise ConfigError("full-integer int8 needs calibration inputs from the training data")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _calibration_samples(calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter


def int8_keeping_first_ops_float(
    model, calibration: np.ndarray, counts: Sequence[int], *, sparse: bool = False
) -> Iterator[ConvertedModel]:
    """int8 models with the first ``n`` ops (for each n in ``counts``) left in float32: selective quantization.

    Input and output stay int8 (the runtime and its preprocessing do not change); everything after
    the first ``n`` ops runs in int8. Why the first ops: on the default head-CT model full int8
    flipped 3.1% of validation decisions against the float model, and keeping only the stem
    convolution (3 -> 32 channels on raw windowed intensities, whose folded BatchNorm scales span
    1-20x) in float brought that to 0.8% for 1.9 KB and 0.9% more latency. Calibrates once
    (through TFLite's quantization debugger) and yields the models lazily, so a caller that is
    satisfied early pays for one conversion.
    """
    from .._tf import tf

    samples = _calibration_samples(calibration)
    converter = _converter(model, "int8", calibration)
    # the float ops need the float kernels beside the int8 ones
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    with _quiet_converter():  # it converts and interprets as it is made
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: itertools.islice(samples(), 4)
        )
        debugger.run()  # its per-layer statistics name the quantized ops' outputs in execution order
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    op_outputs = [row["tensor_name"] for row in csv.DictReader(io.StringIO(dump.getvalue()))]
    for count in counts:
        if count > len(op_outputs):  # a small network: nothing left to keep in float
            return
        kept = tuple(op_outputs[:count])
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(kept), fully_quantize=True)
        with _quiet_converter():
            debugger.options = options  # re-quantizes, and makes a new debug interpreter
            content = debugger.get_nondebug_quantized_model()
        if sparse:
            # what the converter itself does for Optimize.EXPERIMENTAL_SPARSITY after quantizing
            from tensorflow.lite.python.convert import mlir_sparsify

            content = mlir_sparsify(content)
        yield _describe("int8", content, sparse, kept)


def quantization_aware(model, *, preserve_sparsity: bool):
    """Wrap a float model for quantization-aware training (tfmot default 8-bit scheme).

    With ``preserve_sparsity`` the pruned zeros stay zero through QAT (sparsity-preserving QAT,
    tfmot's ``Default8BitPrunePreserveQuantizeScheme``).
    """
    import tensorflow_model_optimization as tfmot

    from .._tf import keras  # noqa: F401  (TF_USE_LEGACY_KERAS before tfmot touches Keras)

    annotated = tfmot.quantization.keras.quantize_annotate_model(model)
    if preserve_sparsity:
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
        return tfmot.quantization.keras.quantize_apply(annotated, scheme)
    return tfmot.quantization.keras.quantize_apply(annotated)
