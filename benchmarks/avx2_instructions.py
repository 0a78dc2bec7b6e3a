"""Instructions per inference on an AVX2-only CPU, counted by valgrind, for every engine and precision.

Scanner-side PCs are often AVX2 machines without AVX-512 or VNNI, where int8 can run slower than
float32; the machine at hand may have VNNI. LiteRT's XNNPACK and ONNX Runtime's MLAS choose their
kernels from CPUID, and valgrind's CPU offers AVX2 but no AVX-512 and no VNNI, so under
``valgrind --tool=callgrind`` both run the kernels an AVX2-only CPU runs. Callgrind counts the
instructions executed: exact and repeatable whatever else the machine does, but not time (an
AVX2 core retires a vpmaddwd or an FMA per port per cycle, so equal counts of the same kernel
mix mean roughly equal time). Each engine runs one-image inference ``5`` and ``5 + runs`` times
at one thread; the difference over ``runs`` is the count per inference. Native wall time on this
machine is given beside it (interleaved rounds, medians) with the CPU's flags.

    pip install sympy   # ONNX Runtime's int8 preparation; tf2onnx and onnxruntime come with edgedx[train]
    python benchmarks/avx2_instructions.py BUNDLE [--runs 40]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WARM_UP = 5

ENGINE = """
import sys, numpy as np
kind, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = np.load(sys.argv[4])
if kind == "litert":
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        x = np.clip(np.rint(x / scale) + zero, -128, 127).astype(np.int8)
    def run():
        it.set_tensor(inp["index"], x)
        it.invoke()
else:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    def run():
        session.run(None, {name: x})
for _ in range(count):
    run()
"""


def _instructions(kind: str, model: Path, count: int, image: Path, tmp: Path) -> int:
    out = tmp / f"callgrind.{os.getpid()}.{count}"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", ENGINE]
    run = subprocess.run([*command, kind, str(model), str(count), str(image)], capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode or not found:
        raise RuntimeError(f"valgrind failed for {model.name}: {run.stderr[-2000:]}")
    return int(found.group(1))


def _native_ms(engines: dict[str, tuple[str, Path]], image: np.ndarray, rounds: int = 15, calls: int = 50) -> dict:
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    runners = {}
    for name, (kind, path) in engines.items():
        if kind == "litert":
            it = Interpreter(model_path=str(path), num_threads=1)
            it.allocate_tensors()
            inp = it.get_input_details()[0]
            x = image
            if inp["dtype"] == np.int8:
                scale, zero = inp["quantization"]
                x = np.clip(np.rint(image / scale) + zero, -128, 127).astype(np.int8)
            runners[name] = lambda it=it, i=inp["index"], x=x: (it.set_tensor(i, x), it.invoke())
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: image}
            runners[name] = lambda s=session, f=feed: s.run(None, f)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        for _ in range(WARM_UP):
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            began = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - began) / calls * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()

    from edgedx._tf import keras  # TF_USE_LEGACY_KERAS before tf2onnx imports TensorFlow
    from edgedx.bundle import read_bundle
    from edgedx.compress.quantize import convert, representative_samples
    from edgedx.data import recorded_dataset
    from edgedx.preprocess import to_model_inputs

    sys.path.insert(0, str(HERE))
    from peers import onnx_models

    bundle = read_bundle(args.bundle)
    keras_model = keras.models.load_model(bundle.model_path("keras"), compile=False)
    dataset = recorded_dataset(bundle.manifest.data or {})
    train_x = to_model_inputs(dataset.splits["train"].images(), bundle.preprocess)
    calibration = representative_samples(train_x, 200, 0)
    image = to_model_inputs(itertools.islice(dataset.splits["test"].images(), 1), bundle.preprocess)
    sparse = bundle.model_record("tflite-float32").sparse_encoding
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        np.save(tmp / "image.npy", image)
        engines: dict[str, tuple[str, Path]] = {}
        for precision in ("float32", "float16", "dynamic", "int8"):
            role = f"tflite-{precision}"
            if role in bundle.manifest.models:
                path = bundle.model_path(role)
            else:
                path = tmp / f"{precision}.tflite"
                path.write_bytes(convert(keras_model, precision, calibration, sparse=sparse).content)
            engines[f"LiteRT {precision}"] = ("litert", path)
        for name, path in onnx_models(keras_model, calibration, tmp).items():
            engines[name.replace("onnxruntime", "ONNX Runtime")] = ("onnxruntime", path)
        # what compress deploys as onnx-float32 (any batch), beside peers' batch-1 export above
        if "onnx-float32" in bundle.manifest.models:
            exported = bundle.model_path("onnx-float32")
        else:
            exported = tmp / "edgedx-onnx-float32.onnx"
            exported.write_bytes(convert(keras_model, "onnx-float32").content)
        engines["ONNX Runtime float32 (edgedx's export)"] = ("onnxruntime", exported)
        native = _native_ms(engines, image)
        rows = []
        for name, (kind, path) in engines.items():
            low = _instructions(kind, path, WARM_UP, tmp / "image.npy", tmp)
            high = _instructions(kind, path, WARM_UP + args.runs, tmp / "image.npy", tmp)
            rows.append(
                {
                    "engine": name,
                    "bytes": path.stat().st_size,
                    "avx2_instructions_per_inference": (high - low) / args.runs,
                    "native_median_ms": native[name],
                }
            )
            print(f"{name}: {rows[-1]['avx2_instructions_per_inference'] / 1e6:.2f} M instructions", flush=True)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    result = {
        "bundle": bundle.name,
        "macs": bundle.manifest.arch.macs,
        "runs": args.runs,
        "native_cpu_flags": sorted(f for f in flags if f.startswith(("avx", "fma"))),
        "rows": rows,
    }
    out = HERE / "results" / f"avx2-instructions-{bundle.name}.json"
    out.write_text(json.dumps(result, indent=2))
    best = min(r["avx2_instructions_per_inference"] for r in rows)
    print("\n| engine | file | M instructions per inference (AVX2, valgrind) | x fewest | native ms (this CPU) |")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["avx2_instructions_per_inference"]):
        count = r["avx2_instructions_per_inference"]
        print(
            f"| {r['engine']} | {r['bytes']:,} B | {count / 1e6:.2f} | {count / best:.2f} | "
            f"{r['native_median_ms']:.3f} |"
        )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
