"""What each compression step buys and costs, on the embedded default or a MedMNIST file.

For one float teacher (trained here with the defaults, or given with ``--teacher``) it runs, through
the Python API that ``edgedx compress`` and ``edgedx train`` wrap:

- ``int8``: post-training full-integer int8 of the teacher itself (size vs its float32 TFLite);
- ``prune``: 75% unstructured magnitude pruning, no quantization (gzipped size vs dense);
- ``distill``: distillation to the default student (<= 1/8 of the teacher's parameters);
- ``labels-only``: the same student architecture and width trained from labels alone for the
  same number of epochs, with the same seed and augmentation, for comparison with ``distill``;
- ``default``: the README's pipeline, distill -> prune -> int8.

Writes ``results/compress-<data>-tf<version>-cpu<cores>.json`` and prints a Markdown table.
Run by hand on an idle machine (about 15-25 minutes on 2 cores per data set):

    python benchmarks/compress_study.py                       # the embedded default
    python benchmarks/compress_study.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _summary(row: dict) -> dict:
    return {
        "parameters": row["parameters"],
        "nonzero_parameters": row["nonzero_parameters"],
        "bytes": row["bytes"],
        "gzip_bytes": row["gzip_bytes"],
        "format": row["format"],
        "test_auc": row["test"]["auc"],
        "test_auc_ci95": row["test"]["auc_ci95"],
        "test_sensitivity": row["test"]["sensitivity"],
        "test_specificity": row["test"]["specificity"],
        "val_auc": row["val"]["auc"],
        "flips": row["flips"],
        "seconds": row["seconds"],
        "notes": row["notes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a data set edgedx reads; default: the embedded synthetic head CT")
    parser.add_argument("--teacher", type=Path, help="a float bundle to start from; default: train one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgedx-compress-study"), help="where bundles go")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --work instead of redoing them")
    args = parser.parse_args()

    from edgedx._tf import tf  # sets TF_USE_LEGACY_KERAS before TensorFlow loads; tf for the version only
    from edgedx.bundle import read_bundle
    from edgedx.compress import CompressConfig, compress
    from edgedx.data import default_dataset, load_dataset, recorded_dataset
    from edgedx.train import TrainConfig, train

    if args.data:
        dataset = load_dataset(args.data)
    elif args.teacher:  # what the teacher was trained on
        dataset = recorded_dataset(read_bundle(args.teacher).manifest.data or {})
    else:
        dataset = default_dataset()
    name = Path(args.data).stem if args.data else "headct-default"
    work = args.work / name
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    teacher = args.teacher
    if teacher is None:
        teacher = work / "teacher"
        train(dataset, teacher, TrainConfig())
    data = args.data  # None: the source the teacher's manifest records

    runs = {
        "int8": CompressConfig(quantize="int8"),
        "prune": CompressConfig(prune=True, quantize="none"),
        "distill": CompressConfig(distill=True, quantize="none"),
        "default": CompressConfig(distill=True, prune=True, quantize="int8"),
    }
    steps = {}
    for key, config in runs.items():
        if (work / key / "manifest.json").is_file():  # --reuse: a finished run from before
            steps[key] = list(read_bundle(work / key).manifest.compression.steps)
        else:
            steps[key] = compress(teacher, work / key, config, data=data).steps
    parent = steps["int8"][0]

    student = asdict(read_bundle(work / "distill").manifest.arch)
    teacher_config = read_bundle(teacher).manifest.training.config
    labels_dir = work / "labels-only"
    if (labels_dir / "manifest.json").is_file():
        labels_manifest = read_bundle(labels_dir).manifest
        labels_test, labels_seconds = labels_manifest.metrics["test"], labels_manifest.training.seconds
    else:
        config = {**teacher_config, "windows": tuple(teacher_config["windows"])}
        config |= {"arch": student["name"], "width": student["width"]}
        labels_only = train(dataset, labels_dir, TrainConfig(**config))
        labels_test, labels_seconds = labels_only.metrics["test"], labels_only.seconds

    result = {
        "data": args.data or "embedded default (edgedx data synth, default settings)",
        "teacher": _summary(parent),
        "int8": {
            **_summary(steps["int8"][-1]),
            "float32_tflite_bytes": parent["bytes"],
            "size_ratio_to_float32_tflite": steps["int8"][-1]["bytes"] / parent["bytes"],
            "test_auc_drop": parent["test"]["auc"] - steps["int8"][-1]["test"]["auc"],
        },
        "prune": {
            **_summary(steps["prune"][-1]),
            "gzip_ratio_to_dense": steps["prune"][-1]["gzip_bytes"] / parent["gzip_bytes"],
            "test_auc_drop": parent["test"]["auc"] - steps["prune"][-1]["test"]["auc"],
        },
        "distill": {
            **_summary(steps["distill"][-1]),
            "parameter_fraction": steps["distill"][-1]["parameters"] / parent["parameters"],
            "test_auc_gap_to_teacher": parent["test"]["auc"] - steps["distill"][-1]["test"]["auc"],
        },
        "labels_only": {
            "arch": student,
            "config": "same as the teacher's training (epochs, seed, augmentation, early stopping)",
            "test_auc": labels_test["auc"],
            "test_auc_ci95": labels_test["auc_ci95"],
            "test_sensitivity": labels_test["sensitivity"],
            "test_specificity": labels_test["specificity"],
            "seconds": round(labels_seconds, 1),
        },
        "default": {
            "steps": [_summary(row) | {"step": row["step"]} for row in steps["default"]],
            "test_auc_drop": parent["test"]["auc"] - steps["default"][-1]["test"]["auc"],
        },
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
    }
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"compress-{name}-tf{tf.__version__}-cpu{os.cpu_count()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    final = steps["default"][-1]
    print(f"| {name} | params | bytes | gzip bytes | test AUC | flips |")
    print("|---|---|---|---|---|---|")
    for label, row in [
        ("teacher (float32 TFLite)", parent),
        ("int8", steps["int8"][-1]),
        ("prune 75%", steps["prune"][-1]),
        ("distill", steps["distill"][-1]),
        ("distill+prune+int8", final),
    ]:
        print(
            f"| {label} | {row['nonzero_parameters']:,} nz / {row['parameters']:,} | {row['bytes']:,} | "
            f"{row['gzip_bytes']:,} | {row['test']['auc']:.4f} | {row['flips']:.3f} |"
        )
    print(f"| labels-only student | {student['parameters']:,} | | | {labels_test['auc']:.4f} | |")
    print(f"-> {out.relative_to(HERE)}")


if __name__ == "__main__":
    main()
