"""Input size against test AUC (overall and per subtype) and training time on the embedded head CT.

Trains the default architecture as a multi-label model (any + the five RSNA subtypes) at each input
size with the same epochs and seed, on the embedded synthetic set, and prints one JSON row per size:

    python benchmarks/resolution.py [--sizes 64 128 256] [--epochs 20]

Minutes per size on 2 cores, growing with the square of the size: run by hand.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from edgedx.data import RSNA_LABELS, default_dataset
from edgedx.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    dataset = default_dataset(labels=RSNA_LABELS)
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            result = train(dataset, Path(tmp) / f"s{size}", TrainConfig(input_size=size, epochs=args.epochs))
            test = result.metrics["test"]
            row = {
                "size": size,
                "epochs": args.epochs,
                "epochs_run": result.bundle.manifest.training.epochs_run,
                "seconds": round(time.perf_counter() - began, 1),
                "test_mean_auc": test["mean_auc"],
                "per_label": {k: [v["auc"], v.get("auc_ci95")] for k, v in test["per_label"].items()},
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
