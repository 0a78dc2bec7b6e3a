"""Compression on tiny data: each step does what it says, and the accuracy guard refuses bad int8."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import needs_tf

from edgedx.bundle import MANIFEST, read_bundle
from edgedx.compress import CompressConfig, compress
from edgedx.data import load_dataset, recorded_dataset
from edgedx.errors import CompressionRefused, ConfigError
from edgedx.precision import role_of
from edgedx.preprocess import to_model_inputs
from edgedx.runtime import Model
from edgedx.runtime.probe import LATENCY_TIE
from edgedx.train import TrainConfig, train

pytestmark = [pytest.mark.tf, needs_tf]


@pytest.fixture(scope="module")
def parent(tiny_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "parent"
    config = TrainConfig(arch="resnet-small", width=0.5, epochs=4, batch_size=16)
    return train(load_dataset(tiny_npz), out, config).bundle


def _tflite_kernel_sparsity(path) -> float:
    """Zero fraction of the convolution kernels a TFLite file holds, densified if stored sparse.

    Pruned models are stored in TFLite's sparse encoding: a DENSIFY op expands each kernel. Run
    without delegates and keep every tensor, so those expanded kernels can be read back.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    image = interpreter.get_input_details()[0]
    interpreter.set_tensor(image["index"], np.zeros(image["shape"], image["dtype"]))
    interpreter.invoke()
    ops = interpreter._get_ops_details()
    densified = [int(i) for op in ops if op["op_name"] == "DENSIFY" for i in op["outputs"]]
    kernels = densified or [int(op["inputs"][1]) for op in ops if op["op_name"] == "CONV_2D"]
    values = [interpreter.get_tensor(i) for i in kernels]
    return sum(int(np.count_nonzero(v == 0)) for v in values) / sum(v.size for v in values)


def test_int8_post_training(parent, tmp_path):
    """int8 in, int8 out, scale and zero point recorded; the runtime agrees with the float model."""
    result = compress(parent.path, tmp_path / "q", CompressConfig(quantize="int8"))
    m = read_bundle(result.bundle.path).manifest
    assert m.deploy == "tflite-int8" and {"tflite-float32", "tflite-int8", "keras"} <= set(m.models)
    record = m.models["tflite-int8"]
    assert record.input.dtype == "int8" and record.input.scale > 0
    assert [row["step"] for row in result.steps] == ["parent", "quantize-int8"]
    quantized, parent_row = result.steps[1], result.steps[0]
    assert quantized["bytes"] < 0.4 * parent_row["bytes"]
    assert quantized["flips"] <= 0.1

    dataset = recorded_dataset(m.data)
    x = to_model_inputs(dataset.splits["test"].images(), result.bundle.preprocess)
    int8, float32 = (Model.load(result.bundle.path, role=r) for r in ("tflite-int8", "tflite-float32"))
    agree = (int8.predict_inputs(x) >= int8.threshold) == (float32.predict_inputs(x) >= float32.threshold)
    assert np.mean(agree) >= 0.9  # each at its own threshold, as deployed


def test_compressed_models_are_calibrated_on_their_own_validation_logits(parent, tmp_path):
    """The int8 gets its own Platt fit on the validation labels; the float32 of a quantize-only run
    is the parent itself and keeps the parent's calibration."""
    from edgedx.calibration import fit_to_labels

    bundle = compress(parent.path, tmp_path / "q", CompressConfig(quantize="int8")).bundle
    assert bundle.calibration("tflite-float32") == parent.calibration("keras") == bundle.calibration("keras")
    val = recorded_dataset(parent.manifest.data).splits["val"]
    int8 = Model.load(bundle.path, role="tflite-int8")
    logits = int8.logits(to_model_inputs(list(val.images()), parent.preprocess)).reshape(-1)
    expected = fit_to_labels(logits, val.labels)
    assert int8.calibration.method == "platt"
    assert int8.calibration.scale == pytest.approx(expected.scale, rel=1e-4)
    assert int8.calibration.shift == pytest.approx(expected.shift, rel=1e-4, abs=1e-6)


def test_distill_makes_a_small_student_that_keeps_the_parents_decisions(parent, tmp_path):
    from edgedx._tf import keras
    from edgedx.compress._pipeline import _matching_threshold
    from edgedx.train import predict_scores

    result = compress(parent.path, tmp_path / "d", CompressConfig(distill=True, distill_epochs=3, quantize="none"))
    teacher, student = result.steps[0], result.steps[1]
    assert student["step"] == "distill" and student["parameters"] * 8 <= teacher["parameters"]
    assert "from the teacher's most active channels" in student["notes"][0]
    assert student["test"]["auc"] > 0.9
    assert result.bundle.manifest.deploy == "tflite-float32"
    # its threshold is the one that agrees most with the parent on validation data, not one of its own
    x = to_model_inputs(recorded_dataset(parent.manifest.data).splits["val"].images(), parent.preprocess)
    scores = [
        predict_scores(keras.models.load_model(b.model_path("keras"), compile=False), x, "sigmoid")
        for b in (result.bundle, parent)
    ]
    parent_threshold = parent.calibration("keras").uncalibrated_threshold(parent.threshold)
    assert student["threshold"] == pytest.approx(_matching_threshold(*scores, parent_threshold))


def test_prune_reaches_sparsity_and_shrinks_gzip(parent, tmp_path):
    result = compress(
        parent.path, tmp_path / "p", CompressConfig(prune=True, sparsity=0.75, prune_epochs=3, quantize="dynamic")
    )
    dense, pruned = result.steps[0], result.steps[1]
    assert pruned["nonzero_parameters"] < 0.35 * dense["nonzero_parameters"]
    assert pruned["gzip_bytes"] < 0.5 * dense["gzip_bytes"]
    models = result.bundle.manifest.models
    assert result.bundle.manifest.arch.kernel_sparsity == pytest.approx(0.75, abs=0.01)
    # LiteRT cannot prepare dynamic-range convolutions in the sparse encoding: that one is stored dense
    assert models["tflite-float32"].sparse_encoding is True and models["tflite-dynamic"].sparse_encoding is False
    prediction = Model.load(result.bundle.path).predict(np.full((16, 16), 200.0))
    assert 0 <= float(prediction.probabilities) <= 1
    # quantizing the pruned bundle later stores it as sparse as quantizing it in the same run
    again = compress(result.bundle.path, tmp_path / "q", CompressConfig(quantize="int8")).bundle.manifest
    assert again.arch.kernel_sparsity == result.bundle.manifest.arch.kernel_sparsity
    assert again.models["tflite-float32"].sparse_encoding is True and again.models["tflite-int8"].sparse_encoding


def test_erk_shares_the_sparsity_by_layer_shape():
    from edgedx.compress.prune import erk_sparsities

    shapes = {"narrow": (3, 3, 32, 32), "wide": (3, 3, 64, 64), "shortcut": (1, 1, 8, 64), "wider": (3, 3, 64, 128)}
    targets = erk_sparsities(shapes, 0.75)
    sizes = {name: np.prod(shape) for name, shape in shapes.items()}
    zeros = sum(targets[name] * sizes[name] for name in shapes)
    assert zeros / sum(sizes.values()) == pytest.approx(0.75)
    assert targets["shortcut"] == 0.0  # the rule asks for more than dense: kept dense, the rest rescaled
    assert 0 < targets["narrow"] < targets["wide"] < targets["wider"] < 1
    with pytest.raises(ConfigError, match="unknown layer sparsity 'global'"):
        CompressConfig(prune=True, layer_sparsity="global")


def test_pruning_a_distilled_student_with_the_teacher_in_the_loop(parent, tmp_path, monkeypatch):
    """With --prune-with-teacher, pruning fine-tunes the student under the distillation loss, to full sparsity."""
    from edgedx.compress import distill as distillation

    students = []
    real = distillation.distiller

    def recording(teacher, student, **kwargs):
        students.append(student)
        return real(teacher, student, **kwargs)

    monkeypatch.setattr(distillation, "distiller", recording)
    config = CompressConfig(
        distill=True,
        distill_epochs=2,
        prune=True,
        sparsity=0.75,
        prune_epochs=3,
        prune_with_teacher=True,
        quantize="none",
        accept_loss=True,  # what is tested is the pruning step, not the guard (tested on its own)
    )
    result = compress(parent.path, tmp_path / "dp", config)
    assert len(students) == 2  # the distillation step, then the pruning step
    assert any("prune_low_magnitude" in layer.name for layer in students[1].layers)
    assert result.steps[-1]["notes"][-1] == "fine-tuned under the distillation loss"
    assert result.bundle.manifest.arch.kernel_sparsity == pytest.approx(0.75, abs=0.01)


def test_two_four_structure(parent, tmp_path):
    from edgedx._tf import keras

    result = compress(
        parent.path, tmp_path / "s24", CompressConfig(prune=True, structure="2:4", prune_epochs=2, quantize="none")
    )
    model = keras.models.load_model(result.bundle.model_path("keras"), compile=False)
    # Layer names depend on how many models the process built before, so find the kernels by type.
    kernels = [
        layer.kernel.numpy()
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.kernel.shape[-2] % 4 == 0
    ]
    assert kernels, "the parent has a conv layer with a multiple of 4 input channels"
    for kernel in kernels:  # 2:4 runs along the input channels of each output channel and tap
        blocks = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).transpose(0, 2, 1).reshape(-1, 4)
        assert np.all(np.count_nonzero(blocks, axis=1) <= 2)


def test_sparsity_survives_qat(parent, tmp_path):
    """Prune + QAT: the int8 file keeps (nearly) the pruned zeros (sparsity-preserving QAT)."""
    config = CompressConfig(
        prune=True, sparsity=0.75, prune_epochs=3, quantize="int8", qat=True, qat_epochs=1, max_auc_drop=0.5
    )
    result = compress(parent.path, tmp_path / "pq", config)
    assert any("sparsity-preserving QAT" in note for note in result.steps[-1]["notes"])
    assert _tflite_kernel_sparsity(result.bundle.model_path("tflite-int8")) >= 0.7
    # stored in the sparse encoding, smaller than the dense file, and the runtime runs it
    assert result.bundle.manifest.models["tflite-int8"].sparse_encoding is True
    assert result.steps[-1]["bytes"] < 0.22 * result.steps[0]["bytes"]  # dense int8 is >= 0.25x float32
    prediction = Model.load(result.bundle.path).predict(np.full((16, 16), 200.0))
    assert 0 <= float(prediction.probabilities) <= 1


def _shuffled_int8(monkeypatch):
    """int8 conversion that first shuffles every kernel's values: same graph and ranges, no learned features."""
    from edgedx.compress import quantize

    real_convert = quantize.convert
    rng = np.random.default_rng(0)

    def broken_int8(model, precision, calibration=None, **options):
        if precision == "int8":
            model.set_weights(
                [rng.permutation(w.ravel()).reshape(w.shape) if w.ndim > 1 else w for w in model.get_weights()]
            )
        return real_convert(model, precision, calibration, **options)

    monkeypatch.setattr(quantize, "convert", broken_int8)


def test_guard_refuses_and_writes_nothing(parent, tmp_path, monkeypatch):
    """A pipeline that lost its accuracy against the parent (here int8, even after its QAT retry) is
    refused with the figures and a table of what each step cost."""
    _shuffled_int8(monkeypatch)
    pattern = r"loses 0\.\d+ validation AUC \(1\.0000 -> 0\.\d+; limit --max-auc-drop 0\.01\) against parent"
    with pytest.raises(CompressionRefused, match=pattern) as refused:
        compress(parent.path, tmp_path / "refused", CompressConfig(quantize="int8", qat_epochs=1))
    table = str(refused.value).splitlines()
    assert table[1].split()[:3] == ["step", "val", "AUC"] and table[2].startswith("parent ")
    assert table[3].startswith("quantize-int8 ") and "--accept-loss" in table[-1]
    assert not (tmp_path / "refused").exists()


def test_accept_loss_writes_the_bundle_and_the_manifest_says_so(parent, tmp_path, monkeypatch):
    _shuffled_int8(monkeypatch)
    config = CompressConfig(quantize="int8", qat_epochs=1, accept_loss=True)
    written = compress(parent.path, tmp_path / "lossy", config).bundle
    loss = read_bundle(written.path).manifest.compression.loss_against_parent  # as stored
    assert loss.val_auc_drop > 0.01 and not loss.within_limits and loss.loss_accepted
    assert loss.parent == "parent" and loss.max_auc_drop == 0.01


def test_guard_holds_sensitivity_apart_from_auc():
    """A step that keeps the AUC but loses sensitivity is refused on sensitivity alone."""
    from types import SimpleNamespace

    from edgedx.compress._pipeline import _loss_against_parent

    def row(step, auc, sensitivity):
        figures = {"auc": auc, "sensitivity": sensitivity}
        return {"step": step, "val": figures, "test": figures, "nonzero_parameters": 10}

    run = SimpleNamespace(config=CompressConfig(quantize="int8"), parent=SimpleNamespace(name="teacher"))
    rows = [row("parent", 0.95, 0.90), row("prune", 0.945, 0.85)]
    with pytest.raises(CompressionRefused, match=r"0\.0500 validation sensitivity \(0\.9000 -> 0\.8500"):
        _loss_against_parent(run, rows)
    run.config = CompressConfig(quantize="int8", max_sensitivity_drop=0.05)
    record = _loss_against_parent(run, rows)
    assert record.within_limits and not record.loss_accepted
    assert record.val_auc_drop == pytest.approx(0.005) and record.test_sensitivity_drop == pytest.approx(0.05)


def test_int8_keeping_the_first_op_float(parent):
    """Selective quantization: the named op's output stays float32, the rest and the model's ends are int8."""
    from ai_edge_litert.interpreter import Interpreter

    from edgedx._tf import keras
    from edgedx.compress.quantize import int8_keeping_first_ops_float

    model = keras.models.load_model(parent.model_path("keras"), compile=False)
    x = to_model_inputs(recorded_dataset(parent.manifest.data).splits["train"].images(), parent.preprocess)
    one, two = int8_keeping_first_ops_float(model, x[:16], (1, 2))
    assert len(one.float_ops) == 1 and two.float_ops[0] == one.float_ops[0] and len(two.float_ops) == 2
    assert one.input.dtype == one.output.dtype == "int8"
    interpreter = Interpreter(model_content=one.content)
    dtypes = {t["name"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert dtypes[one.float_ops[0]] == "float32"
    assert dtypes[two.float_ops[1]] == "int8"  # quantized in the one-op model, float only in the two-op one

    (sparse_one,) = int8_keeping_first_ops_float(model, x[:16], (1,), sparse=True)
    outputs = []
    for content in (one.content, two.content, sparse_one.content):
        runner = Interpreter(model_content=content)
        runner.allocate_tensors()
        image = runner.get_input_details()[0]
        runner.set_tensor(image["index"], np.full(image["shape"], 7, np.int8))
        runner.invoke()
        outputs.append(runner.get_tensor(runner.get_output_details()[0]["index"]))
    assert np.array_equal(outputs[0], outputs[2])  # the sparse encoding changes storage, not results
    # more ops than the network has: no model repeats the last one
    assert [len(m.float_ops) for m in int8_keeping_first_ops_float(model, x[:16], (1, 10_000))] == [1]


def _ruinous_full_int8(monkeypatch):
    """Full int8 loses its learned features (kernels shuffled); selective int8 and other precisions are real."""
    from edgedx._tf import keras
    from edgedx.compress import quantize

    real_convert = quantize.convert

    def convert(model, precision, calibration=None, **options):
        rng = np.random.default_rng(0)
        if precision != "int8":
            return real_convert(model, precision, calibration, **options)
        damaged = keras.models.clone_model(model)
        shuffled = [rng.permutation(w.ravel()).reshape(w.shape) if w.ndim > 1 else w for w in model.get_weights()]
        damaged.set_weights(shuffled)
        return real_convert(damaged, precision, calibration, **options)

    monkeypatch.setattr(quantize, "convert", convert)


def test_int8_flipping_too_many_decisions_keeps_its_first_ops_float(parent, tmp_path, monkeypatch):
    _ruinous_full_int8(monkeypatch)
    # flips decide here, not the accuracy guard
    config = CompressConfig(quantize="int8", max_flips=0.1, max_auc_drop=0.99, max_sensitivity_drop=1.0)
    result = compress(parent.path, tmp_path / "mixed", config)
    record = result.bundle.manifest.models["tflite-int8"]
    assert len(record.float_ops) >= 1 and record.input.dtype == "int8"
    notes = result.steps[-1]["notes"]
    assert notes[0].startswith("post-training int8, full int8:") and not notes[0].endswith("(kept)")
    assert notes[-1].endswith("(kept)") and f"first {len(record.float_ops)} op(s) in float" in notes[-1]
    full_flips, kept_flips = (float(n.split(": ")[1].split("%")[0]) for n in (notes[0], notes[-1]))
    assert kept_flips < full_flips and kept_flips <= 10
    Model.load(result.bundle.path).predict_inputs(
        to_model_inputs(np.full((2, 16, 16), 200.0), result.bundle.preprocess)
    )

    integer = compress(parent.path, tmp_path / "int", replace(config, integer_only=True))
    assert integer.bundle.manifest.models["tflite-int8"].float_ops == ()
    assert len(integer.steps[-1]["notes"]) == 2 and "more than --max-flips 10.0%" in integer.steps[-1]["notes"][1]


def test_report_is_in_manifest(parent, tmp_path):
    result = compress(parent.path, tmp_path / "r", CompressConfig(quantize="dynamic"))
    steps = json.loads((result.bundle.path / MANIFEST).read_text())["compression"]["steps"]
    for key in ("parameters", "nonzero_parameters", "macs", "bytes", "gzip_bytes", "val", "test", "flips", "seconds"):
        assert key in steps[-1]
    assert steps[-1]["format"] == "tflite-dynamic"


def test_bad_config():
    with pytest.raises(ConfigError, match="--qat trains for full-integer int8"):
        CompressConfig(quantize="float16", qat=True)
    with pytest.raises(ConfigError, match="nothing to do"):
        CompressConfig(quantize="none")
    with pytest.raises(ConfigError, match="unknown pruning structure '3:4'"):
        CompressConfig(structure="3:4")
    with pytest.raises(ConfigError, match="max flips must be in"):
        CompressConfig(max_flips=1.5)
    with pytest.raises(ConfigError, match="unknown student start 'imagenet'"):
        CompressConfig(distill=True, student_init="imagenet")


def test_runtime_runs_compressed_bundle_without_tensorflow(parent, tmp_path):
    """Load and run the int8 bundle in a fresh interpreter: no TensorFlow module gets imported."""
    bundle = compress(parent.path, tmp_path / "rt", CompressConfig(quantize="int8")).bundle
    _runs_without_tensorflow(bundle.path, backend="litert")


def _runs_without_tensorflow(bundle_path, *, backend: str) -> None:
    """Load and run a bundle's deployed model in a fresh interpreter, on ``backend``, importing no TensorFlow."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from edgedx.runtime import Model; "
        f"m = Model.load({str(bundle_path)!r}); assert m.backend == {backend!r}, m.backend; "
        "p = m.predict(np.full((16, 16), 200.0)); assert 0 <= float(p.probabilities) <= 1; "
        "bad = [n for n in ('tensorflow', 'tf_keras', 'keras') if n in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def test_auto_precision_keeps_the_fastest_that_passes(parent, tmp_path):
    result = compress(
        parent.path, tmp_path / "auto", CompressConfig(quantize="auto", device="host", auto_runs=30, max_auc_drop=0.5)
    )
    record = result.bundle.manifest.compression.auto_precision
    candidates = {c["precision"]: c for c in record["candidates"]}
    # host lists both engines; the [train] extra installs tf2onnx and onnxruntime
    assert set(candidates) == {"float32", "float16", "dynamic", "int8", "onnx-float32"}
    assert record["not_measured"] == []
    winner = candidates[record["winner"]]
    assert winner["passes_guard"]
    passing = [c for c in candidates.values() if c["passes_guard"]]
    fastest = min(passing, key=lambda c: c["p50_ms"])
    assert all(len(c["round_p50_ms"]) == record["rounds"] == 3 for c in candidates.values())
    # the fastest, or a smaller file within LATENCY_TIE of it in some round (a tie on a shared machine)
    tied = [
        c
        for c in passing
        if any(a <= b * (1 + LATENCY_TIE) for a, b in zip(c["round_p50_ms"], fastest["round_p50_ms"], strict=True))
    ]
    assert winner in tied and winner["bytes"] == min(c["bytes"] for c in tied)
    assert result.bundle.manifest.deploy == role_of(record["winner"])
    assert record["winner"] in record["reason"] and "host" in record["reason"]
    # the deployed candidate keeps the pipeline within its limits, as the bundle's own record says
    assert winner["over_pipeline_limits"] == [] and result.bundle.manifest.compression.loss_against_parent.within_limits
    Model.load(result.bundle.path)  # the winner is deployable


def test_onnx_float32_bundle_runs_on_onnx_runtime_without_tensorflow(parent, tmp_path):
    """--quantize onnx-float32 deploys a tf2onnx export that ONNX Runtime runs as the Keras model does."""
    from edgedx._tf import keras

    bundle = compress(parent.path, tmp_path / "onnx", CompressConfig(quantize="onnx-float32")).bundle
    record = bundle.manifest.models["onnx-float32"]
    assert bundle.manifest.deploy == "onnx-float32" and record.file.endswith(".onnx")
    assert record.input.dtype == "float32"
    assert record.input.shape == bundle.manifest.models["tflite-float32"].input.shape
    model = Model.load(bundle.path)
    assert model.role == "onnx-float32" and model.backend == "onnxruntime"
    x = to_model_inputs(recorded_dataset(bundle.manifest.data).splits["test"].images(), bundle.preprocess)
    keras_logits = keras.models.load_model(bundle.model_path("keras"), compile=False)(x).numpy()
    np.testing.assert_allclose(model.logits(x), keras_logits, atol=1e-4)
    assert model.logits(x[:0]).shape == (0, keras_logits.shape[1])
    _runs_without_tensorflow(bundle.path, backend="onnxruntime")


def test_the_daemon_serves_an_onnx_bundle_on_onnx_runtime(parent, tmp_path):
    """edgedx serve loads an ONNX bundle on ONNX Runtime and answers as the runtime does."""
    import io

    import httpx

    from edgedx.serve import ServeConfig, Service

    bundle = compress(parent.path, tmp_path / "onnx", CompressConfig(quantize="onnx-float32")).bundle
    config = ServeConfig(bundle=bundle.path, out=tmp_path / "out", http_port=0, workers=1)
    image = np.random.default_rng(0).uniform(0, 60, (64, 64)).astype(np.float32)  # the daemon takes >= 32 a side
    with Service(config) as service:
        url = f"http://127.0.0.1:{service.http.port}"
        array = io.BytesIO()
        np.save(array, image)
        answer = httpx.post(f"{url}/v1/predict", content=array.getvalue(), timeout=30)
        assert answer.status_code == 200, answer.text
        metrics = httpx.get(f"{url}/metrics").text
    assert 'role="onnx-float32"' in metrics and 'backend="onnxruntime"' in metrics
    expected = Model.load(bundle.path).predict(image)
    assert answer.json()["probability"] == pytest.approx(float(expected.probabilities), abs=1e-6)


def test_auto_measures_only_the_engines_the_device_has_and_this_machine_can_run(monkeypatch):
    import importlib.util

    from edgedx.compress._pipeline import auto_candidates
    from edgedx.devices import DeviceProfile

    both = DeviceProfile("box", "", threads=1, engines=("tflite", "onnx"))
    assert auto_candidates(both) == (["int8", "dynamic", "float16", "float32", "onnx-float32"], [])
    formats, why = auto_candidates(replace(both, engines=("tflite",)))
    assert formats == ["int8", "dynamic", "float16", "float32"]
    assert why == ["onnx-float32 not measured: the box profile has no onnx"]
    formats, _ = auto_candidates(replace(both, engines=("onnx",)))
    assert formats == ["float32", "onnx-float32"]  # LiteRT float32 always: it always passes the guard

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    formats, why = auto_candidates(both)
    assert "onnx-float32" not in formats and why == ["onnx-float32 not measured: onnxruntime not installed here"]


def test_auto_precision_needs_a_device():
    with pytest.raises(ConfigError, match="use it with --device"):
        CompressConfig(quantize="auto")
    with pytest.raises(ConfigError, match="use it with --device"):
        CompressConfig(quantize="int8", device="host")


def test_compressed_threshold_keeps_the_reference_operating_point():
    from edgedx.compress._pipeline import _matching_threshold

    rng = np.random.default_rng(0)
    reference = rng.random(400)
    shifted = reference * 0.8 + 0.05  # a compressed model whose scores all moved down a little
    threshold = _matching_threshold(shifted, reference, 0.5)
    assert abs(threshold - 0.45) < 0.01
    assert np.array_equal(shifted >= threshold, reference >= 0.5)
    assert _matching_threshold(rng.random((10, 3)), rng.random((10, 3)), None) is None  # multi-class: argmax


def test_when_no_int8_meets_the_budgets_one_validation_case_does_not_buy_float_ops():
    from edgedx.compress._pipeline import _fewest_flips, _Int8Candidate
    from edgedx.compress.quantize import ConvertedModel

    def candidate(float_ops: int, flips: float, drop: float) -> _Int8Candidate:
        model = ConvertedModel("int8", b"", {}, {}, float_ops=tuple(f"op{i}" for i in range(float_ops)))
        return _Int8Candidate(model, {}, drop, flips)

    full, one = candidate(0, 17 / 360, 0.0096), candidate(1, 9 / 360, 0.0036)
    two, three = candidate(2, 9 / 360, 0.002), candidate(3, 8 / 360, 0.0019)
    assert _fewest_flips([full, one, two, three], 0.01, resolution=1 / 360) is one  # 9 vs 8 of 360 cases
    assert _fewest_flips([full, one, two, three], 0.01, resolution=1 / 1000) is three
    assert _fewest_flips([full, one], 0.003, resolution=1 / 360) is full  # nothing within the AUC budget


def test_target_kb_keeps_the_most_accurate_student_that_fits(parent, tmp_path):
    """--target-kb sizes (width, sparsity) pairs before training, trains them, keeps the best that fits."""
    config = CompressConfig(
        distill=True, distill_epochs=2, prune_epochs=2, target_kb=40, search_candidates=2, accept_loss=True
    )
    result = compress(parent.path, tmp_path / "kb", config)
    search = result.bundle.manifest.compression.search
    rows = search["candidates"]
    assert len(rows) == 2 and len({(r["width"], r["sparsity"]) for r in rows}) == 2
    for row in rows:  # the size measured on an untrained copy is the trained model's, within 5%
        assert row["predicted_bytes"] <= 40 * 1024 and abs(row["bytes"] - row["predicted_bytes"]) <= 0.05 * row["bytes"]
    fitting = [r for r in rows if r["within_budget"]]
    eligible = [r for r in fitting if r["within_limits"]] or fitting
    chosen = rows[search["chosen"]]
    assert chosen["val_auc"] == max(r["val_auc"] for r in eligible) and chosen["bytes"] <= 40 * 1024
    assert result.steps[-1]["step"] == "quantize-int8" and result.steps[-1]["bytes"] == chosen["bytes"]
    assert result.bundle.manifest.models["tflite-int8"].bytes == chosen["bytes"]
    frontier = read_bundle(result.bundle.path).path / search["plot"]  # read_bundle checks every file's hash
    assert frontier.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_kb_needs_a_student_and_int8():
    with pytest.raises(ConfigError, match="--target-kb searches student width and sparsity"):
        CompressConfig(target_kb=64, quantize="int8")
    with pytest.raises(ConfigError, match="--target-kb"):
        CompressConfig(target_kb=64, distill=True, quantize="float16")


def test_distillation_mixup_adds_mixed_pairs_that_teacher_and_student_both_see():
    """Function matching: each batch is doubled by convex mixes of its own images, fed to both models alike."""
    from edgedx._tf import keras, tf
    from edgedx.compress.distill import distiller

    seen: dict[str, list[np.ndarray]] = {"teacher": [], "student": []}

    class Recording(keras.Model):
        def __init__(self, who: str) -> None:
            super().__init__()
            self.who, self.dense = who, keras.layers.Dense(1)

        def call(self, x, training=False):
            seen[self.who].append(np.array(x))
            return self.dense(tf.reshape(x, [tf.shape(x)[0], -1]))

    x = np.random.default_rng(0).random((8, 4, 4, 1)).astype("float32")
    trainer = distiller(Recording("teacher"), Recording("student"), temperature=2.0, alpha=0.5, mixup=1.0)
    trainer.compile(optimizer="adam", run_eagerly=True)
    trainer.fit(x, np.array([0, 1] * 4), batch_size=8, epochs=1, verbose=0, shuffle=False)
    teacher_saw, student_saw = seen["teacher"][-1], seen["student"][-1]
    assert teacher_saw.shape[0] == 16 and np.array_equal(teacher_saw, student_saw)
    assert np.array_equal(teacher_saw[:8], x)
    flat = x.reshape(8, -1)
    for mixed in teacher_saw[8:].reshape(8, -1):  # mixed = w * x_i + (1 - w) * x_j for some i, j and w in [0, 1]
        best = np.inf
        for i in range(8):
            for j in range(8):
                direction = flat[i] - flat[j]
                w = 1.0 if i == j else float(np.clip(direction @ (mixed - flat[j]) / (direction @ direction), 0, 1))
                best = min(best, float(np.abs(w * flat[i] + (1 - w) * flat[j] - mixed).max()))
        assert best < 1e-5


def test_auto_precision_breaks_latency_ties_by_size():
    from edgedx.compress._pipeline import _fastest_then_smallest

    def candidate(precision, round_p50, size):
        return {"precision": precision, "p50_ms": float(np.median(round_p50)), "round_p50_ms": round_p50, "bytes": size}

    float32 = candidate("float32", [3.0, 3.1, 2.9], 330_000)
    dynamic = candidate("dynamic", [1.00, 1.00, 1.00], 100_000)
    int8 = candidate("int8", [1.02, 1.03, 1.01], 70_000)
    winner, tied = _fastest_then_smallest([float32, dynamic, int8])
    assert winner is int8 and tied == [dynamic, int8]  # 2% slower, 30% smaller
    # 5.3% slower over all rounds (run 3 of stop 22 chose dynamic on that), but within the tie in one round
    int8 = candidate("int8", [1.06, 1.053, 1.04], 70_000)
    winner, tied = _fastest_then_smallest([float32, dynamic, int8])
    assert winner is int8 and tied == [dynamic, int8]
    # slower by more than the tie in every round: the larger, faster file is worth it
    int8 = candidate("int8", [1.2, 1.06, 1.3], 70_000)
    winner, tied = _fastest_then_smallest([float32, dynamic, int8])
    assert winner is dynamic and tied == [dynamic]


def _auto_candidate(precision, p50, size, over=(), auc_drop=0.001, rss=80.0):
    """A --quantize auto candidate's record as _auto_choice reads it."""
    return {
        "precision": precision,
        "p50_ms": p50,
        "p95_ms": p50 * 1.1,
        "round_p50_ms": [p50] * 3,
        "peak_rss_mb": rss,
        "bytes": size,
        "val_auc_drop": auc_drop,
        "over_pipeline_limits": list(over),
    }


def test_auto_precision_deploys_only_what_keeps_the_pipeline_within_its_limits():
    from edgedx.compress._pipeline import _auto_choice
    from edgedx.devices import DeviceProfile

    config, host = CompressConfig(quantize="auto", device="host"), DeviceProfile("host", "", threads=2)
    int8 = _auto_candidate("int8", 1.0, 70_000, over=["sensitivity"])  # fastest, smallest, one positive case short
    dynamic = _auto_candidate("dynamic", 1.3, 100_000)
    float32 = _auto_candidate("float32", 3.0, 330_000, auc_drop=0.0)
    winner, reason = _auto_choice([int8, dynamic, float32], config, host)
    assert winner is dynamic and not int8["passes_guard"] and dynamic["passes_guard"]
    assert "refused for accuracy: int8 (the pipeline's sensitivity over its limit)" in reason
    # the float model itself is over the limits: quantization is held to its own AUC drop only
    float32["over_pipeline_limits"] = dynamic["over_pipeline_limits"] = ["auc"]
    winner, reason = _auto_choice([int8, dynamic, float32], config, host)
    assert winner is int8 and "refused" not in reason
    int8["val_auc_drop"] = 0.02
    winner, reason = _auto_choice([int8, dynamic, float32], config, host)
    assert winner is dynamic and "int8 (validation AUC -0.0200 against the float model)" in reason


def test_auto_precision_deploys_for_the_device_what_fits_its_budgets():
    """The fastest that passes the guard, of those within the device's latency, memory and size budgets."""
    from edgedx.compress._pipeline import _auto_choice
    from edgedx.devices import DeviceProfile

    config = CompressConfig(quantize="auto", device="host")
    box = DeviceProfile("box", "", threads=1, budgets={"peak_rss_mb": 150, "model_size_kb": 300, "min_auc": 0.9})
    onnx = _auto_candidate("onnx-float32", 0.8, 400_000, rss=201.0)  # fastest, over memory and size
    dynamic = _auto_candidate("dynamic", 1.3, 100_000)
    float32 = _auto_candidate("float32", 3.0, 250_000, auc_drop=0.0)
    winner, reason = _auto_choice([onnx, dynamic, float32], config, box)
    assert winner is dynamic and len(onnx["budgets_missed"]) == 2 and dynamic["budgets_missed"] == []
    assert "of the formats that pass the accuracy guard and meet its budgets" in reason
    assert "over the box budgets: onnx-float32 (peak_rss_mb 201MB is above the box budget of 150MB" in reason
    # nothing fits: the fastest that passes the guard, and the reason says every one is over
    tight = DeviceProfile("tight", "", threads=1, budgets={"peak_rss_mb": 10})
    winner, reason = _auto_choice([onnx, dynamic, float32], config, tight)
    assert winner is onnx and "all over the tight budgets" in reason and "meet its budgets" not in reason


def test_auto_precision_times_the_candidates_in_turns(monkeypatch, tmp_path):
    """Every round times every candidate once, each round starting one candidate later."""
    from edgedx.compress import _pipeline
    from edgedx.devices import load_profile

    calls, regimes = [], set()
    latency = {"tflite-float32": 3.0, "tflite-dynamic": 1.0, "tflite-int8": 1.1}

    def fake_probe(module, *, bundle, role, runs, workers, threads, **limits):
        calls.append(role)
        regimes.add((workers, threads))
        return {"latency_ms": [latency[role] + 0.01 * len(calls)] * runs, "peak_rss_mb": 50.0 + len(calls)}

    monkeypatch.setattr(_pipeline, "run_probe", fake_probe)
    bundles = {name: tmp_path / name for name in ("float32", "dynamic", "int8")}
    timings = _pipeline._latency_rounds(bundles, tmp_path / "x.npy", load_profile("host"), runs=5, rounds=3)
    order = ["float32", "dynamic", "int8", "dynamic", "int8", "float32", "int8", "float32", "dynamic"]
    assert calls == [f"tflite-{name}" for name in order]
    assert regimes == {(2, 1)}  # host's workers x threads, as `edgedx serve` runs them
    assert timings["int8"]["round_p50_ms"] == [1.13, 1.15, 1.17]
    assert timings["int8"]["p50_ms"] == 1.15 and timings["int8"]["peak_rss_mb"] == 57.0


def test_search_spreads_its_candidates_from_widest_to_narrowest():
    from edgedx.compress.search import SizedCandidate, spread

    sized = [SizedCandidate(w, s, 1000, 900) for w, s in ((0.75, 0.9), (0.5, 0.8), (0.35, 0.6), (0.25, 0.0))]
    picked = [c.width for c in spread(sized, 3)]
    assert len(set(picked)) == 3 and picked[0] == 0.75 and picked[-1] == 0.25  # both ends, one between
    assert spread(sized, 10) == sized and spread(sized, 1) == [sized[0]]
    with pytest.raises(ConfigError, match="at least one candidate"):
        spread(sized, 0)


def test_a_student_to_be_pruned_is_sized_by_the_parameters_it_deploys():
    """With --prune the student may be wider: 1/8 of the teacher's parameters is what stays non-zero."""
    import functools

    from edgedx.compress import distill
    from edgedx.compress._pipeline import _nonzero_after_pruning
    from edgedx.models import count_parameters, create_model

    teacher = create_model("resnet-small", (16, 16, 3), 2)
    budget = count_parameters(teacher)[0] / 8
    deployed = functools.partial(_nonzero_after_pruning, config=CompressConfig(distill=True, prune=True))
    _, dense_width = distill.choose_student(teacher, "resnet-small", 2)
    pruned, pruned_width = distill.choose_student(teacher, "resnet-small", 2, deployed_parameters=deployed)
    assert pruned_width > dense_width
    assert count_parameters(pruned)[0] > budget >= deployed(pruned) > count_parameters(pruned)[0] * 0.45
    wider = distill.WIDTHS[distill.WIDTHS.index(pruned_width) - 1]
    assert deployed(create_model("resnet-small", (16, 16, 3), 2, width=wider)) > budget


@pytest.mark.parametrize("arch", ["seed-cnn", "resnet-small", "mobilenetv2"])
@pytest.mark.parametrize(("classes", "multilabel"), [(2, False), (4, False), (3, True)])
def test_every_architecture_exports_to_onnx_that_runs_as_keras_does(arch, classes, multilabel, tmp_path):
    from edgedx.compress.quantize import convert
    from edgedx.models import create_model
    from edgedx.runtime import open_runner

    model = create_model(arch, (32, 32, 3), classes, multilabel=multilabel)
    exported = convert(model, "onnx-float32")
    path = tmp_path / "model.onnx"
    path.write_bytes(exported.content)
    runner = open_runner(path, "onnx-float32", input_record=exported.input, output_record=exported.output)
    x = np.random.default_rng(0).random((5, 32, 32, 3), np.float32)
    expected = model(x, training=False).numpy()
    assert expected.shape == (5, 1 if classes == 2 and not multilabel else classes)
    np.testing.assert_allclose(runner.logits(x), expected, atol=1e-5)
