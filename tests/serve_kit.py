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


def make_pki(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost, a client certificate it signed, and a
    client certificate from an unrelated CA; PEM files in ``folder``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    files: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        files[f"{name}-key"] = folder / f"{name}.key"
        files[f"{name}-key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, issuer_key, issuer_name, *, ca: bool = False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = issue("edgedx test CA", None, None, ca=True)
    write("ca", ca_key, ca_cert)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", *issue("edgedx node", ca_key, ca_cert.subject, san=names))
    write("client", *issue("scanner", ca_key, ca_cert.subject))
    other_key, other_cert = issue("another CA", None, None, ca=True)
    write("stranger", *issue("stranger", other_key, other_cert.subject))
    return files


def dcmtk(tool: str) -> str | None:
    """The path of a DCMTK tool (``storescu``, ``storescp``, ...), or None; pip packages install
    look-alike console scripts under the same names, so DCMTK's own is checked by its banner."""
    import shutil

    for candidate in (f"/usr/bin/{tool}", shutil.which(tool)):
        if candidate and Path(candidate).is_file():
            banner = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "dcmtk" in banner.lower():
                return candidate
    return None
