"""The out-of-distribution guard and probability calibration: numpy only, no TensorFlow."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from edgedx.calibration import (
    Calibration,
    expected_calibration_error,
    fit_to_labels,
    recalibrate,
)
from edgedx.errors import BundleError, DataError
from edgedx.guard import InputGuard, Scope, fit_guard, flag_rate, input_features


def heads(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """Bright discs of varying radius and position on a dark field, two channels: an in-distribution family."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 2), np.float32)
    for i in range(n):
        cx, cy = size / 2 + rng.normal(0, 1.5, 2)
        r = rng.uniform(0.3, 0.4) * size
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).astype(np.float32)
        out[i, ..., 0] = disc * rng.uniform(0.8, 1.0) + rng.normal(0, 0.05, (size, size))
        out[i, ..., 1] = disc * 0.5 + rng.normal(0, 0.05, (size, size))
    return out


def test_guard_keeps_its_own_kind_and_flags_other_images():
    rng = np.random.default_rng(0)
    train, val, test = heads(rng, 400), heads(rng, 200), heads(rng, 400)
    guard = fit_guard(train, val, Scope(), target_rate=0.01)
    assert guard.rates["val"] <= 0.01 and flag_rate(guard, test) <= 0.03
    wide = heads(rng, 50, size=32)
    wide[..., 0] = np.clip(wide[..., 0] + 0.6 * (np.arange(32) / 32)[None, None, :], 0, None)  # a gradient
    bars = np.zeros((50, 32, 32, 2), np.float32)
    bars[:, :, ::4] = 1.0  # stripes: nothing like a disc
    assert flag_rate(guard, bars) == 1.0 and flag_rate(guard, wide) > 0.9
    result = guard.check(bars[0])
    assert not result.in_distribution and result.score > 1 and result.reasons
    assert guard.check(test[0]).score is not None


def test_guard_survives_the_bundle_round_trip():
    rng = np.random.default_rng(1)
    guard = fit_guard(heads(rng, 100), heads(rng, 50), Scope(modalities=("CT",), body_parts=("HEAD",)))
    back = InputGuard.load(guard.summary(), guard.arrays())
    x = heads(rng, 5)
    np.testing.assert_allclose(back.scores(x), guard.scores(x))
    assert back.scope == guard.scope
    with pytest.raises(BundleError, match="not a guard file"):
        InputGuard.load(guard.summary(), b"not an npz")


def test_features_are_a_thumbnail_and_quantiles_per_channel():
    x = np.random.default_rng(2).random((3, 64, 64, 3)).astype(np.float32)
    assert input_features(x).shape == (3, 8 * 8 * 3 + 5 * 3)
    np.testing.assert_allclose(input_features(x[0]), input_features(x)[0])


def slice_header(**values) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_scope_reads_modality_body_part_localizer_and_plane():
    scope = Scope.for_training(["CT"], ["HEAD"])
    assert set(scope.body_parts) == {"HEAD", "BRAIN", "SKULL"} and scope.axial_only
    assert scope.violations(slice_header()) == []
    assert scope.violations(slice_header(BodyPartExamined="BRAIN")) == []
    tilted = np.cos(np.radians(25)), np.sin(np.radians(25))  # a gantry tilt of 25 degrees is still axial
    assert scope.violations(slice_header(ImageOrientationPatient=[1, 0, 0, 0, *tilted])) == []
    assert scope.violations(slice_header(Modality="MR"))[0].startswith("modality MR")
    assert scope.violations(slice_header(BodyPartExamined="CHEST"))[0].startswith("body part CHEST")
    assert "localizer" in scope.violations(slice_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))[0]
    coronal = scope.violations(slice_header(ImageOrientationPatient=[1, 0, 0, 0, 0, -1]))
    assert coronal and "90 degrees from axial" in coronal[0]
    assert Scope().violations(slice_header(Modality="MR", BodyPartExamined="CHEST")) == []  # nothing to check


def test_platt_scaling_calibrates_shifted_logits_and_keeps_the_ranking():
    rng = np.random.default_rng(3)
    y = (rng.random(4000) < 0.3).astype(np.int64)
    true_logit = np.where(y == 1, 1.0, -1.0) * 1.5 + rng.normal(0, 1.2, y.size)
    raw = 2.5 * true_logit + 3.0  # an overconfident model biased towards "positive"
    sigmoid = 1 / (1 + np.exp(-raw))
    calibration = fit_to_labels(raw[:2000, None], y[:2000])
    assert calibration.method == "platt" and calibration.scale > 0
    calibrated = recalibrate(sigmoid[2000:], calibration)
    assert expected_calibration_error(y[2000:], sigmoid[2000:]) > 0.15
    assert expected_calibration_error(y[2000:], calibrated) < 0.03
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(sigmoid[2000:], kind="stable"))
    cut = calibration.probability_threshold(0.8)
    assert np.array_equal(sigmoid[2000:] >= 0.8, calibrated >= cut - 1e-12)


def test_temperature_scaling_for_multiclass():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 3000)
    logits = rng.normal(0, 1, (3000, 3))
    logits[np.arange(3000), y] += 1.5
    hot = 4.0 * logits  # overconfident
    calibration = fit_to_labels(hot, y)
    assert calibration.method == "temperature" and calibration.scale < 0.5  # cools the overconfident model
    softmax = np.exp(hot) / np.exp(hot).sum(axis=1, keepdims=True)
    cooled = recalibrate(softmax, calibration)
    assert expected_calibration_error(y, cooled) < 0.03 < expected_calibration_error(y, softmax)
    with pytest.raises(BundleError):
        Calibration("platt", -1.0, 0.0)


def test_bench_ood_report_says_what_the_deployed_model_makes_of_each_file(tiny_headct, tmp_path):
    """`edgedx bench --ood`: a slice of the model's kind, one out of its scope, and a file that is not DICOM."""
    from pathlib import Path

    from edgedx.bench._bench import ood_report
    from edgedx.bundle import read_bundle

    shipped = read_bundle(Path(__file__).resolve().parents[1] / "models" / "headct-ich-int8")
    folder = tmp_path / "other"
    folder.mkdir()
    head = pydicom.dcmread(next(tiny_headct.rglob("*.dcm")))
    head.save_as(folder / "head.dcm")
    head.Modality = "MR"
    head.save_as(folder / "mr.dcm")
    (folder / "notes.txt").write_text("not an image")
    report = ood_report(shipped, folder)
    rows = {row["file"]: row for row in report["files"]}
    assert rows["mr.dcm"]["status"] == "out_of_distribution" and rows["mr.dcm"]["why"].startswith("modality MR")
    assert rows["notes.txt"]["status"] == "unreadable" and "not a DICOM file" in rows["notes.txt"]["why"]
    assert rows["head.dcm"]["status"] in ("positive", "negative", "out_of_distribution")
    assert "probability" in rows["head.dcm"] and "probability" not in rows["mr.dcm"]
    assert report["flagged"] + report["classified"] + report["unreadable"] == 3 and report["unreadable"] == 1
    with pytest.raises(DataError, match="not a folder"):
        ood_report(shipped, folder / "notes.txt")


def test_a_matched_calibration_from_an_older_bundle_still_applies():
    """Bundles compressed before 2026-12-07 carry ``matched`` fits (least squares onto the parent)."""
    calibration = Calibration.from_dict({"method": "matched", "scale": 0.85, "shift": -2.5})
    assert calibration.apply(np.array([1.0, 3.0])) == pytest.approx([-1.65, 0.05])
    assert Calibration.from_dict(calibration.to_dict()) == calibration
