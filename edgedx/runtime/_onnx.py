"""A bundle's ONNX model on ONNX Runtime: the optional second engine (``pip install 'edgedx[onnx]'``).

On CPUs without AVX-512, ONNX Runtime's float32 kernels ran the head-CT student in fewer
instructions than any of LiteRT's precisions (benchmarks/README.md), so ``compress --quantize auto``
can deploy an ONNX model where it measures faster. Imported only when such a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from ..bundle import TensorRecord
from ..errors import BundleError
from ._backends import BackendUnavailable, import_installed
from .model import input_batch

BACKEND = "onnxruntime"
INSTALL_HINT = "pip install onnxruntime (or: pip install 'edgedx[onnx]')"
#: Inputs per session call when scoring many. Larger batches cost memory and bought no speed: on
#: the head-CT student (2 threads, 360 inputs) batches of 8 took 0.38 s at a peak RSS of 118 MB,
#: of 64 0.43 s at 207 MB, one at a time 0.42 s at 106 MB.
BATCH = 8


def _onnxruntime() -> ModuleType:
    ort = import_installed(BACKEND, BACKEND)
    if ort is None:
        raise BackendUnavailable(f"this bundle deploys an ONNX model and ONNX Runtime is not installed; {INSTALL_HINT}")
    return ort


class OnnxRunner:
    """One float32 ONNX model in an ONNX Runtime session, on the CPU.

    ``input_record`` and ``output_record`` are the manifest's records of the model's tensors; they
    are checked against the session. The model takes any batch; its records say batch 1.
    """

    backend = BACKEND

    def __init__(
        self, model_path: Path | str, *, input_record: TensorRecord, output_record: TensorRecord, threads: int | None
    ) -> None:
        ort = _onnxruntime()
        self.path = Path(model_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph internals
        options.inter_op_num_threads = 1  # one chain of convolutions: nothing to run side by side
        if threads:
            options.intra_op_num_threads = threads
        # ONNX Runtime's worker threads spin between calls by default. Beside a scanner they would
        # take the cores from the DICOM decoding between slices and from the scanner itself: on the
        # head-CT student at 2 threads with 2 ms between calls, 3.2 ms of CPU per call spinning and
        # 1.1 ms not (p50 0.53 vs 0.97 ms; LiteRT's threads, which wait rather than spin, 1.10 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types, not exported under one base
            raise BundleError(f"{self.path.name}: not an ONNX model ONNX Runtime can load ({exc})") from None
        self._in, self._out = self._session.get_inputs()[0], self._session.get_outputs()[0]
        for name, record, tensor in (("input", input_record, self._in), ("output", output_record, self._out)):
            if record.dtype != "float32" or tensor.type != "tensor(float)":
                raise BundleError(f"{self.path.name}: {name} is {tensor.type}; the manifest says {record.dtype}")
            if list(tensor.shape[1:]) != list(record.shape[1:]):
                raise BundleError(
                    f"{self.path.name}: {name} has shape {tensor.shape[1:]}; the manifest says {list(record.shape[1:])}"
                )
        self._input_shape = (1, *(int(d) for d in input_record.shape[1:]))
        self._outputs = int(output_record.shape[-1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed inputs float32 (N, S, S, C) -> raw model outputs (N, outputs)."""
        x = input_batch(x, self._input_shape)
        out = np.empty((len(x), self._outputs), np.float32)
        run, name = self._session.run, self._in.name
        for i in range(0, len(x), BATCH):
            out[i : i + BATCH] = run(None, {name: x[i : i + BATCH]})[0]
        return out
