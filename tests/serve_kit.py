"""Helpers for the daemon's tests: DICOM instances with planted identities, a daemon in a subprocess."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

#: Identities planted in every test instance; none may appear in a log line, metric or JSON result.
PHI = {
    "PatientName": "Quixotewhistle^Marigold",
    "PatientID": "PID-7731-ZEBRA",
    "PatientBirthDate": "19410817",
    "AccessionNumber": "ACC99887766",
    "InstitutionName": "Saint Barnabywell Infirmary",
    "ReferringPhysicianName": "Thistlewaite^Orlando",
}
PHI_STRINGS = ["Quixotewhistle", "Marigold", "PID-7731-ZEBRA", "19410817", "ACC99887766", "Barnabywell", "Thistlewaite"]


def instances(source: Path, count: int, *, per_series: int = 25, tag: str = "t") -> list[pydicom.Dataset]:
    """``count`` CT instances cloned from the slices under ``source``, new UIDs, planted identities."""
    slices = [pydicom.dcmread(p) for p in sorted(source.rglob("*.dcm"))]
    made = []
    for i in range(count):
        ds = copy.deepcopy(slices[i % len(slices)])
        series = i // per_series
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[tag, "study", str(series // 2)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[tag, "series", str(series)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i % per_series + 1
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        made.append(ds)
    return made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """``edgedx serve`` in a subprocess, its output collected across restarts."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "COLUMNS": "200"}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgedx", "serve", *self.args], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def wait_ready(self, marker: str = "ready:", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and self.log.read_text(errors="replace").count(marker) >= self.starts:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    @property
    def starts(self) -> int:
        return self._starts

    _starts = 0

    def launch(self) -> None:
        self._starts += 1
        self.start()
        self.wait_ready()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)
