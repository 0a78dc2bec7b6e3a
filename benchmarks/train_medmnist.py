"""Float training on real MedMNIST data, with edgedx's defaults, against the published figures.

Runs ``edgedx train --data ../shared/data/<flavour>.npz --out <dir> --json`` exactly as a user
would, times it, and writes ``results/train-<flavour>-<arch>-tf<version>-cpu<cores>.json`` and a
Markdown row. Run by hand (minutes per flavour on 2 cores):

    python benchmarks/train_medmnist.py pneumoniamnist organamnist
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"

#: MedMNIST v2 paper (Yang et al. 2023), test split: (AUC, accuracy) of the ResNet rows.
PUBLISHED = {
    "pneumoniamnist": {
        "ResNet-18 (28)": (0.944, 0.854),
        "ResNet-18 (224)": (0.956, 0.864),
        "ResNet-50 (28)": (0.948, 0.854),
        "ResNet-50 (224)": (0.962, 0.884),
    },
    "organamnist": {
        "ResNet-18 (28)": (0.997, 0.935),
        "ResNet-50 (28)": (0.997, 0.935),
        "ResNet-18 (224)": (0.998, 0.951),
    },
}


def run(flavour: str, work: Path, extra: list[str]) -> dict:
    data = SHARED / f"{flavour}.npz"
    if not data.is_file():
        sys.exit(f"{data} is absent; real data lives in ../shared/data")
    out = work / flavour
    command = ["edgedx", "train", "--data", str(data), "--out", str(out), "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    from edgedx.bundle import read_bundle

    manifest = read_bundle(out).manifest
    import tensorflow as tf  # only for the version in the file name

    return {
        "command": " ".join(["edgedx", "train", "--data", f"../shared/data/{flavour}.npz", "--out", "OUT", *extra]),
        "wall_seconds": round(seconds, 1),
        "cores": os.cpu_count(),
        "arch": asdict(manifest.arch),
        "epochs_run": manifest.training.epochs_run,
        "best_epoch": manifest.training.best_epoch,
        "threshold": report["threshold"],
        "metrics": report["metrics"],
        "published": PUBLISHED.get(flavour, {}),
        "tensorflow": tf.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flavours", nargs="+", choices=sorted(PUBLISHED))
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgedx-bench"), help="where bundles go")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more `edgedx train` options after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    (HERE / "results").mkdir(exist_ok=True)
    for flavour in args.flavours:
        result = run(flavour, args.work, extra)
        test = result["metrics"]["test"]
        name = f"train-{flavour}-{result['arch']['name']}-tf{result['tensorflow']}-cpu{result['cores']}.json"
        (HERE / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"{flavour}: test AUC {test['auc']:.4f} (95% CI {test['auc_ci95'][0]:.4f}-{test['auc_ci95'][1]:.4f}), "
            f"accuracy {test['accuracy']:.4f}, {result['wall_seconds']:.0f}s -> results/{name}"
        )


if __name__ == "__main__":
    main()
