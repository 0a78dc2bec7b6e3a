"""edgedx's runtime against its peers, in one run, on the same weights and the same inputs.

For a compressed bundle (it holds the float Keras model, its float32 TFLite conversion and the
deployed model, all the same network) this times one-image inference, preprocessed input ->
probabilities, through:

- Keras ``model.predict(x)`` and a direct Keras call ``model(x, training=False)``;
- edgedx's runtime (``Model.predict_inputs``) on the deployed model (whatever its engine and
  precision) and on the float32 and int8 TFLite models where the bundle has them;
- a bare LiteRT interpreter (``set_tensor``, ``invoke()``, ``get_tensor``; int8 input quantized
  beforehand, no dequantization, no sigmoid): the floor the runtime's overhead is measured against;
  and the same with the float input quantized per call by a numpy one-liner, as any caller
  holding a preprocessed float image must;
- ONNX Runtime on the same Keras model converted by tf2onnx (float32), and statically quantized
  to int8 by ``onnxruntime.quantization`` (QDQ, per-channel, calibrated on the same training
  inputs the TFLite int8 model was calibrated on).

Engines are timed in interleaved rounds so that drift on a shared machine hits them alike; the
table gives medians over all rounds. It then starts fresh processes to record cold start (process
start -> first prediction) and peak RSS of the runtime-only process against TensorFlow processes
doing the same job (the same int8 model in ``tf.lite.Interpreter``, and the Keras float model).

    pip install sympy   # ONNX Runtime's int8 preparation; tf2onnx and onnxruntime come with edgedx[train]
    python benchmarks/peers.py BUNDLE [--threads 2] [--runs 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

TF_INT8_PROBE = """
import json, sys, time
import numpy as np
import edgedx._tf as _tf
interpreter = _tf.tf.lite.Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[3]))
interpreter.allocate_tensors()
inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
scale, zero = inp["quantization"]
x = np.load(sys.argv[2])[:1]
interpreter.set_tensor(inp["index"], np.clip(np.rint(x / scale) + zero, -128, 127).astype(np.int8))
interpreter.invoke()
interpreter.get_tensor(out["index"])
from edgedx.runtime.probe import peak_rss_mb
print(json.dumps({"first_prediction_unix": time.time(), "peak_rss_mb": peak_rss_mb()}))
"""


def _timer(fn, x: np.ndarray):
    def run(i: int) -> float:
        xi = x[i % len(x) : i % len(x) + 1]
        t = time.perf_counter()
        fn(xi)
        return time.perf_counter() - t

    return run


def onnx_models(keras_model, calibration: np.ndarray, tmp: Path) -> dict[str, Path]:
    """The Keras model as ONNX float32 (tf2onnx) and statically quantized int8 (QDQ, per-channel)."""
    import tensorflow as tf
    import tf2onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = (tf.TensorSpec((1, *keras_model.input_shape[1:]), tf.float32, name="input"),)
    float_path, pre_path, int8_path = tmp / "float.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=17, output_path=str(float_path))
    quant_pre_process(str(float_path), str(pre_path))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(pre_path),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return {"onnxruntime float32": float_path, "onnxruntime int8": int8_path}


def _onnx_sessions(keras_model, calibration: np.ndarray, threads: int, tmp: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in onnx_models(keras_model, calibration, tmp).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a compressed bundle (keras, tflite-float32, the deployed model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2000, help="timed calls per engine, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    from edgedx._tf import keras, tf  # sets TF_USE_LEGACY_KERAS before tf2onnx imports TensorFlow
    from edgedx.bundle import read_bundle
    from edgedx.data import recorded_dataset
    from edgedx.outputs import probabilities
    from edgedx.preprocess import to_model_inputs
    from edgedx.runtime import Model, load_backend
    from edgedx.runtime.probe import run_probe

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    bundle = read_bundle(args.bundle)
    activation = bundle.manifest.task.activation
    dataset = recorded_dataset(bundle.manifest.data or {})
    test, train = dataset.splits["test"], dataset.splits["train"]
    x = to_model_inputs([test.read(i) for i in range(min(64, len(test)))], bundle.preprocess)
    rng = np.random.default_rng(0)
    calibration = to_model_inputs(
        [train.read(int(i)) for i in rng.choice(len(train), min(200, len(train)), replace=False)], bundle.preprocess
    )

    keras_model = keras.models.load_model(bundle.model_path("keras"), compile=False)
    precisions = [p for p in ("float32", "int8") if f"tflite-{p}" in bundle.manifest.models]
    deployed = Model.load(bundle, threads=args.threads)
    # the runtime on float32 and int8 too, unless that is the deployed model's row already
    runtime = {
        p: Model.load(bundle, role=f"tflite-{p}", threads=args.threads)
        for p in precisions
        if f"tflite-{p}" != deployed.role
    }
    deployed_name = f"edgedx runtime deployed ({deployed.role})"

    def runtime_row(precision: str) -> str:
        return deployed_name if f"tflite-{precision}" == deployed.role else f"edgedx runtime {precision}"

    backend = load_backend()
    bare = {}
    for p in precisions:
        interpreter = backend.create(str(bundle.model_path(f"tflite-{p}")), args.threads)
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        if p == "int8":
            scale, zero = inp["quantization"]
            xq = np.clip(np.rint(x / scale) + zero, -128, 127).astype(np.int8)
        else:
            xq = x

        def invoke(xi, interpreter=interpreter, i_in=inp["index"], i_out=out["index"]):
            interpreter.set_tensor(i_in, xi)
            interpreter.invoke()
            return interpreter.get_tensor(i_out)

        bare[p] = (invoke, xq)
        if p == "int8":  # the same, starting from the float input as the runtime does: a numpy one-liner

            def quantize_invoke(xi, invoke=invoke, scale=scale, zero=zero):
                return invoke(np.clip(np.rint(xi / scale) + zero, -128, 127).astype(np.int8))

            bare["int8 from float input"] = (quantize_invoke, x)

    with tempfile.TemporaryDirectory() as tmp:
        sessions = _onnx_sessions(keras_model, calibration, args.threads, Path(tmp))
        engines = {
            "keras predict": (lambda xi: keras_model.predict(xi, verbose=0), x),
            "keras call": (lambda xi: keras_model(xi, training=False).numpy(), x),
            deployed_name: (deployed.predict_inputs, x),
            **{f"edgedx runtime {p}": (model.predict_inputs, x) for p, model in runtime.items()},
            **{f"bare LiteRT invoke {p}": bare[p] for p in precisions},
            **({"bare LiteRT quantize + invoke int8": bare["int8 from float input"]} if "int8" in bare else {}),
            **{name: ((lambda xi, s=s: s.run(None, {"input": xi})[0]), x) for name, s in sessions.items()},
        }
        # Agreement with Keras on the test inputs: the engines run the same network. The runtime's
        # probabilities are calibrated; its raw outputs are compared, through the same activation.
        reference = probabilities(keras_model.predict(x, verbose=0), activation)
        raw = {deployed_name: deployed.logits, **{f"edgedx runtime {p}": m.logits for p, m in runtime.items()}}
        agreement = {}
        for name, (fn, xs) in engines.items():
            if name.startswith("bare"):
                continue
            fn = raw.get(name, fn)
            out = np.concatenate([np.asarray(fn(xs[i : i + 1])).reshape(1, -1) for i in range(len(xs))])
            probs = probabilities(out, activation)
            agreement[name] = float(np.max(np.abs(np.asarray(probs).reshape(reference.shape) - reference)))

        keras_runs = max(args.runs // 10, args.rounds)  # predict is slow; fewer calls keep the run short
        timings: dict[str, list[float]] = {name: [] for name in engines}
        for fn, xs in engines.values():  # warm-up
            for i in range(20):
                _timer(fn, xs)(i)
        for r in range(args.rounds):
            for name, (fn, xs) in engines.items():
                n = (keras_runs if name.startswith("keras") else args.runs) // args.rounds
                run = _timer(fn, xs)
                timings[name] += [run(r * n + i) for i in range(n)]

    rows = {}
    for name, t in timings.items():
        ms = np.asarray(t) * 1000
        rows[name] = {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "calls": len(ms)}
    reference = rows[deployed_name]["median_ms"]
    for row in rows.values():
        row["ratio_to_deployed"] = row["median_ms"] / reference
    inference = {name: row for name, row in rows.items() if not name.startswith(("keras", "bare"))}

    # Cold start and peak RSS: fresh processes, each doing one model's job from nothing.
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "x.npy"
        np.save(inputs, x)
        common = {"bundle": bundle.path, "inputs": inputs, "threads": args.threads, "runs": 20, "warmup": 2}
        runtime_deployed = run_probe("edgedx.runtime.probe", role=deployed.role, **common)
        processes = {f"edgedx runtime {deployed.role} (no TensorFlow)": runtime_deployed}
        if "int8" in precisions:
            started = time.time()
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    TF_INT8_PROBE,
                    str(bundle.model_path("tflite-int8")),
                    str(inputs),
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            tf_int8 = json.loads(done.stdout.strip().splitlines()[-1])
            tf_int8["cold_start_seconds"] = tf_int8["first_prediction_unix"] - started
            processes["tf.lite.Interpreter int8 in a TensorFlow process"] = tf_int8
        processes["Keras float in a TensorFlow process"] = run_probe("edgedx.bench.keras_probe", role="keras", **common)
    process_rows = {
        name: {
            "cold_start_seconds": p["cold_start_seconds"],
            "peak_rss_mb": p["peak_rss_mb"],
            "cold_start_ratio_to_runtime": p["cold_start_seconds"] / runtime_deployed["cold_start_seconds"],
            "peak_rss_ratio_to_runtime": p["peak_rss_mb"] / runtime_deployed["peak_rss_mb"],
        }
        for name, p in processes.items()
    }

    overhead = {
        p: rows[runtime_row(p)]["median_ms"] / rows[f"bare LiteRT invoke {p}"]["median_ms"] - 1 for p in precisions
    }
    if "int8" in precisions:
        overhead["int8 vs quantize + invoke"] = (
            rows[runtime_row("int8")]["median_ms"] / rows["bare LiteRT quantize + invoke int8"]["median_ms"] - 1
        )
    fastest = min(inference, key=lambda name: inference[name]["median_ms"])
    result = {
        "bundle": str(bundle.path),
        "arch": asdict(bundle.manifest.arch) if bundle.manifest.arch else None,
        "input_shape": list(x.shape[1:]),
        "threads": args.threads,
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "per_image": rows,
        "runtime_overhead_vs_bare_invoke": overhead,
        "deployed_role": deployed.role,
        "edgedx_deployed_speedup_vs_onnxruntime_int8": rows["onnxruntime int8"]["median_ms"] / reference,
        "fastest_inference_engine": fastest,
        "max_abs_probability_difference_vs_keras": agreement,
        "processes": process_rows,
    }
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"peers-{bundle.name}-cpu{os.cpu_count()}-threads{args.threads}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    title = f"engine ({bundle.name}, {args.threads} threads)"
    print(f"| {title} | median ms | p95 ms | x deployed | max abs diff vs Keras |")
    print("|---|---|---|---|---|")
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["median_ms"]):
        diff = agreement.get(name)
        print(
            f"| {name} | {row['median_ms']:.3f} | {row['p95_ms']:.3f} | {row['ratio_to_deployed']:.2f} | "
            f"{'-' if diff is None else f'{diff:.4f}'} |"
        )
    print("\nruntime overhead vs bare invoke: " + ", ".join(f"{k} {v:+.1%}" for k, v in overhead.items()))
    speedup = result["edgedx_deployed_speedup_vs_onnxruntime_int8"]
    print(f"edgedx deployed ({deployed.role}) is {speedup:.2f}x faster than ONNX Runtime int8; fastest: {fastest}\n")
    print("| process | cold start s | peak RSS MB | cold start x runtime | RSS x runtime |")
    print("|---|---|---|---|---|")
    for name, p in process_rows.items():
        print(
            f"| {name} | {p['cold_start_seconds']:.2f} | {p['peak_rss_mb']:.0f} | "
            f"{p['cold_start_ratio_to_runtime']:.1f} | {p['peak_rss_ratio_to_runtime']:.1f} |"
        )
    print(f"-> {out.relative_to(HERE)}")


if __name__ == "__main__":
    main()
