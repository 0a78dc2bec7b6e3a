"""Does `edgedx train --init` help a site with few labels? Fine-tune vs from scratch on 10% of new data.

A differently seeded synthetic set stands in for a hospital's own scans: its training split is cut to
10% of its patients; the model fine-tuned from a trained float bundle and one trained from scratch
get the same epochs and are measured on the same (full) test split.

    python benchmarks/init_vs_scratch.py PARENT_BUNDLE [--seed 1] [--fraction 0.1] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgedx.bundle import read_bundle
from edgedx.data import SynthConfig, default_dataset
from edgedx.data.dataset import Split
from edgedx.train import TrainConfig, train


def first_patients(split: Split, fraction: float) -> Split:
    """The slices of the first ``fraction`` of the split's patients (folder = patient)."""
    patients = sorted({i.split("/")[0] for i in split.ids})
    keep = set(patients[: max(2, round(fraction * len(patients)))])
    index = [i for i, name in enumerate(split.ids) if name.split("/")[0] in keep]
    return Split(
        ids=tuple(split.ids[i] for i in index), labels=split.labels[index], read=lambda i: split.read(index[i])
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("parent", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    parent = read_bundle(args.parent)
    site = default_dataset(config=SynthConfig(seed=args.seed))
    small = replace(site, splits={**site.splits, "train": first_patients(site.splits["train"], args.fraction)})
    config = TrainConfig(epochs=args.epochs, patience=args.epochs)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, init in (("from scratch", None), (f"--init {parent.name}", parent.path)):
            began = time.perf_counter()
            result = train(small, Path(tmp) / name.replace(" ", "-"), config, init=init)
            test = result.metrics["test"]
            rows[name] = {
                "test_auc": test["auc"],
                "auc_ci95": test["auc_ci95"],
                "sensitivity": test["sensitivity"],
                "specificity": test["specificity"],
                "ece": test["ece"],
                "seconds": round(time.perf_counter() - began, 1),
            }
    print(
        json.dumps(
            {
                "train_slices": len(small.splits["train"]),
                "positives": int(np.sum(small.splits["train"].labels)),
                "epochs": args.epochs,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
