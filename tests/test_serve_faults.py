"""Disk faults: ENOSPC and EIO at every write operation of the daemon, once and persistently; the watermark.

The fault injector stands in for the ``os`` module that ``edgedx.serve.storage`` writes through
(open, write, fsync, link, replace): operation N of an input's path fails, then (once) the next
attempt works, or (persistent) every write fails until "space returns".
"""

from __future__ import annotations

import errno
import json
import os
import time
import types
from pathlib import Path

import httpx
import pydicom
import pytest
from serve_kit import instances
from test_serve import send, wait_for

import edgedx.serve.daemon as daemon_module
import edgedx.serve.storage as storage
from edgedx.serve import ServeConfig, Service
from edgedx.serve.storage import uid_key

WRITE_OPERATIONS = ("open", "write", "fsync", "link", "replace")


class FaultyDisk:
    """``os`` with the write operations counted; operation ``fail_at`` (and, if persistent, every later one) fails."""

    def __init__(self) -> None:
        self.count = 0
        self.fail_at: int | None = None
        self.persistent = False
        self.error = errno.ENOSPC
        self.failed = 0

    def arm(self, fail_at: int | None, *, persistent: bool = False, error: int = errno.ENOSPC) -> None:
        self.count, self.fail_at, self.persistent, self.error, self.failed = 0, fail_at, persistent, error, 0

    def heal(self) -> None:
        self.fail_at = None

    def module(self) -> types.SimpleNamespace:
        def wrap(name):
            real = getattr(os, name)

            def operation(*args, **kwargs):
                if name == "open" and not (len(args) > 1 and args[1] & os.O_WRONLY):
                    return real(*args, **kwargs)  # reads and directory handles for fsync are not writes
                self.count += 1
                if self.fail_at is not None and (
                    self.count == self.fail_at or (self.persistent and self.count > self.fail_at)
                ):
                    self.failed += 1
                    raise OSError(self.error, os.strerror(self.error))
                return real(*args, **kwargs)

            return operation

        names = {name: wrap(name) for name in WRITE_OPERATIONS}
        return types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")} | names)


@pytest.fixture
def disk(monkeypatch) -> FaultyDisk:
    faulty = FaultyDisk()
    monkeypatch.setattr(storage, "os", faulty.module())
    return faulty


@pytest.fixture
def service(tmp_path, disk, monkeypatch):
    monkeypatch.setattr(daemon_module, "PROBE_SECONDS", 0.05)
    config = ServeConfig(out=tmp_path / "out", dicom_port=0, http_port=0, min_free_mb=0)
    with Service(config) as running:
        yield running


def results(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("series/*/instances/*.json")}


def leftovers(out) -> list[str]:
    return [str(p) for p in out.rglob(".*.tmp")]


def count_operations(service, disk, ds) -> int:
    disk.arm(None)
    assert send(service.scp.port, [ds]) == [0x0000]
    wait_for(lambda: uid_key(ds.SOPInstanceUID) in results(service.config.out), what="the counting run's result")
    wait_for(lambda: not list((service.config.out / ".spool" / "pending").iterdir()), what="the spool to empty")
    return disk.count


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_failed_write_at_every_operation_loses_nothing_and_acknowledges_nothing_false(
    service, disk, tiny_headct, persistent, error
):
    out = service.config.out
    made = instances(tiny_headct, 40, per_series=40, tag=f"faults-{persistent}-{error}")
    operations = count_operations(service, disk, made[0])
    assert operations >= 10  # spool, SR, JSON, index, series summary: each a write, a sync and a link or rename
    acknowledged, refused = set(), set()
    for n, ds in enumerate(made[1 : operations + 1], start=1):
        disk.arm(n, persistent=persistent, error=error)
        status = send(service.scp.port, [ds])[0]
        key = uid_key(ds.SOPInstanceUID)
        (acknowledged if status == 0x0000 else refused).add(key)
        assert status in (0x0000, 0xA700)
        if persistent:
            time.sleep(0.3)  # the disk stays full a while: nothing new is accepted
            assert send(service.scp.port, instances(tiny_headct, 1, tag=f"while-full-{n}")) == [0xA700]
            ready = httpx.get(f"http://127.0.0.1:{service.http.port}/readyz")
            assert ready.status_code == 503 and "failing" in " ".join(ready.json()["reasons"])
            disk.heal()  # space returns
        if key in acknowledged:
            wait_for(lambda k=key: k in results(out), timeout=60, what=f"the result of operation {n}'s input")
        wait_for(lambda: not list((out / ".spool" / "pending").iterdir()), timeout=60, what="the spool to empty")
        assert disk.failed >= 1, f"operation {n} was never reached"
        wait_for(lambda: service.daemon.storage_problem() is None, what="storage healthy again")
    print(
        f"\n{errno.errorcode[error]} {'persistent' if persistent else 'once'}: {operations} write operations per "
        f"input, a fault at each: {len(acknowledged)} acknowledged, {len(refused)} refused, "
        f"{len(results(out)) - 1} results"
    )
    assert set(results(out)) == acknowledged | {uid_key(made[0].SOPInstanceUID)}  # 0 false acknowledgements
    assert refused  # a failure while spooling is answered out of resources, and the input is not kept
    assert not leftovers(out)  # 0 partial outputs
    for key, record in results(out).items():  # every output whole
        folder = out / "series" / record["series"] / "instances"
        assert pydicom.dcmread(folder / f"{key}.sr.dcm").SOPClassUID
    series = json.loads(next(out.glob("series/*/series.json")).read_text())
    assert series["instances"] == len(results(out))
    ready = wait_for(lambda: httpx.get(f"http://127.0.0.1:{service.http.port}/readyz").status_code == 200, what="ready")
    assert ready


def test_watermark_refuses_new_inputs_and_readyz_says_why(tmp_path, tiny_headct, monkeypatch):
    free = {"mb": 50.0}
    monkeypatch.setattr(daemon_module, "free_megabytes", lambda folder: free["mb"])
    config = ServeConfig(out=tmp_path / "out", inbox=tmp_path / "inbox", dicom_port=0, http_port=0, min_free_mb=100)
    config = ServeConfig(**{**config.__dict__, "stable_seconds": 0.1, "poll_seconds": 0.05})
    with Service(config) as service:
        url = f"http://127.0.0.1:{service.http.port}"
        first, second, third = instances(tiny_headct, 3, tag="watermark")
        assert send(service.scp.port, [first]) == [0xA700]
        body = pydicom.filebase.DicomBytesIO()
        pydicom.dcmwrite(body, second, enforce_file_format=True)
        answer = httpx.post(f"{url}/v1/predict", content=body.getvalue())
        assert answer.status_code == 507 and "insufficient storage" in answer.json()["error"]
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "under --min-free-mb 100" in ready.json()["reasons"][0]
        third.save_as(config.inbox / "third.dcm", enforce_file_format=True)
        time.sleep(0.5)
        assert (config.inbox / "third.dcm").exists()  # waits in the inbox
        free["mb"] = 5000.0  # space freed
        wait_for(lambda: not (config.inbox / "third.dcm").exists(), what="the inbox file to be taken")
        assert send(service.scp.port, [first]) == [0x0000]
        assert httpx.get(f"{url}/readyz").status_code == 200
        wait_for(lambda: len(results(config.out)) == 2, what="both results")
        metrics = httpx.get(f"{url}/metrics").text
        assert 'outcome="no-storage",source="cstore"' in metrics and 'outcome="no-storage",source="http"' in metrics


def test_a_spool_on_another_file_system_is_copied_into_the_quarantine(tmp_path):
    """Hard links cannot cross file systems: a --spool elsewhere is copied, as durably."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to spool on")
    source = other / f"edgedx-test-{os.getpid()}.dcm"
    source.write_bytes(b"not dicom")
    try:
        outputs = storage.Outputs(tmp_path / "out")
        assert outputs.quarantine_input(source, "k1", {"reason": "k1: not a DICOM file"})
        assert (outputs.quarantine / "k1.dcm").read_bytes() == b"not dicom"
        assert not leftovers(tmp_path / "out")
    finally:
        source.unlink()


def test_a_resend_that_fails_to_sync_never_removes_the_copy_already_accepted(tmp_path, monkeypatch):
    """The same instance spooled again while its first copy waits: if the second copy cannot be made
    durable, the sender hears so, and the first, acknowledged copy stays for its queued job."""
    spool = storage.Spool(tmp_path / "spool")
    first = spool.accept("k1", "cstore", b"first copy")

    def failing_sync(folder):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(storage, "fsync_dir", failing_sync)
    with pytest.raises(OSError):
        spool.accept("k1", "cstore", b"second copy")
    assert first.exists()  # before: unlinked, and the acknowledged input lost
    with pytest.raises(OSError):
        spool.accept("k2", "cstore", b"never acknowledged")
    assert not (spool.pending / "k2~cstore.dcm").exists()  # a new input that was refused is not kept
    assert not leftovers(tmp_path)
