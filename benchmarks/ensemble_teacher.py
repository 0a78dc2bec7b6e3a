"""Would an ensemble of teachers teach better? Each bundle's AUC next to their averaged logits'.

Distilling from several teachers (the mean of their logits) costs a forward pass of each per
step. This measures first what that mean itself scores, on the first bundle's validation and test
splits (stop 23 tried it on PneumoniaMNIST; `benchmarks/README.md`):

    edgedx train --data ../shared/data/pneumoniamnist.npz --out work/pn-t1 --seed 1
    python benchmarks/ensemble_teacher.py work/pn-t0 work/pn-t1 work/pn-t2 --out benchmarks/results/x.json

Every bundle is read with the first one's data and preprocessing. Figures per model: validation
and test AUC with 95% bootstrap intervals, and test accuracy, sensitivity and specificity at the
threshold chosen on validation (Youden's J), on uncalibrated probabilities (calibration does not
change AUC, and each model here is thresholded on its own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def figures(y: dict[str, np.ndarray], logits: dict[str, np.ndarray], activation: str) -> dict[str, float | list]:
    from edgedx import metrics
    from edgedx.outputs import probabilities

    scores = {s: probabilities(logits[s], activation) for s in ("val", "test")}
    threshold = metrics.choose_threshold(y["val"], scores["val"])
    val = metrics.evaluate(y["val"], scores["val"], threshold, resamples=2000)
    test = metrics.evaluate(y["test"], scores["test"], threshold, resamples=2000)
    return {
        "val_auc": val["auc"],
        "val_auc_ci95": val["auc_ci95"],
        "test_auc": test["auc"],
        "test_auc_ci95": test["auc_ci95"],
        "test_accuracy": test["accuracy"],
        "test_sensitivity": test["sensitivity"],
        "test_specificity": test["specificity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path, help="trained bundles; the first one's data is used")
    parser.add_argument("--data", help="the data, when the first bundle's recorded source is not on this machine")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()

    from edgedx._tf import keras
    from edgedx.bundle import read_bundle
    from edgedx.data import recorded_dataset
    from edgedx.train import predict_logits, prepare_data

    bundles = [read_bundle(b) for b in args.bundles]
    first = bundles[0]
    prepared = prepare_data(recorded_dataset(first.manifest.data or {}, args.data), first.preprocess)
    activation = first.manifest.task.activation
    y = {s: prepared.y[s] for s in ("val", "test")}
    logits = {}
    for bundle in bundles:
        model = keras.models.load_model(bundle.model_path("keras"), compile=False)
        logits[bundle.name] = {s: predict_logits(model, prepared.x[s]) for s in ("val", "test")}
    mean = {s: np.mean([each[s] for each in logits.values()], axis=0) for s in ("val", "test")}
    rows = {name: figures(y, each, activation) for name, each in logits.items()}
    rows[f"mean of {len(bundles)} logits"] = figures(y, mean, activation)
    print(f"{'model':<24} {'val AUC':>8} {'test AUC':>8} {'95% CI':>15} {'acc':>6} {'sens':>6} {'spec':>6}")
    for name, r in rows.items():
        ci = "{:.3f}-{:.3f}".format(*r["test_auc_ci95"])
        print(
            f"{name:<24} {r['val_auc']:>8.4f} {r['test_auc']:>8.4f} {ci:>15} {r['test_accuracy']:>6.3f} "
            f"{r['test_sensitivity']:>6.3f} {r['test_specificity']:>6.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"bundles": [str(b) for b in args.bundles], "models": rows}, indent=1))


if __name__ == "__main__":
    main()
