"""Results back to the PACS: every SR goes from a durable outbox to a C-STORE SCP, with retries.

An SR is put in ``OUT/.outbox`` (a hard link to the published file, so nothing is copied) before
its instance counts as done, and removed from there only once the PACS has answered success. A
PACS outage, a full PACS or a restart of the daemon delays results and loses none: the outbox is
sent again, oldest first, with a back-off between failed attempts.

The SR's SOP Instance UID is derived from the source instance and the model, so an SR the PACS
did receive just before a crash (acknowledged, not yet removed from the outbox) is sent again with
the same UID, which a PACS files as the same object.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from ..errors import ConfigError
from .storage import link_into

log = logging.getLogger("edgedx.serve")

#: Seconds between attempts while the PACS does not answer or refuses (doubling, up to the last).
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
#: SRs sent in one association.
BATCH = 50


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match[3]) < 65536:
            raise ConfigError(f"--forward-to {text!r}: expected AE@host:port, e.g. PACS@10.0.0.5:104")
        return cls(match[1], match[2].strip("[]"), int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Outbox:
    """SRs waiting to be forwarded: ``ROOT/<instance key>.sr.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def add(self, report: Path) -> None:
        """Queue a published SR (a hard link: the outbox is under OUT, like the results)."""
        link_into(report, self.root / report.name)

    def waiting(self) -> list[Path]:
        return sorted(self.root.glob("*.sr.dcm"), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.sr.dcm"))


class Forwarder:
    """A thread that empties the outbox into the destination."""

    def __init__(self, outbox: Outbox, destination: Destination, *, ae_title: str, metrics) -> None:
        self.outbox, self.destination, self.metrics = outbox, destination, metrics
        self.ae = AE(ae_title=ae_title)
        self.ae.add_requested_context(ComprehensiveSRStorage)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.last_error: str | None = None
        self._failures = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgedx-forward", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    def notify(self) -> None:
        """A new SR is in the outbox."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            waiting = self.outbox.waiting()
            if not waiting:
                self._wake.wait(5.0)
                self._wake.clear()
                continue
            if self._send(waiting[:BATCH]):
                self._failures, self.last_error = 0, None
                continue
            delay = BACKOFF_SECONDS[min(self._failures, len(BACKOFF_SECONDS) - 1)]
            self._failures += 1
            log.warning(
                "forwarding to %s failed (%s); %d SRs wait in the outbox, next attempt in %.0f s",
                self.destination,
                self.last_error,
                len(waiting),
                delay,
            )
            self._stop.wait(delay)

    def _send(self, reports: list[Path]) -> bool:
        """Send a batch in one association; True if every SR was acknowledged."""
        destination = self.destination
        try:
            assoc = self.ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        except (OSError, RuntimeError, ValueError) as exc:
            self.last_error = f"cannot connect: {exc}"
            self.metrics.forward_failures.inc()
            return False
        if not assoc.is_established:
            self.last_error = "association rejected or no answer"
            self.metrics.forward_failures.inc()
            return False
        try:
            for report in reports:
                if self._stop.is_set():
                    return True
                try:
                    dataset = pydicom.dcmread(report)
                except FileNotFoundError:
                    continue
                answer = assoc.send_c_store(dataset)
                status = int(getattr(answer, "Status", -1)) if answer else -1
                if status == 0x0000 or 0xB000 <= status <= 0xBFFF:  # success, or stored with a warning
                    report.unlink(missing_ok=True)
                    self.metrics.forwarded.inc()
                else:
                    self.last_error = f"C-STORE answered {status:#06x}" if status >= 0 else "no C-STORE answer"
                    self.metrics.forward_failures.inc()
                    return False
        finally:
            if assoc.is_established:
                assoc.release()
        return True
