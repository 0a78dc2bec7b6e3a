"""Results back to the PACS: every SR reaches a real C-STORE receiver, through its outage and a kill -9."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage
from serve_kit import DaemonProcess, free_port, instances
from test_serve import send, wait_for

from edgedx.errors import ConfigError
from edgedx.serve import Destination, ServeConfig


class Receiver:
    """A PACS stand-in: a pynetdicom Storage SCP counting the SOP Instance UIDs it stores."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = None

    def _store(self, event) -> int:
        with self.lock:
            self.received[str(event.dataset.SOPInstanceUID)] += 1
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def stop(self) -> None:
        self.server.shutdown()


def test_destination_is_parsed_and_checked(tmp_path):
    assert Destination.parse("PACS@10.1.2.3:104") == Destination("PACS", "10.1.2.3", 104)
    assert Destination.parse("ORTHANC@[::1]:4242").host == "::1"
    for wrong in ("PACS", "PACS@host", "PACS@host:99999", "A_TITLE_OVER_16_CHARS@h:104"):
        with pytest.raises(ConfigError, match="expected AE@host:port"):
            Destination.parse(wrong)
    with pytest.raises(ConfigError, match="--no-sr"):
        ServeConfig(out=tmp_path, http_port=0, forward_to=Destination.parse("P@h:1"), structured_reports=False)


def test_every_sr_arrives_once_through_a_pacs_outage_and_a_kill_9(tmp_path, tiny_headct):
    pacs_port, dicom_port, http_port = free_port(), free_port(), free_port()
    pacs = Receiver(pacs_port)
    pacs.start()
    args = [
        "--out", str(tmp_path / "out"), "--dicom-port", str(dicom_port), "--http-port", str(http_port),
        "--allow-ae", "SCANNER", "--forward-to", f"PACS@127.0.0.1:{pacs_port}", "--min-free-mb", "0",
    ]  # fmt: skip
    daemon = DaemonProcess(args, tmp_path / "daemon.log")
    daemon.launch()
    made = instances(tiny_headct, 30, per_series=10, tag="forward")
    assert send(dicom_port, made[:10]) == [0x0000] * 10
    wait_for(lambda: len(pacs.received) == 10, what="the first ten SRs at the PACS")

    pacs.stop()  # the PACS goes down
    assert send(dicom_port, made[10:20]) == [0x0000] * 10
    url = f"http://127.0.0.1:{http_port}"
    ready = wait_for(lambda: (r := httpx.get(f"{url}/readyz").json())["forward_backlog"] == 10 and r, what="backlog")
    assert ready["ready"] and ready["forward_error"]  # still taking images; says what is wrong
    assert "edgedx_forward_backlog 10.0" in httpx.get(f"{url}/metrics").text
    daemon.kill()  # and the daemon dies meanwhile
    daemon.launch()
    assert send(dicom_port, made[20:]) == [0x0000] * 10
    time.sleep(1.0)
    assert len(pacs.received) == 10  # nothing got through while it was down

    pacs = Receiver(pacs_port)
    pacs.start()  # the PACS is back
    try:
        wait_for(lambda: len(pacs.received) == 20, timeout=90, what="the twenty delayed SRs")
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["forward_backlog"] == 0, what="an empty outbox")
    finally:
        pacs.stop()
    assert daemon.terminate() == 0
    assert max(pacs.received.values()) == 1  # none twice
    log = (tmp_path / "daemon.log").read_text()
    assert "forwarding to PACS@127.0.0.1" in log and "Traceback" not in log
