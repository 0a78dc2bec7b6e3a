"""``edgedx bench`` on tiny data: figures from separate processes, budgets, report files, offline kit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import needs_tf
from typer.testing import CliRunner

from edgedx.bench import bench, export_kit, import_results
from edgedx.bundle import read_bundle
from edgedx.cli import app
from edgedx.compress import CompressConfig, compress
from edgedx.data import load_dataset, recorded_dataset
from edgedx.errors import DataError
from edgedx.train import TrainConfig, train

pytestmark = [pytest.mark.tf, needs_tf]


@pytest.fixture(scope="module")
def bundles(tiny_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    parent = train(load_dataset(tiny_npz), root / "float", TrainConfig(arch="seed-cnn", epochs=3, batch_size=16))
    config = CompressConfig(quantize="int8", max_auc_drop=0.5, integer_only=True)  # the report names full int8
    small = compress(parent.bundle.path, root / "int8", config)
    return parent.bundle.path, small.bundle.path


def _device(tmp_path, workers: int = 1, **budgets) -> str:
    lines = ['description = "test box"', f"workers = {workers}", "threads = 1", "cpu_affinity = [0]"]
    lines += ["memory_limit_mb = 2048", "[budgets]"]
    lines += [f"{k} = {v}" for k, v in budgets.items()]
    path = tmp_path / "testbox.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bench_measures_every_model_and_writes_the_report(bundles, tmp_path):
    out = tmp_path / "report"
    result = bench(bundles, _device(tmp_path, model_size_kb=1e6), runs=15, warmup=2, out=out)
    roles = [(r["bundle"], r["role"]) for r in result.rows]
    assert roles == [("float", "keras"), ("int8", "keras"), ("int8", "tflite-float32"), ("int8", "tflite-int8")]
    keras_ref, *_, int8 = result.rows
    assert keras_ref["clinical"]["flips"] == 0.0  # the reference against itself
    assert int8["deploy"] and int8["budgets_missed"] == [] and result.missed == []
    n_test = len(recorded_dataset(read_bundle(bundles[0]).manifest.data).splits["test"])
    for row in result.rows:
        assert row["clinical"]["n"] == n_test and 0.0 <= row["clinical"]["auc"] <= 1.0
        lo, hi = row["clinical"]["flips_ci95"]
        assert 0.0 <= lo <= row["clinical"]["flips"] <= hi <= 1.0 and hi > 0  # no flips still leaves doubt
        assert len(row["latency_ms"]) == 15 and row["device"]["p50_ms"] <= row["device"]["p99_ms"]
        assert row["device"]["peak_rss_mb"] > 0 and row["device"]["cold_start_seconds"] > 0
        # TFLite models were measured in a process without TensorFlow; Keras needs it
        assert row["device"]["tensorflow_loaded"] == (row["role"] == "keras")
        assert row["device"]["threads"] == 1
    for name in ("bench.json", "report.md", "roc.png", "latency.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "full int8" in report and "every deployed model meets every budget" in report
    assert json.loads((out / "bench.json").read_text())["rows"][3]["role"] == "tflite-int8"


def test_bench_times_the_profiles_workers_at_once(bundles, tmp_path):
    """A profile of two workers: each model is loaded twice in its probe and both are timed at once,
    as `edgedx serve --device` runs them."""
    out = tmp_path / "report"
    result = bench([bundles[1]], _device(tmp_path, workers=2), runs=10, warmup=2, out=out)
    for row in result.rows:
        assert (row["device"]["workers"], row["device"]["threads"]) == (2, 1)
        assert len(row["latency_ms"]) == 2 * 10
    assert "2 workers x 1 thread (timed at once)" in (out / "report.md").read_text()


def test_bench_measures_an_onnx_model_on_onnx_runtime_without_tensorflow(bundles, tmp_path):
    onnx = compress(bundles[0], tmp_path / "onnx", CompressConfig(quantize="onnx-float32")).bundle
    result = bench([onnx.path], _device(tmp_path), runs=10, warmup=2, include_keras=False)
    rows = {r["role"]: r for r in result.rows}
    assert list(rows) == ["tflite-float32", "onnx-float32"] and rows["onnx-float32"]["deploy"]
    measured = rows["onnx-float32"]
    assert measured["precision"] == "float32 (ONNX Runtime)" and measured["device"]["backend"] == "onnxruntime"
    assert measured["device"]["tensorflow_loaded"] is False
    # the same network on two engines: no decision differs from LiteRT float32's (without Keras, the reference)
    assert measured["clinical"]["flips"] == 0.0
    assert measured["clinical"]["auc"] == pytest.approx(rows["tflite-float32"]["clinical"]["auc"], abs=1e-3)


def test_bench_notes_a_deployed_engine_only_where_the_profile_lacks_it():
    from edgedx.bench._report import _engine_notes
    from edgedx.devices import DeviceProfile

    rows = [
        {"bundle": "b", "role": "tflite-float32", "deploy": False},
        {"bundle": "b", "role": "onnx-float32", "deploy": True},
    ]
    assert _engine_notes(rows, DeviceProfile("pc", "", threads=1, engines=("tflite", "onnx"))) == []
    assert len(_engine_notes(rows, DeviceProfile("box", "", threads=1))) == 1
    rows[1]["deploy"], rows[0]["deploy"] = False, True
    assert _engine_notes(rows, DeviceProfile("box", "", threads=1)) == []


def test_bench_calls_a_model_slower_than_float32_only_beyond_a_tie():
    from edgedx.bench._report import _precision_notes
    from edgedx.devices import DeviceProfile

    def row(role, p50):
        return {"bundle": "b", "role": role, "precision": role, "device": {"p50_ms": p50}}

    box = DeviceProfile("box", "", threads=1)
    assert _precision_notes([row("tflite-float32", 0.870), row("onnx-float32", 0.874)], box) == []
    (note,) = _precision_notes([row("tflite-float32", 0.50), row("onnx-float32", 0.83)], box)
    assert "onnx-float32 is slower than float32 on box (p50 0.83 ms vs 0.50 ms)" in note


def test_int8_with_float_ops_is_not_called_full_int8():
    from edgedx.bench._report import precision_label

    assert precision_label("tflite-int8") == "full int8"
    assert precision_label("tflite-int8", 1) == "int8, first 1 op float"
    assert precision_label("tflite-int8", 2) == "int8, first 2 ops float"
    assert precision_label("tflite-float16", 0) == "float16"


def test_missed_budget_exits_non_zero_and_names_it(bundles, tmp_path):
    device = _device(tmp_path, latency_p95_ms=0.0001, model_size_kb=1e6)
    args = ["bench", str(bundles[1]), "--device", device, "--runs", "5", "--warmup", "0", "--out", str(tmp_path / "r")]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 1
    assert "latency_p95_ms" in run.output and "above the testbox budget of 0.0001ms" in run.output
    assert "model_size_kb" not in run.output.split("budget missed", 1)[1]


def test_kit_export_run_import_round_trip(bundles, tmp_path):
    kit = export_kit(bundles, _device(tmp_path), tmp_path / "kit", sample=10, runs=5, warmup=1)
    assert (kit / "run_kit.py").is_file() and (kit / "kit.json").is_file()
    assert not any((kit / "bundles").glob("0-*"))  # the float parent has no TFLite model to carry
    # On the device: only the runner and the base runtime, in a fresh process.
    run = subprocess.run([sys.executable, str(kit / "run_kit.py")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = import_results(kit / "results.json", tmp_path / "imported")
    assert [r["role"] for r in result.rows] == ["tflite-float32", "tflite-int8"]
    assert all(r["clinical"]["n"] == 10 and not r["device"]["tensorflow_loaded"] for r in result.rows)
    assert (tmp_path / "imported" / "report.md").is_file()


def test_import_refuses_other_files(tmp_path):
    from edgedx.errors import DataError

    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="not the results of an edgedx kit"):
        import_results(tmp_path / "x.json")
    (tmp_path / "cut.json").write_text('{"format": "edgedx-kit-results", "kit": {}}')
    with pytest.raises(DataError, match=r"cut.json: incomplete kit results \(missing machine, models\)"):
        import_results(tmp_path / "cut.json")


def test_runtime_refuses_a_tampered_model(bundles, tmp_path):
    import shutil

    from edgedx.errors import BundleError
    from edgedx.runtime import Model

    copy = tmp_path / "copy"
    shutil.copytree(bundles[1], copy)
    model_file = next(copy.glob("*int8*.tflite"))
    content = bytearray(model_file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    model_file.write_bytes(bytes(content))
    with pytest.raises(BundleError, match=f"{model_file.name} fails its checksum"):
        Model.load(copy)
    model_file.write_bytes(bytes(content[: len(content) // 2]))  # truncated in transfer
    with pytest.raises(BundleError, match="fails its checksum"):
        Model.load(copy)


def test_runtime_predict_is_preprocess_then_model_then_threshold(bundles, tiny_npz):
    """Model.predict against the steps done by hand: the one prediction path adds nothing and drops nothing."""
    import numpy as np

    from edgedx.outputs import probabilities
    from edgedx.preprocess import to_model_input
    from edgedx.runtime import Model

    model = Model.load(bundles[1], threads=1)
    for value in (10.0, 120.0, 220.0):
        image = np.full((16, 16), value, np.float32)
        image[4:12, 4:12] += value / 2
        model_input = to_model_input(image, model.spec)
        logits = model.runner.logits(model_input[None])
        by_hand = probabilities(logits, model.activation, model.calibration)[0]
        prediction = model.predict(image)
        assert float(prediction.probabilities) == pytest.approx(float(by_hand), abs=1e-7)
        flagged = model.guard.scores(model_input[None])[0] > 1
        assert prediction.in_distribution is not flagged
        assert prediction.decision == (None if flagged else int(by_hand >= model.threshold))
        assert set(prediction.timings_ms) == {"preprocess", "guard", "inference"}
    preprocessed = to_model_input(image, model.spec)
    assert float(model.predict(preprocessed).probabilities) == pytest.approx(float(by_hand), abs=1e-7)
    with pytest.raises(DataError, match="give a 2-D image or a preprocessed"):
        model.predict(np.zeros((3, 3, 3, 3), np.float32))
    assert model.predict_batch([]) == []


def test_bench_reads_the_test_split_from_the_preprocessed_cache_a_chunk_at_a_time(bundles, tmp_path, monkeypatch):
    """The probes' inputs are the cache's, copied in chunks, equal to preprocessing every image
    in memory; a second run preprocesses nothing (bench never holds the split)."""
    import numpy as np

    from edgedx.bench import _bench
    from edgedx.preprocess import to_model_inputs

    read = [read_bundle(b) for b in bundles]
    test = recorded_dataset(read[0].manifest.data).splits["test"]
    expected = to_model_inputs([test.read(i) for i in range(len(test))], read[0].preprocess)
    monkeypatch.setattr(_bench, "_COPY_CHUNK", 5)
    (tmp_path / "a").mkdir()
    labels, files = _bench._test_inputs(read, None, None, 0, tmp_path / "a")
    np.testing.assert_array_equal(labels, test.labels)
    assert files[str(bundles[0])] == files[str(bundles[1])]  # one spec, one file
    np.testing.assert_allclose(np.load(files[str(bundles[0])]), expected, atol=1e-5)

    from edgedx.data import cache as cache_module

    def no_build(*args, **kwargs):
        raise AssertionError("the test split was preprocessed again")

    monkeypatch.setattr(cache_module, "_scale_shards", no_build)
    (tmp_path / "b").mkdir()
    _, again = _bench._test_inputs(read, None, 7, 0, tmp_path / "b")  # a sample, from the cache
    sample = np.load(again[str(bundles[0])])
    assert len(sample) == 7
    assert any(np.allclose(sample[0], row, atol=1e-5) for row in expected)
