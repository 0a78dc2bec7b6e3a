"""Which calibration fit for a compressed binary model: compared on validation studies, not on test.

For a parent bundle (``edgedx train``) and a compressed one made from it (``edgedx compress``), fits
the deployed model's affine logit calibration five ways and measures each one's ECE (15 bins) by
2-fold cross-validation over validation *studies* (slices of one study stay on one side; 20 random
halvings). Fits that use the parent's calibration refit it on the same half: the parent's recorded
Platt fit saw every validation label, which favoured them until 2026-12-07. The test split's ECE is
printed beside it. Run by hand on the README's main job bundles:

    python benchmarks/calibration_fits.py work/headct-float work/headct-small --data work/headct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parent", type=Path)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--data", type=Path, help="the data both were made on (default: as recorded)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="the result file (default: results/calibration-fits-NAME.json)")
    args = parser.parse_args()

    from edgedx._tf import keras
    from edgedx.bundle import read_bundle
    from edgedx.calibration import Calibration, expected_calibration_error, fit_to_labels
    from edgedx.data import recorded_dataset
    from edgedx.outputs import probabilities
    from edgedx.runtime import Model
    from edgedx.train import predict_logits, prepare_data

    parent, compressed = read_bundle(args.parent), read_bundle(args.compressed)
    dataset = recorded_dataset(compressed.manifest.data or {}, args.data)
    data = prepare_data(dataset, compressed.preprocess, None)
    splits = ("train", "val", "test")
    teacher = keras.models.load_model(parent.model_path("keras"), compile=False)
    parent_z = {s: predict_logits(teacher, data.x[s]).reshape(-1) for s in splits}
    deployed = Model.load(compressed.path)
    student = Model.load(compressed.path, role="tflite-float32")
    z = {s: deployed.logits(data.x[s]).reshape(-1) for s in splits}
    z_float = {s: student.logits(data.x[s]).reshape(-1) for s in splits}
    y = data.y

    def fits(val: np.ndarray) -> dict:
        """Each method fitted on the validation cases ``val`` (a boolean mask) and, where it says, train.

        The parent's calibration is fitted again on the same cases: its recorded one saw every
        validation label, so a fit matched to it would see the held-out half's labels too."""
        float_platt = fit_to_labels(z_float["val"][val], y["val"][val])
        parent_platt = fit_to_labels(parent_z["val"][val], y["val"][val])
        target = {s: parent_platt.apply(parent_z[s]) for s in splits}
        return {
            "matched to the compressed float model's Platt fit (validation)": fit_to_reference(
                z["val"][val], float_platt.apply(z_float["val"][val])
            ),
            "Platt on its own logits (validation labels)": fit_to_labels(z["val"][val], y["val"][val]),
            "matched to the parent's calibrated logits (validation)": fit_to_reference(
                z["val"][val], target["val"][val]
            ),
            "matched to the parent's calibrated logits (train + validation)": fit_to_reference(
                np.concatenate([z["train"], z["val"][val]]), np.concatenate([target["train"], target["val"][val]])
            ),
            "parent's calibrated probabilities as soft labels, log loss (train + validation)": soft_label_fit(
                np.concatenate([z["train"], z["val"][val]]), np.concatenate([target["train"], target["val"][val]])
            ),
        }

    def fit_to_reference(logits: np.ndarray, reference: np.ndarray) -> Calibration:
        """Least squares taking the compressed model's logits onto the reference's: what ``compress``
        did before 2026-12-07 (method ``matched``)."""
        scale, shift = np.polyfit(logits, reference, 1)
        return Calibration("matched", float(scale), float(shift))

    def soft_label_fit(logits: np.ndarray, reference_logits: np.ndarray) -> Calibration:
        """Platt scaling with the parent's calibrated probabilities as labels: where least squares on
        logits weighs the confident cases most, log loss weighs the probabilities a reader sees."""
        from scipy.optimize import minimize

        q = 1 / (1 + np.exp(-reference_logits))

        def log_loss(params: np.ndarray) -> float:
            zz = params[0] * logits + params[1]
            return float(np.mean(np.logaddexp(0, zz) - q * zz))

        scale, shift = minimize(log_loss, [1.0, 0.0]).x
        return Calibration("matched", float(scale), float(shift))

    def ece(labels: np.ndarray, logits: np.ndarray, calibration) -> float:
        return expected_calibration_error(labels, probabilities(logits[:, None], "sigmoid", calibration))

    studies = np.array([case.split("/")[0] for case in dataset.splits["val"].ids])
    names = np.unique(studies)
    rng = np.random.default_rng(0)
    cross: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        half = np.isin(studies, rng.permutation(names)[: len(names) // 2])
        for fit_on, measure_on in ((half, ~half), (~half, half)):
            for name, calibration in fits(fit_on).items():
                cross.setdefault(name, []).append(ece(y["val"][measure_on], z["val"][measure_on], calibration))
    every = np.ones(len(studies), bool)
    rows = []
    for name, calibration in fits(every).items():
        p = probabilities(z["test"][:, None], "sigmoid", calibration)
        p_parent = probabilities(parent_z["test"][:, None], "sigmoid", parent.calibration("keras"))
        rows.append(
            {
                "method": name,
                "val_cv_ece_mean": float(np.mean(cross[name])),
                "test_ece": ece(y["test"], z["test"], calibration),
                "test_median_abs_dp_vs_parent": float(np.median(np.abs(p - p_parent))),
                "calibration": calibration.to_dict(),
            }
        )
        print(f"{name:66s} val CV ECE {rows[-1]['val_cv_ece_mean']:.4f}   test ECE {rows[-1]['test_ece']:.4f}")
    result = {
        "parent": parent.name,
        "compressed": compressed.name,
        "deployed_role": deployed.role,
        "val_studies": len(names),
        "repeats": args.repeats,
        "parent_test_ece": ece(y["test"], parent_z["test"], parent.calibration("keras")),
        "rows": rows,
    }
    out = args.out or HERE / "results" / f"calibration-fits-{compressed.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
