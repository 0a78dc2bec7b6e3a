"""Multi-worker training: TF_CONFIG parsing, and a tiny two-worker job on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import needs_tf

from edgedx.bundle import MANIFEST, read_bundle
from edgedx.distributed import cluster_from_env, local_addresses
from edgedx.errors import ConfigError


def _tf_config(workers: list[str], index: int, kind: str = "worker", chief: list[str] | None = None) -> dict:
    cluster = {"worker": workers, **({"chief": chief} if chief else {})}
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})}


def test_cluster_from_tf_config():
    assert cluster_from_env({}) is None
    assert cluster_from_env(_tf_config(["a:1"], 0)) is None  # one worker: plain training
    first, second = (cluster_from_env(_tf_config(["a:1", "b:2"], i)) for i in (0, 1))
    assert first.workers == second.workers == 2 and first.chief and not second.chief
    with_chief = cluster_from_env(_tf_config(["a:1"], 0, chief=["c:3"]))
    assert with_chief.workers == 2 and not with_chief.chief  # worker 0 is not the chief when a chief task exists
    assert cluster_from_env(_tf_config(["a:1"], 0, kind="chief", chief=["c:3"])).chief
    with pytest.raises(ConfigError, match="TF_CONFIG is not a cluster description"):
        cluster_from_env({"TF_CONFIG": "{not json"})
    with pytest.raises(ConfigError, match="not 'ps'"):
        cluster_from_env(_tf_config(["a:1", "b:2"], 0, kind="ps"))


#: The chief as ``edgedx``, but 15 s slower to write its bundle, as the guard and calibration of a
#: big data set make it: a worker that does not wait for the chief has long exited by then (and a
#: chief whose worker has gone is failed by TensorFlow's coordination service).
SLOW_CHIEF = """
import time
import edgedx.train
write = edgedx.train.write_bundle
edgedx.train.write_bundle = lambda *args, **kwargs: (time.sleep(15), write(*args, **kwargs))[1]
from edgedx.cli import main
main()
"""


CLI = "from edgedx.cli import main; main()"

FAILING_CHIEF = """
import edgedx.compress._pipeline as pipeline
def fail(run, current):
    raise RuntimeError("conversion failed on the chief")
pipeline._quantize = fail
from edgedx.cli import main
main()
"""


def _start_workers(arguments: list[str], tmp_path, chief: str = CLI) -> tuple[list, list]:
    """Two local workers running ``edgedx ARGUMENTS`` (the chief as ``chief`` code), logs in files."""
    workers = local_addresses(2)
    logs = [(tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err") for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", chief if i == 0 else CLI, *arguments],
            env={**os.environ, **_tf_config(workers, i)},
            stdout=out.open("w"),  # files, not pipes: a full pipe would stall a worker
            stderr=err.open("w"),
        )
        for i, (out, err) in enumerate(logs)
    ]
    return processes, logs


def _outputs(logs) -> list[tuple[str, str]]:
    return [(out.read_text(), err.read_text()) for out, err in logs]


@pytest.mark.tf
@needs_tf
def test_two_local_workers_train_one_model_and_only_the_chief_writes_it(tiny_npz, tmp_path):
    # resnet-small: batch normalisation, whose statistics are read by an all-reduce under the strategy
    arguments = ["train", "--data", str(tiny_npz), "--arch", "resnet-small", "--width", "0.25", "--epochs", "2"]
    arguments += ["--batch-size", "16", "--out", str(tmp_path / "bundle")]  # one path, as on a shared volume
    processes, logs = _start_workers(arguments, tmp_path, chief=SLOW_CHIEF)
    processes[1].wait(timeout=600)
    # the worker waited for the chief: a worker that exits first fails the chief's job
    assert (tmp_path / "bundle" / MANIFEST).is_file()
    processes[0].wait(timeout=600)
    outputs = _outputs(logs)
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out + err[-3000:]
    assert "the chief writes the bundle" in outputs[1][0]
    training = read_bundle(tmp_path / "bundle").manifest.training
    assert training.workers == 2 and training.epochs_run == 2


@pytest.fixture(scope="module")
def teacher(tiny_npz, tmp_path_factory):
    from edgedx.data import load_dataset
    from edgedx.train import TrainConfig, train

    out = tmp_path_factory.mktemp("distributed") / "teacher"
    train(load_dataset(tiny_npz), out, TrainConfig(arch="resnet-small", width=0.25, epochs=2, batch_size=16))
    return out


def _compress_arguments(teacher, out, quantize: str) -> list[str]:
    arguments = ["compress", str(teacher), "--distill", "--width", "0.125", "--distill-epochs", "2", "--prune"]
    return [*arguments, "--quantize", quantize, "--accept-loss", "--out", str(out)]


@pytest.mark.tf
@needs_tf
def test_two_local_workers_distill_and_prune_one_student_and_only_the_chief_writes_it(teacher, tmp_path):
    processes, logs = _start_workers(_compress_arguments(teacher, tmp_path / "small", "none"), tmp_path)
    for process in processes:
        process.wait(timeout=900)
    outputs = _outputs(logs)
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out + err[-3000:]
    assert "the chief converts them and writes the bundle" in " ".join(outputs[1][0].split())
    compression = read_bundle(tmp_path / "small").manifest.compression
    assert compression.workers == 2
    assert [row["step"] for row in compression.steps] == ["parent", "distill", "prune"]


@pytest.mark.tf
@needs_tf
def test_a_worker_is_released_when_the_chief_fails_after_training(teacher, tmp_path):
    """The chief converts alone after the shared training; if that fails, the worker waiting for
    it still exits (before, it waited at the barrier for ever)."""
    arguments = _compress_arguments(teacher, tmp_path / "small", "int8")
    processes, logs = _start_workers(arguments, tmp_path, chief=FAILING_CHIEF)
    try:
        for process in processes:
            process.wait(timeout=900)
    finally:
        for process in processes:
            process.kill()
    (_, chief_err), (worker_out, worker_err) = _outputs(logs)
    assert processes[0].returncode != 0 and "conversion failed on the chief" in chief_err
    assert processes[1].returncode == 0, worker_out + worker_err[-3000:]
    assert not (tmp_path / "small").exists()


def test_target_kb_is_refused_on_a_cluster(tmp_path, monkeypatch):
    from edgedx.compress import CompressConfig, compress

    monkeypatch.setenv("TF_CONFIG", _tf_config(local_addresses(2), 0)["TF_CONFIG"])
    with pytest.raises(ConfigError, match="--target-kb searches on one machine"):
        compress(tmp_path / "parent", tmp_path / "out", CompressConfig(distill=True, quantize="int8", target_kb=64))
