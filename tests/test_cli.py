"""The CLI: help texts, exit codes, one-line errors, and the commands end to end on tiny data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import needs_tf
from typer.testing import CliRunner

from edgedx.bundle import read_bundle
from edgedx.cli import app

runner = CliRunner()


def test_help_lists_commands_in_lines_that_end_whole_at_80_columns():
    for group, commands in (
        ([], ("data", "train", "models", "info", "compress", "bench", "serve")),
        (["data"], ("synth", "info")),
    ):
        result = runner.invoke(app, [*group, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0
        listing = result.output.split("Commands:")[1]
        assert "..." not in listing, group  # click cuts a description that does not fit
        assert sorted(line.split()[0] for line in listing.strip().splitlines()) == sorted(commands)


def test_train_help_explains_defaults():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # help wraps at the terminal's width
    assert "embedded synthetic head-CT" in text and "[default: brain,subdural,bone]" in text


def _commands(group, path=()):
    """Every leaf command of a click group, with the words that call it."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_help_keeps_every_option_name_whole_at_80_columns():
    import typer.main

    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) >= 8
    for words, command in commands:
        result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, words
        opts = [opt for param in command.params for opt in (*param.opts, *param.secondary_opts)]
        names = [opt for opt in opts if opt.startswith("--")]
        missing = [name for name in names if name not in result.output]
        assert not missing, f"edgedx {' '.join(words)} --help at 80 columns lacks {missing}"


def test_synth_and_data_info(tmp_path):
    out = tmp_path / "s"
    result = runner.invoke(app, ["data", "synth", str(out), "--studies", "3", "--slices", "1", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 slices" in result.output and (out / "labels.csv").is_file()
    info = runner.invoke(app, ["data", "info", str(out), "--json"])
    assert info.exit_code == 0
    summary = json.loads(info.output)
    assert summary["classes"] == ["no-any", "any"] and summary["input"] == "hu"


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "x"), "--studies", "1"])
    assert result.exit_code == 1
    assert "ConfigError: need at least 3 studies" in result.output
    assert "Traceback" not in result.output


def test_bad_choice_rejected_by_parser(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "x"), "--difficulty", "extreme"])
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_info_refuses_tampered_bundle(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "BundleError" in result.output


def test_serve_needs_something_to_listen_to(tmp_path):
    result = runner.invoke(app, ["serve", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "nothing to listen to" in result.output
    result = runner.invoke(app, ["serve", "--out", str(tmp_path), "--http-port", "8080", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "bearer token" in result.output


def test_bench_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["bench"])
    assert result.exit_code == 1 and "give at least one bundle" in result.output
    result = runner.invoke(app, ["bench", str(tmp_path), "--device", "toaster"])
    assert result.exit_code == 1 and "no device profile 'toaster'" in result.output
    result = runner.invoke(app, ["bench", str(tmp_path)])
    assert result.exit_code == 1 and "BundleError" in result.output and "not a model bundle" in result.output


@pytest.mark.tf
@needs_tf
def test_models_table():
    result = runner.invoke(app, ["models", "--input-size", "32", "--json"])
    assert result.exit_code == 0
    rows = {r["arch"]: r for r in json.loads(result.output)}
    assert set(rows) == {"seed-cnn", "resnet-small", "mobilenetv2"} and all(r["macs"] > 0 for r in rows.values())


@pytest.mark.tf
@needs_tf
def test_train_then_info(tiny_npz, tmp_path):
    out = tmp_path / "b"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_npz),
            "--out",
            str(out),
            "--arch",
            "seed-cnn",
            "--width",
            "0.25",
            "--epochs",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["metrics"]) == {"val", "test"} and 0 <= report["metrics"]["test"]["auc"] <= 1
    info = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "240"})
    assert info.exit_code == 0 and "all files match" in info.output and "seed-cnn" in info.output
    again = runner.invoke(app, ["train", "--data", str(tiny_npz), "--out", str(out), "--epochs", "1"])
    assert again.exit_code == 1 and "already exists" in again.output


def test_missing_train_extra_is_explained(tmp_path):
    """On a base install (no TensorFlow, no scikit-learn) `edgedx train` says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules.update(tensorflow=None, tf_keras=None, sklearn=None); "
        "from edgedx.cli import app; app(['train', '--out', 'x'])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    assert "DependencyError: this command needs the [train] extra" in run.stderr
    assert "pip install 'edgedx[train]'" in run.stderr and "Traceback" not in run.stderr


def test_tables_keep_every_figure_whole_in_a_narrow_log():
    """Off a terminal (a log file, CI) at 50 columns, `edgedx info` prints each metric whole, not "0.9…"."""
    import subprocess
    import sys

    bundle = Path(__file__).parents[1] / "models" / "headct-ich-int8"
    env = {**os.environ, "COLUMNS": "50"}
    run = subprocess.run([sys.executable, "-m", "edgedx", "info", str(bundle)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    test = read_bundle(bundle).manifest.metrics["test"]
    low, high = test["auc_ci95"]
    row = next(line for line in run.stdout.splitlines() if line.startswith("│ test"))
    assert f"{test['auc']:.4f}" in row and f"{low:.3f}-{high:.3f}" in row and f"{test['npv']:.4f}" in row
    assert "…" not in run.stdout


@pytest.mark.tf
@needs_tf
def test_tensorflow_c_logs_are_silent_unless_asked_for(tmp_path):
    """TensorFlow's C++ libraries log at load, while training (oneDNN, CUDA stubs, cuInit on a CPU-only
    box), converting to int8 and creating an interpreter; none of it shows unless EDGEDX_TF_LOGS=1."""
    import subprocess
    import sys

    code = (
        "from edgedx._tf import keras, tf; import numpy as np; "
        "m = keras.Sequential([keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)), keras.layers.Conv2D(2, 3)]); "
        "m.compile('adam', 'mse'); "
        "ds = tf.data.Dataset.from_tensor_slices((np.ones((4, 8, 8, 1)), np.ones((4, 4, 4, 2)))).map("
        "lambda a, b: (a, b), num_parallel_calls=tf.data.AUTOTUNE).batch(2); m.fit(ds, verbose=0); "
        "from edgedx.compress.quantize import convert, int8_keeping_first_ops_float; "
        "x = np.random.rand(4, 8, 8, 1).astype('float32'); convert(m, 'int8', x); "
        "list(int8_keeping_first_ops_float(m, x, (1,))); print('trained')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "EDGEDX_TF_LOGS")}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "trained", quiet.stderr
    assert quiet.stderr == ""
    loud = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "EDGEDX_TF_LOGS": "1"}, cwd=tmp_path
    )
    assert loud.returncode == 0 and "I0000" in loud.stderr  # the same run, with TensorFlow's own lines


def test_hiding_native_logs_keeps_everything_else(capfd, monkeypatch):
    from edgedx._quiet import VERBOSE_ENV, native_logs_hidden

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with native_logs_hidden():
        os.write(2, b"I0000 00:00:1795893475.104834   14688 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: INT8\n")
        os.write(2, b"edgedx: a line of our own\n")
    assert capfd.readouterr().err == "edgedx: a line of our own\n"
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with native_logs_hidden():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    assert "XNNPACK" in capfd.readouterr().err
