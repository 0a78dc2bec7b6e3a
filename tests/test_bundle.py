"""Model bundles: write, read back, and refuse damaged ones."""

from __future__ import annotations

import json

import pytest

from edgedx.bundle import (
    MANIFEST,
    InputRecord,
    Manifest,
    ModelRecord,
    TaskRecord,
    ThresholdRecord,
    read_bundle,
    write_bundle,
)
from edgedx.calibration import Calibration
from edgedx.errors import BundleError
from edgedx.preprocess import PreprocessSpec, parse_windows

SPEC = PreprocessSpec(size=32, windows=parse_windows("brain,subdural"), mean=(0.2, 0.3), std=(0.4, 0.5))
PLATT = Calibration("platt", 0.7, -0.2)


def _manifest() -> Manifest:
    return Manifest(
        name="t",
        task=TaskRecord(kind="binary", class_names=("no", "yes"), activation="sigmoid"),
        input=InputRecord(shape=(1, 32, 32, 2), modality=("CT",)),
        preprocess=SPEC,
        threshold=ThresholdRecord(value=0.4, policy="youden"),
        models={"keras": ModelRecord(threshold=0.35, calibration=PLATT)},
        data={"name": "d", "fingerprint": {"train": "ab" * 32}},
    )


def _edit_manifest(bundle_dir, edit) -> None:
    record = json.loads((bundle_dir / MANIFEST).read_text())
    edit(record)
    (bundle_dir / MANIFEST).write_text(json.dumps(record))


@pytest.fixture
def bundle_dir(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights" * 100)
    return write_bundle(tmp_path / "b", _manifest(), models={"keras": model}, files={"history.json": [{"e": 1}]}).path


class TestBundle:
    def test_round_trip(self, bundle_dir):
        b = read_bundle(bundle_dir)
        assert b.preprocess == SPEC and b.threshold == 0.4 and b.class_names == ["no", "yes"]
        record = b.manifest.models["keras"]
        assert record.file == "model.keras" and record.bytes == 700 and len(record.sha256) == 64
        assert record.calibration == PLATT and b.model_threshold("keras") == 0.35
        assert b.manifest.input.modality == ("CT",) and b.manifest.train_fingerprint == "ab" * 32
        assert b.manifest == read_bundle(bundle_dir).manifest  # what was written is what is read
        assert b.model_path("keras").read_bytes() == b"weights" * 100
        assert json.loads((bundle_dir / "history.json").read_text()) == [{"e": 1}]
        assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".b.")], "staging left behind"

    def test_tampered_model_refused(self, bundle_dir):
        (bundle_dir / "model.keras").write_bytes(b"weights" * 99 + b"Weights")
        with pytest.raises(BundleError, match="model.keras fails its checksum"):
            read_bundle(bundle_dir)

    def test_truncated_history_refused(self, bundle_dir):
        (bundle_dir / "history.json").write_text("[")
        with pytest.raises(BundleError, match="history.json fails its checksum"):
            read_bundle(bundle_dir)

    def test_missing_file_refused(self, bundle_dir):
        (bundle_dir / "model.keras").unlink()
        with pytest.raises(BundleError, match="model.keras is listed in manifest.json but missing"):
            read_bundle(bundle_dir)

    def test_unknown_role(self, bundle_dir):
        with pytest.raises(BundleError, match="no 'tflite-int8' model; this bundle has keras"):
            read_bundle(bundle_dir).model_path("tflite-int8")

    def test_not_a_bundle(self, tmp_path):
        with pytest.raises(BundleError, match="not a model bundle"):
            read_bundle(tmp_path)
        (tmp_path / MANIFEST).write_text("{")
        with pytest.raises(BundleError, match="not valid JSON"):
            read_bundle(tmp_path)

    def test_other_version_refused_in_one_line_naming_the_version(self, bundle_dir):
        _edit_manifest(bundle_dir, lambda m: m.update(format_version=99))
        with pytest.raises(BundleError, match="bundle format version 99; this edgedx .* reads version 1") as caught:
            read_bundle(bundle_dir)
        assert "\n" not in str(caught.value)

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda m: m.pop("task"), "missing 'task'"),
            (lambda m: m["threshold"].pop("policy"), "threshold: missing 'policy'"),
            (lambda m: m["models"]["keras"].update(weights="x"), "models.keras: unknown field 'weights'"),
            (lambda m: m.update(models=[]), "expected an object, found list"),
            (lambda m: m["preprocess"].pop("size"), "preprocessing spec is malformed"),
            (lambda m: m.update(format="other"), "not an edgedx bundle manifest"),
            (lambda m: m["task"].update(class_names=5), "a field has the wrong type"),
            (lambda m: m["input"].update(shape=7), "a field has the wrong type"),
        ],
    )
    def test_malformed_manifest_names_what_is_wrong(self, bundle_dir, edit, message):
        _edit_manifest(bundle_dir, edit)
        with pytest.raises(BundleError, match=message):
            read_bundle(bundle_dir)

    def test_model_files_must_match_the_records(self, tmp_path):
        model = tmp_path / "model.tflite"
        model.write_bytes(b"x")
        with pytest.raises(BundleError, match=r"model files for \['tflite-int8'\] but records for \['keras'\]"):
            write_bundle(tmp_path / "b", _manifest(), models={"tflite-int8": model})

    def test_no_silent_overwrite(self, bundle_dir, tmp_path):
        with pytest.raises(BundleError, match="already exists"):
            write_bundle(bundle_dir, _manifest(), models={"keras": bundle_dir / "model.keras"})
