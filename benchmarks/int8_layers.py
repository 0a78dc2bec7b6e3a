"""Where int8 loses a float model's decisions: TFLite's per-layer error, then leading ops kept in float.

For one float bundle (default: a teacher trained by ``edgedx train``) it calibrates int8 on 200
training inputs (as ``edgedx compress`` does) and

1. prints the quantization debugger's per-layer error: RMSE over the layer's output scale (about
   0.29, i.e. 1/sqrt(12), is ideal rounding; much more means the layer itself adds error);
2. converts full int8 and int8 with the first k ops left in float (k = 1, 2, 3, 7, 12) and, for
   each, measures the validation and test decisions that differ from the float model's (at the
   matched threshold ``edgedx compress`` uses), the median |probability difference|, the file size
   and the median single-image latency (LiteRT, 2 threads, 400 calls each in 10 interleaved rounds
   after a warm-up round, all variants in one run).

Writes ``results/int8-layers-<bundle>-cpu<cores>.json``. Run by hand on an idle machine:

    python benchmarks/int8_layers.py WORK/headct-float
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
COUNTS = (1, 2, 3, 7, 12)


def _latencies_ms(runners: list, x: np.ndarray, rounds: int = 10, calls: int = 40) -> list[float]:
    """Median single-image latency of each runner, measured in interleaved rounds after a warm-up."""
    times: list[list[float]] = [[] for _ in runners]
    for round_ in range(rounds + 1):
        for runner, measured in zip(runners, times, strict=True):
            for _ in range(calls):
                began = time.perf_counter()
                runner.logits(x)
                if round_:  # round 0 warms every runner up
                    measured.append(time.perf_counter() - began)
    return [float(np.median(t) * 1e3) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a float bundle written by edgedx train")
    args = parser.parse_args()

    from edgedx._tf import keras, tf
    from edgedx.bundle import read_bundle
    from edgedx.compress._pipeline import _matching_threshold, _Stage
    from edgedx.compress.quantize import (
        _calibration_samples,
        convert,
        int8_keeping_first_ops_float,
        representative_samples,
    )
    from edgedx.data import recorded_dataset
    from edgedx.outputs import decisions, probabilities
    from edgedx.runtime import TFLiteRunner
    from edgedx.train import predict_scores, prepare_data

    bundle = read_bundle(args.bundle)
    activation = bundle.manifest.task.activation
    prepared = prepare_data(recorded_dataset(bundle.manifest.data or {}), bundle.preprocess, None)
    model = keras.models.load_model(bundle.model_path("keras"), compile=False)
    calibration = representative_samples(prepared.x["train"], 200, seed=0)  # as compress calibrates
    float_scores = {s: predict_scores(model, prepared.x[s], activation) for s in ("val", "test")}
    float_stage = _Stage(
        name="float", keras_model=model, threshold=bundle.threshold, scores=float_scores, arch=bundle.manifest.arch
    )

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _calibration_samples(calibration)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=_calibration_samples(calibration)
    )
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    layers = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"])
        rmse_over_scale = float(np.sqrt(float(row["mean_squared_error"])) / scale) if scale else None
        layers.append({"op": row["op_name"], "tensor": row["tensor_name"], "rmse_over_scale": rmse_over_scale})
        print(f"{row['op_name']:>16} rmse/scale {rmse_over_scale:.3f}  {row['tensor_name'][:70]}")

    variants = [convert(model, "int8", calibration), *int8_keeping_first_ops_float(model, calibration, COUNTS)]
    rows, runners = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(variants):
            path = Path(tmp) / f"m{i}.tflite"
            path.write_bytes(variant.content)
            runner = TFLiteRunner(path, input_record=variant.input, output_record=variant.output, threads=2)
            runners.append(runner)
            scores = {s: probabilities(runner.logits(prepared.x[s]), activation) for s in ("val", "test")}
            threshold = _matching_threshold(scores["val"], float_stage.scores["val"], float_stage.threshold)
            flips = {
                s: float(np.mean(decisions(scores[s], threshold) != decisions(float_scores[s], bundle.threshold)))
                for s in ("val", "test")
            }
            row = {
                "float_ops": len(variant.float_ops),
                "bytes": len(variant.content),
                "val_flips": flips["val"],
                "test_flips": flips["test"],
                "median_abs_probability_diff": float(np.median(np.abs(scores["test"] - float_scores["test"]))),
            }
            rows.append(row)
        for row, p50 in zip(rows, _latencies_ms(runners, prepared.x["test"][:1]), strict=True):
            row["p50_ms"] = p50
            print(
                f"first {row['float_ops']:>2} ops float: {row['bytes']:>9,} B, flips val {row['val_flips']:.1%} "
                f"test {row['test_flips']:.1%}, median |dp| {row['median_abs_probability_diff']:.4f}, "
                f"p50 {row['p50_ms']:.3f} ms"
            )
    out = HERE / "results" / f"int8-layers-{bundle.name}-cpu{os.cpu_count()}.json"
    out.write_text(json.dumps({"bundle": str(args.bundle), "layers": layers, "variants": rows}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
