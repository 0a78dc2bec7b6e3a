"""How much compression changes a teacher's decisions, next to how much training it again does.

Issue 12 asks the default student to flip at most 3% of its teacher's decisions and keep its
sensitivity within 0.02. Those figures mean something only beside the disagreement between two
teachers trained by the same recipe on the same data with another seed. This measures both, on
the validation and test splits:

    edgedx train --data work/headct --out work/headct-float-seed1 --seed 1
    python benchmarks/retrain_agreement.py work/headct-float work/headct-float-seed1 work/headct-small \\
        --out benchmarks/results/retrain-agreement.json

The first bundle is the reference. Every bundle is scored with its deployed model (its Keras
model when it has no TFLite one), as calibrated probabilities. Each other bundle is compared
with the reference at two thresholds: its own, and the one at which its validation decisions
agree most with the reference's (the threshold ``compress`` gives a student). Figures: AUC;
decisions flipped against the reference; sensitivity and specificity change against it; 95%
intervals from resampling patients (slices of one patient are not independent; a patient is
the first folder of a slice's path, as in the synthetic set and most DICOM exports). On the embedded
synthetic set, also sensitivity by how many pixels of blood the slice shows at the model's input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SPLITS = ("val", "test")
#: Upper edges of the lesion-size bins, in pixels of blood at the model's input size.
SIZE_BINS = (1.0, 4.0, 16.0, np.inf)


def scores_of(bundle, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, str]:
    """Calibrated probabilities on each split of ``inputs`` from the bundle's deployed model (its
    Keras model if it has none, loaded once), that model's threshold and its role."""
    from edgedx.precision import deployed_role

    role = deployed_role(bundle.manifest.models, bundle.manifest.deploy)
    if role is not None:
        from edgedx.runtime import Model

        model = Model.load(bundle, role=role)
        return {s: model.predict_inputs(x) for s, x in inputs.items()}, float(model.threshold), role
    from edgedx._tf import keras
    from edgedx.outputs import probabilities

    net = keras.models.load_model(bundle.model_path("keras"), compile=False)
    activation, calibration = bundle.manifest.task.activation, bundle.calibration("keras")
    scores = {
        s: probabilities(net.predict(x, batch_size=128, verbose=0), activation, calibration) for s, x in inputs.items()
    }
    return scores, bundle.model_threshold("keras"), "keras"


def lesion_pixels(dataset, split: str, size: int) -> np.ndarray | None:
    """Pixels of blood in each slice of ``split`` at a ``size``-pixel input; None for data not synthesized here."""
    from edgedx.data.synth import SIZE, config_from_record, render_study, slice_file, study_patient_id

    if not dataset.synthetic:
        return None
    config = config_from_record(dataset.synthetic)
    wanted = {i.split("/")[0] for i in dataset.splits[split].ids}
    pixels: dict[str, float] = {}
    for study in range(config.studies):
        if study_patient_id(config, study) in wanted:
            for index, image in enumerate(render_study(config, study)[2]):
                pixels[slice_file(config, study, index)] = image.masks["blood"].sum() * (size / SIZE) ** 2
    return np.array([pixels[i] for i in dataset.splits[split].ids])


def positive_calls(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Positive calls, by the rule every edgedx model decides with."""
    from edgedx.outputs import decisions

    return decisions(scores, threshold).astype(bool)


def change(decided: np.ndarray, reference: np.ndarray, positive: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Flips, sensitivity change and specificity change over ``rows`` (indices, repeats allowed)."""
    d, r, p = decided[rows], reference[rows], positive[rows]
    return {
        "flips": float(np.mean(d != r)),
        "sensitivity_change": float(np.mean(d[p]) - np.mean(r[p])),
        "specificity_change": float(np.mean(~d[~p]) - np.mean(~r[~p])),
    }


def with_intervals(
    decided: np.ndarray, reference: np.ndarray, positive: np.ndarray, patients: np.ndarray, resamples: int
) -> dict[str, list[float]]:
    """Each figure of :func:`change` with a 95% interval from resampling patients with replacement."""
    point = change(decided, reference, positive, np.arange(len(decided)))
    groups = [np.flatnonzero(patients == p) for p in np.unique(patients)]
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        picked = rng.integers(0, len(groups), len(groups))
        draws.append(change(decided, reference, positive, np.concatenate([groups[i] for i in picked])))
    return {
        k: [round(v, 4), *np.round(np.percentile([d[k] for d in draws], [2.5, 97.5]), 4).tolist()]
        for k, v in point.items()
    }


def sensitivity_by_size(decided: np.ndarray, positive: np.ndarray, pixels: np.ndarray) -> list[dict[str, float]]:
    rows, low = [], 0.0
    for high in SIZE_BINS:
        inside = positive & (pixels > low) & (pixels <= high)
        rows.append({"pixels_above": low, "pixels_up_to": high, "n": int(inside.sum())})
        rows[-1]["sensitivity"] = round(float(decided[inside].mean()), 3) if inside.any() else None
        low = high
    return rows


def print_row(row: dict, size: int) -> None:
    print(f"\n{row['bundle']} ({row['role']})")
    for s in SPLITS:
        r = row[s]
        print(f"  {s}: AUC {r['auc']:.4f}, sensitivity {r['sensitivity']:.3f} at its own threshold")
        for name in ("own", "matched"):
            f, ds, dp = (r[name][k] for k in ("flips", "sensitivity_change", "specificity_change"))
            print(
                f"    {name:>7} threshold: flips {f[0]:.3f} ({f[1]:.3f}-{f[2]:.3f}), "
                f"sensitivity {ds[0]:+.3f} ({ds[1]:+.3f} to {ds[2]:+.3f}), "
                f"specificity {dp[0]:+.3f} ({dp[1]:+.3f} to {dp[2]:+.3f})"
            )
        for b in r.get("sensitivity_by_lesion_pixels", []):
            where = f"{b['pixels_above']:g}-{b['pixels_up_to']:g} px at {size}x{size}"
            print(f"    blood {where} (matched threshold): n {b['n']}, sensitivity {b['sensitivity']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="the teacher bundle")
    parser.add_argument("others", type=Path, nargs="+", help="a retrained teacher, students, ...")
    parser.add_argument("--data", type=Path, help="the reference's data, if not where its manifest says")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON too")
    args = parser.parse_args()

    from edgedx import metrics as clinical
    from edgedx.bundle import read_bundle
    from edgedx.compress._pipeline import _matching_threshold
    from edgedx.data import recorded_dataset
    from edgedx.data.cache import cache_split

    bundles = [read_bundle(p) for p in (args.reference, *args.others)]
    dataset = recorded_dataset(bundles[0].manifest.data or {}, args.data)
    if dataset.num_classes != 2 or dataset.multilabel:
        parser.error(f"{dataset.name} is not a two-class data set; this compares binary decisions")
    labels = {s: dataset.splits[s].labels == 1 for s in SPLITS}
    patients = {s: np.array([i.split("/")[0] for i in dataset.splits[s].ids]) for s in SPLITS}
    size = bundles[0].preprocess.size
    pixels = {s: lesion_pixels(dataset, s, size) for s in SPLITS}

    scored = []
    for b in bundles:
        spec = b.preprocess
        x = {s: np.asarray(cache_split(dataset, s, spec).inputs.normalised(spec.mean, spec.std)) for s in SPLITS}
        scores, threshold, role = scores_of(b, x)
        scored.append({"bundle": str(b.path), "role": role, "scores": scores, "threshold": threshold})
    ref = scored[0]
    ref_decided = {s: positive_calls(ref["scores"][s], ref["threshold"]) for s in SPLITS}

    report = []
    for item in scored:
        matched = _matching_threshold(item["scores"]["val"], ref["scores"]["val"], ref["threshold"])
        row = {"bundle": item["bundle"], "role": item["role"], "own_threshold": item["threshold"]}
        row["matched_threshold"] = matched
        for s in SPLITS:
            y, z = labels[s], item["scores"][s]
            row[s] = {
                "auc": round(clinical.auc(y, z), 4),
                "sensitivity": round(float(np.mean(positive_calls(z, item["threshold"])[y])), 4),
            }
            for name, t in (("own", item["threshold"]), ("matched", matched)):
                row[s][name] = with_intervals(positive_calls(z, t), ref_decided[s], y, patients[s], args.resamples)
            if pixels[s] is not None:
                row[s]["sensitivity_by_lesion_pixels"] = sensitivity_by_size(positive_calls(z, matched), y, pixels[s])
        report.append(row)

    for row in report:
        print_row(row, size)
    if args.out:
        args.out.write_text(json.dumps({"input_size": size, "rows": report}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
