"""Model bundles: write, read back, and refuse damaged ones."""

from __future__ import annotations

import json

import pytest

from edgedx.bundle import MANIFEST, read_bundle, write_bundle
from edgedx.errors import BundleError
from edgedx.preprocess import PreprocessSpec, parse_windows

SPEC = PreprocessSpec(size=32, windows=parse_windows("brain,subdural"), mean=(0.2, 0.3), std=(0.4, 0.5))


def _manifest() -> dict:
    return {
        "name": "t",
        "task": {"kind": "binary", "class_names": ["no", "yes"], "output": "logits", "activation": "sigmoid"},
        "input": {"shape": [1, 32, 32, 2], "dtype": "float32"},
        "preprocess": SPEC.to_dict(),
        "threshold": {"value": 0.4, "policy": "youden"},
        "models": {"keras": {"note": "kept"}},
    }


@pytest.fixture
def bundle_dir(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights" * 100)
    return write_bundle(tmp_path / "b", _manifest(), models={"keras": model}, files={"history.json": [{"e": 1}]}).path


class TestBundle:
    def test_round_trip(self, bundle_dir):
        b = read_bundle(bundle_dir)
        assert b.preprocess == SPEC and b.threshold == 0.4 and b.class_names == ["no", "yes"]
        record = b.manifest["models"]["keras"]
        assert record["file"] == "model.keras" and record["bytes"] == 700 and len(record["sha256"]) == 64
        assert record["note"] == "kept"
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

    def test_future_version_refused(self, bundle_dir):
        m = json.loads((bundle_dir / MANIFEST).read_text())
        m["format_version"] = 99
        (bundle_dir / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(BundleError, match="bundle format version 99"):
            read_bundle(bundle_dir)

    def test_no_silent_overwrite(self, bundle_dir, tmp_path):
        with pytest.raises(BundleError, match="already exists"):
            write_bundle(bundle_dir, _manifest(), models={"keras": bundle_dir / "model.keras"})
