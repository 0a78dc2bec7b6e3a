"""The daemon: C-STORE, inbox, HTTP, quarantine, back-pressure, crash safety, no PHI in its output.

Everything here runs on the base install (no TensorFlow) with the shipped default bundle.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from serve_kit import PHI_STRINGS, DaemonProcess, free_port, instances

from edgedx.errors import ConfigError
from edgedx.serve import ServeConfig, Service
from edgedx.serve.storage import Outputs, uid_key


@pytest.fixture
def service(tmp_path):
    config = ServeConfig(
        out=tmp_path / "out", inbox=tmp_path / "inbox", dicom_port=0, http_port=0, allow_ae=("SCANNER",)
    )
    config = ServeConfig(**{**config.__dict__, "stable_seconds": 0.3, "poll_seconds": 0.05})
    with Service(config) as running:
        yield running


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("series/*/instances/*.json")}


def quarantined(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "quarantine").glob("*.json")}


def send(port: int, datasets, *, calling: str = "SCANNER"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGEDX")
    if not assoc.is_established:
        return None
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses


def test_cstore_loopback_gives_instance_and_series_results(service, tiny_headct):
    study = instances(tiny_headct, 6, per_series=3, tag="loopback")
    assert send(service.scp.port, study) == [0x0000] * 6
    out = service.config.out
    found = wait_for(lambda: len(results(out)) == 6 and results(out), what="six results")
    assert set(found) == {uid_key(ds.SOPInstanceUID) for ds in study}
    for key, record in found.items():
        assert record["sop_instance_uid"] in {ds.SOPInstanceUID for ds in study}
        assert 0 <= record["probability"] <= 1 and record["decision"] in (0, 1)
        assert record["model"]["name"] == "headct-ich-int8" and len(record["model"]["sha256"]) == 64
        report = pydicom.dcmread(out / "series" / record["series"] / "instances" / f"{key}.sr.dcm")
        referenced = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == record["sop_instance_uid"]

    def both_series():  # a series result is rewritten just after each of its instances is published
        found = [json.loads(p.read_text()) for p in out.glob("series/*/series.json")]
        return found if len(found) == 2 and all(s["instances"] == 3 for s in found) else None

    series = wait_for(both_series, what="two series of three")
    for summary in series:  # any-positive rule: the series takes its most suspicious slice
        assert summary["probability"] == max(summary["probabilities"].values())
        assert summary["decision"] == int(summary["probability"] >= summary["threshold"])


def test_cecho_and_ae_allow_list(service):
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", service.scp.port, ae_title="EDGEDX")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(Verification)
    assoc = intruder.associate("127.0.0.1", service.scp.port, ae_title="EDGEDX")
    assert assoc.is_rejected


def test_inbox_waits_for_complete_files(service, tiny_headct):
    ds = instances(tiny_headct, 1, tag="inbox")[0]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    inbox, out = service.config.inbox, service.config.out
    partial = inbox / "upload.dcm.part"  # renamed in when complete: never touched before
    partial.write_bytes(data)
    growing = inbox / "growing.dcm"  # a slow writer: 8 pieces 0.15 s apart (stable_seconds is 0.3)
    pieces = np.array_split(np.frombuffer(data, np.uint8), 8)
    for piece in pieces:
        with open(growing, "ab") as f:
            f.write(piece.tobytes())
        time.sleep(0.15)
        assert growing.exists() and not results(out) and not quarantined(out)
    time.sleep(0.5)
    assert partial.exists()
    wait_for(lambda: not growing.exists(), what="the grown file to be taken")
    partial.rename(inbox / "upload.dcm")
    wait_for(lambda: not (inbox / "upload.dcm").exists(), what="the renamed file to be taken")
    found = wait_for(lambda: results(out), what="a result")
    time.sleep(0.5)
    assert list(found) == [uid_key(ds.SOPInstanceUID)] and not quarantined(out)  # the same instance twice: one result


def _malformed(tiny_headct: Path, folder: Path) -> dict[str, bytes]:
    """Files the daemon must quarantine, by what is wrong with them."""
    good = instances(tiny_headct, 9, tag="bad")

    def encoded(ds) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    whole = encoded(good[0])
    no_pixels = good[1]
    del no_pixels.PixelData
    huge = good[2]
    huge.Rows, huge.Columns = 60000, 60000
    rgb = good[4]
    rgb.PhotometricInterpretation = "PALETTE COLOR"
    tiny = good[5]
    tiny.Rows = tiny.Columns = 8
    tiny.PixelData = np.zeros((8, 8), np.int16).tobytes()
    j2k = good[6]
    j2k.file_meta.TransferSyntaxUID = JPEG2000Lossless
    size = struct.pack(">IIII", j2k.Columns, j2k.Rows, 0, 0)  # a SIZ marker stating the header's size
    j2k.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51\x00\x29\x00\x00" + size + b"\x00" * 48])
    good[7].TextValue = "a note"  # (0040,A160) UT: a 4-byte length, declared below as nearly 2 GB
    absurd_length = bytearray(encoded(good[7]))
    marker = absurd_length.find(b"\x40\x00\x60\xa1UT")
    absurd_length[marker + 8 : marker + 12] = (0x7FFFFFF0).to_bytes(4, "little")  # swallows the pixel data
    return {
        "truncated": whole[: len(whole) // 3],
        "not-dicom": b"%PDF-1.4 this is not an image\n" * 50,
        "empty": b"",
        "no-pixel-data": encoded(no_pixels),
        "absurd-dimensions": encoded(huge),
        "palette-colour": encoded(rgb),
        "too-small": encoded(tiny),
        "undecodable-jpeg2000": encoded(j2k),
        "absurd-declared-length": bytes(absurd_length),
    }


def test_malformed_corpus_is_quarantined_and_the_daemon_lives(service, tiny_headct, tmp_path):
    corpus = _malformed(tiny_headct, tmp_path)
    inbox, out = service.config.inbox, service.config.out
    for name, data in corpus.items():
        (inbox / f"{name}.dcm").write_bytes(data)
    found = wait_for(lambda: len(quarantined(out)) == len(corpus) and quarantined(out), what="every file quarantined")
    reasons = sorted(r["reason"] for r in found.values())
    assert all(r and r.split(": ", 1)[0] for r in reasons)
    for expected in (
        "not a DICOM file",
        "no pixel data",
        "image is 60000 x 60000",
        "PhotometricInterpretation is 'PALETTE COLOR'",
        "expected at least 32",
        "cannot decode",
    ):
        assert any(expected in r for r in reasons), (expected, reasons)
    assert any("truncated" in r for r in reasons)
    assert all((out / "quarantine" / f"{key}.dcm").exists() for key in found)
    assert not results(out)
    # still alive and working
    good = instances(tiny_headct, 1, tag="after-bad")
    assert send(service.scp.port, good) == [0x0000]
    wait_for(lambda: len(results(out)) == 1, what="a result after the corpus")
    assert httpx.get(f"http://127.0.0.1:{service.http.port}/healthz").status_code == 200


def test_quarantine_puts_the_input_before_its_reason_and_finishes_after_a_crash(tmp_path):
    """A restart after a crash between the two steps completes the quarantine; the input is never dropped."""
    outputs = Outputs(tmp_path / "out")
    pending = tmp_path / "pending.dcm"
    pending.write_bytes(b"not dicom")
    record = {"instance": "k1", "reason": "k1: not a DICOM file"}
    # the crash came after the input was linked in and before the reason was published
    (outputs.quarantine / "k1.dcm").hardlink_to(pending)
    assert outputs.quarantine_input(pending, "k1", record)
    assert (outputs.quarantine / "k1.dcm").read_bytes() == b"not dicom"
    assert json.loads((outputs.quarantine / "k1.json").read_text())["reason"] == record["reason"]
    pending.unlink()  # what the daemon does next: the quarantined copy stays
    assert (outputs.quarantine / "k1.dcm").read_bytes() == b"not dicom"
    again = tmp_path / "again.dcm"
    again.write_bytes(b"not dicom")
    assert not outputs.quarantine_input(again, "k1", record)  # a resend: already quarantined


def test_http_predict_dicom_and_npy(service, tiny_headct):
    url = f"http://127.0.0.1:{service.http.port}"
    ds = instances(tiny_headct, 1, tag="http")[0]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    answer = httpx.post(f"{url}/v1/predict", content=buffer.getvalue(), timeout=30)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["instance"] == uid_key(ds.SOPInstanceUID) and 0 <= record["probability"] <= 1
    array = io.BytesIO()
    np.save(array, ds.pixel_array.astype(np.float32) - 1024)
    from_array = httpx.post(f"{url}/v1/predict", content=array.getvalue(), timeout=30).json()
    assert from_array["probability"] == pytest.approx(record["probability"], abs=1e-6)  # same image, same answer
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((3, 3, 3, 3), np.float32))
    refused = httpx.post(f"{url}/v1/predict", content=wrong.getvalue(), timeout=30)
    assert refused.status_code == 422 and "shape" in refused.json()["error"]
    assert httpx.get(f"{url}/readyz").json()["ready"] is True
    metrics = httpx.get(f"{url}/metrics").text
    assert 'edgedx_inputs_total{outcome="refused",source="http"} 1.0' in metrics
    assert "edgedx_inference_seconds_bucket" in metrics and "edgedx_queue_depth" in metrics


def test_full_queue_answers_busy(tmp_path, tiny_headct):
    config = ServeConfig(out=tmp_path / "out", dicom_port=0, http_port=0, queue_size=2)
    with Service(config) as service:
        for _ in range(2):  # fill every slot, as two inputs still being worked on would
            service.daemon.reserve("http")
        answer = httpx.post(f"http://127.0.0.1:{service.http.port}/v1/predict", content=b"x")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert httpx.get(f"http://127.0.0.1:{service.http.port}/readyz").status_code == 503
        ds = instances(tiny_headct, 1, tag="busy")
        assert send(service.scp.port, ds, calling="ANY") == [0xA700]  # out of resources
        assert not list((config.out / ".spool" / "pending").iterdir())  # refused means not accepted
        service.daemon.capacity.release()
        service.daemon.capacity.release()


def test_token_is_required_off_loopback_and_checked(tmp_path):
    with pytest.raises(ConfigError, match="bearer token"):
        ServeConfig(out=tmp_path, http_port=0, host="0.0.0.0")
    with pytest.raises(ConfigError, match="--allow-ae"):
        ServeConfig(out=tmp_path, dicom_port=0, host="0.0.0.0")
    with Service(ServeConfig(out=tmp_path / "out", http_port=0, token="s3cret")) as service:
        url = f"http://127.0.0.1:{service.http.port}"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # liveness stays open for the supervisor


def test_restart_finishes_spooled_inputs_once(tmp_path, tiny_headct):
    """An input spooled before a crash gets its result on restart; one already answered is not redone."""
    out = tmp_path / "out"
    first, second = instances(tiny_headct, 2, tag="restart")
    pending = out / ".spool" / "pending"
    pending.mkdir(parents=True)
    for ds in (first, second):
        ds.save_as(pending / f"{uid_key(ds.SOPInstanceUID)}~cstore.dcm", enforce_file_format=True)
    with Service(ServeConfig(out=out, http_port=0)) as service:
        assert service.recovered == 2
        wait_for(lambda: len(results(out)) == 2, what="both recovered results")
        done = results(out)
    # the crash came after the result was published but before the spool was cleared
    second.save_as(pending / f"{uid_key(second.SOPInstanceUID)}~cstore.dcm", enforce_file_format=True)
    with Service(ServeConfig(out=out, http_port=0)) as service:
        wait_for(lambda: not list(pending.glob("*.dcm")), what="the spool to empty")
        assert 'outcome="duplicate"' in service.daemon.metrics.render().decode()
    assert results(out) == done  # not rewritten


def _daemon_args(tmp_path: Path, dicom_port: int, http_port: int) -> list[str]:
    return [
        "--out", str(tmp_path / "out"), "--inbox", str(tmp_path / "inbox"), "--dicom-port", str(dicom_port),
        "--http-port", str(http_port), "--stable-seconds", "0.3", "--allow-ae", "SCANNER",
    ]  # fmt: skip


def _store_until_acknowledged(port: int, datasets, stop_at: float) -> None:
    """A scanner's behaviour: resend each instance until the daemon acknowledges it."""
    pending = list(datasets)
    while pending and time.monotonic() < stop_at:
        try:
            statuses = send(port, pending[:10])
        except Exception:
            statuses = None
        if statuses is None:
            time.sleep(0.2)
            continue
        acknowledged = [ds for ds, status in zip(pending, statuses, strict=False) if status == 0x0000]
        pending = [ds for ds in pending if ds not in acknowledged]
    assert not pending, f"{len(pending)} instances never acknowledged"


def test_kill_9_loses_nothing_and_duplicates_nothing(tmp_path, tiny_headct):
    """kill -9 the daemon over and over while 500 instances flow in through the inbox and C-STORE."""
    import random
    import threading

    rng = random.Random(0)
    by_inbox, by_cstore = instances(tiny_headct, 250, tag="crash-inbox"), instances(tiny_headct, 250, tag="crash-cs")
    dicom_port, http_port = free_port(), free_port()
    daemon = DaemonProcess(_daemon_args(tmp_path, dicom_port, http_port), tmp_path / "daemon.log")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    daemon.launch()

    def export_to_inbox():
        for i, ds in enumerate(by_inbox):
            ds.save_as(inbox / f"{i:04d}.dcm.part", enforce_file_format=True)
            (inbox / f"{i:04d}.dcm.part").rename(inbox / f"{i:04d}.dcm")
            time.sleep(0.005)

    feeders = [
        threading.Thread(target=export_to_inbox),
        threading.Thread(target=_store_until_acknowledged, args=(dicom_port, by_cstore, time.monotonic() + 300)),
    ]
    for feeder in feeders:
        feeder.start()
    kills = 0
    while any(f.is_alive() for f in feeders) or kills < 6:
        time.sleep(rng.uniform(0.5, 2.0))
        daemon.kill()
        kills += 1
        daemon.launch()
    for feeder in feeders:
        feeder.join()
    expected = {uid_key(ds.SOPInstanceUID) for ds in by_inbox + by_cstore}
    wait_for(lambda: not list(inbox.glob("*.dcm")) and len(results(out)) >= len(expected), timeout=180,
             what="every instance to have a result")  # fmt: skip
    assert daemon.terminate() == 0
    found = results(out)
    assert set(found) == expected  # nothing lost, nothing extra
    assert {r["instance"] for r in found.values()} == expected and not quarantined(out)
    series_total = sum(json.loads(p.read_text())["instances"] for p in out.glob("series/*/series.json"))
    assert series_total == len(expected)
    assert not list((out / ".spool" / "pending").iterdir())
    assert not [p for p in out.rglob(".*.tmp")]
    log = (tmp_path / "daemon.log").read_text()
    assert kills >= 6 and log.count("ready:") == kills + 1
    recovered = sum(int(n) for n in re.findall(r"edgedx\.serve recovered (\d+) accepted inputs", log))
    print(  # the figures benchmarks/README.md quotes (pytest -s)
        f"\ncrash test: {len(expected)} instances, {kills} kill -9, {recovered} spooled inputs resumed on restarts, "
        f"{log.count('duplicate instance=')} duplicate deliveries absorbed, {len(found)} results, 0 lost"
    )


def test_sigterm_drains_and_no_phi_reaches_logs_metrics_or_results(tmp_path, tiny_headct):
    """Known names planted in every input (good and malformed) appear in no log line, metric or JSON."""
    dicom_port, http_port = free_port(), free_port()
    daemon = DaemonProcess(_daemon_args(tmp_path, dicom_port, http_port), tmp_path / "daemon.log")
    (tmp_path / "inbox").mkdir()
    daemon.launch()
    good = instances(tiny_headct, 8, tag="phi")
    assert send(dicom_port, good[:4]) == [0x0000] * 4
    for i, ds in enumerate(good[4:]):
        ds.save_as(tmp_path / "inbox" / f"{i}.dcm", enforce_file_format=True)
    for name, data in _malformed(tiny_headct, tmp_path).items():
        (tmp_path / "inbox" / f"{name}.dcm").write_bytes(data)
    url = f"http://127.0.0.1:{http_port}"
    buffer = io.BytesIO()
    good[0].save_as(buffer, enforce_file_format=True)
    assert httpx.post(f"{url}/v1/predict", content=buffer.getvalue(), timeout=30).status_code == 200
    bad = io.BytesIO()
    broken = instances(tiny_headct, 1, tag="phi-bad")[0]
    del broken.PixelData
    broken.save_as(bad, enforce_file_format=True)
    assert httpx.post(f"{url}/v1/predict", content=bad.getvalue(), timeout=30).status_code == 422
    out = tmp_path / "out"
    wait_for(lambda: len(results(out)) == 8 and len(quarantined(out)) == 9, timeout=60, what="all outputs")
    metrics = httpx.get(f"{url}/metrics").text
    assert daemon.terminate() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "stopped: queue drained" in log
    texts = {"log": log, "metrics": metrics}
    texts |= {str(p): p.read_text() for p in out.rglob("*.json")}
    leaks = [(where, s) for where, text in texts.items() for s in PHI_STRINGS if s.lower() in text.lower()]
    assert not leaks
    # The names really went through the daemon: the SRs, made for the PACS, carry the patient module.
    report = pydicom.dcmread(next(out.rglob("*.sr.dcm")))
    assert "Quixotewhistle" in str(report.PatientName) and report.PatientID == "PID-7731-ZEBRA"


def test_oversized_inputs_are_quarantined_unread(tmp_path, tiny_headct):
    config = ServeConfig(out=tmp_path / "out", inbox=tmp_path / "inbox", http_port=0, max_file_mb=0.1)
    config = ServeConfig(**{**config.__dict__, "stable_seconds": 0.2, "poll_seconds": 0.05})
    with Service(config) as service:
        instances(tiny_headct, 1, tag="big")[0].save_as(config.inbox / "big.dcm", enforce_file_format=True)
        found = wait_for(lambda: quarantined(config.out), what="the oversized file quarantined")
        assert "over the 0.1 MB limit" in next(iter(found.values()))["reason"]
        answer = httpx.post(f"http://127.0.0.1:{service.http.port}/v1/predict", content=b"\0" * 200_000)
        assert answer.status_code == 413


def test_a_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for option in ("http_port", "dicom_port"):
            with pytest.raises(ConfigError, match=f"cannot listen for .* on 127.0.0.1:{port}"):
                Service(ServeConfig(out=tmp_path, **{option: port})).start()  # the same --out: the first let go


def test_series_summary_binary_takes_the_top_slice_and_multiclass_counts_labels():
    from edgedx.serve.daemon import series_summary

    binary = [
        {"instance": "a", "probability": 0.2, "probabilities": {"no": 0.8, "yes": 0.2}, "label": "no"},
        {"instance": "b", "probability": 0.7, "probabilities": {"no": 0.3, "yes": 0.7}, "label": "yes"},
    ]
    summary = series_summary(binary, class_names=["no", "yes"], threshold=0.5)
    assert (summary["decision"], summary["label"], summary["top_instance"]) == (1, "yes", "b")
    assert summary["maximum_probabilities"] == {"no": 0.8, "yes": 0.7}
    assert series_summary(binary, class_names=["no", "yes"], threshold=0.75)["label"] == "no"
    three = ["liver", "kidney", "spleen"]
    multiclass = [
        {"instance": "a", "probabilities": {"liver": 0.6, "kidney": 0.3, "spleen": 0.1}, "label": "liver"},
        {"instance": "b", "probabilities": {"liver": 0.1, "kidney": 0.8, "spleen": 0.1}, "label": "kidney"},
        {"instance": "c", "probabilities": {"liver": 0.2, "kidney": 0.7, "spleen": 0.1}, "label": "kidney"},
    ]
    summary = series_summary(multiclass, class_names=three, threshold=None)
    assert summary["label"] == "kidney" and summary["labels"] == {"liver": 1, "kidney": 2, "spleen": 0}
    assert summary["maximum_probabilities"]["liver"] == 0.6 and "probability" not in summary


def test_series_summary_leaves_out_of_distribution_slices_out_and_counts_them():
    from edgedx.serve.daemon import series_summary

    classified = {"instance": "a", "probability": 0.2, "probabilities": {"no": 0.8, "yes": 0.2}, "label": "no"}
    flagged = {"instance": "b", "probability": 0.99, "probabilities": {"no": 0.01, "yes": 0.99}, "label": None}
    flagged |= {"in_distribution": False, "decision": None}
    summary = series_summary([classified, flagged], class_names=["no", "yes"], threshold=0.5)
    assert (summary["label"], summary["out_of_distribution"], summary["top_instance"]) == ("no", 1, "a")
    alone = series_summary([flagged], class_names=["no", "yes"], threshold=0.5)
    assert alone["status"] == "out_of_distribution" and alone["decision"] is None and alone["out_of_distribution"] == 1


def test_out_of_scope_inputs_get_an_out_of_distribution_result_sr_and_count(service, tiny_headct):
    """An MR slice and a localizer reach a head-CT node: results with no decision, an SR saying why, a count."""
    import highdicom as hd

    mr, scout = instances(tiny_headct, 2, tag="out-of-scope")
    mr.Modality = "MR"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert send(service.scp.port, [mr, scout]) == [0x0000] * 2
    out = service.config.out
    found = wait_for(lambda: len(results(out)) == 2 and results(out), what="two results")
    for record in found.values():
        assert record["status"] == "out_of_distribution" and record["in_distribution"] is False
        assert record["decision"] is None and record["label"] is None and record["ood_reasons"]
    reasons = sorted(r["ood_reasons"][0] for r in found.values())
    assert reasons[0].startswith("a localizer") and reasons[1].startswith("modality MR")

    def series_results():
        found = [json.loads(p.read_text()) for p in out.glob("series/*/series.json")]
        return found if sum(s["out_of_distribution"] for s in found) == 2 else None

    series = wait_for(series_results, what="both counted in their series")
    assert all(s["status"] == "out_of_distribution" and s["decision"] is None for s in series)
    sr = hd.sr.srread(next(out.glob("series/*/instances/*.sr.dcm")))
    assert "indeterminate" in str(sr)
    metrics = httpx.get(f"http://127.0.0.1:{service.http.port}/metrics").text
    assert re.search(r'edgedx_inputs_total\{outcome="out_of_distribution",source="cstore"\} 2\.0', metrics), metrics


def test_series_summary_multilabel_takes_each_labels_maximum():
    from edgedx.serve.daemon import series_summary

    names = ["any", "subdural", "epidural"]
    slices = [
        {"instance": "a", "probabilities": {"any": 0.7, "subdural": 0.6, "epidural": 0.1}, "label": "any, subdural"},
        {"instance": "b", "probabilities": {"any": 0.2, "subdural": 0.1, "epidural": 0.3}, "label": "none"},
    ]
    summary = series_summary(slices, class_names=names, threshold=[0.5, 0.5, 0.5])
    assert summary["findings"] == ["any", "subdural"] and summary["decision"] == 1
    assert summary["maximum_probabilities"] == {"any": 0.7, "subdural": 0.6, "epidural": 0.3}
    assert series_summary(slices, class_names=names, threshold=[0.8, 0.5, 0.2])["findings"] == ["subdural", "epidural"]


def test_a_device_profile_sets_workers_threads_and_cpus(tmp_path):
    config = ServeConfig.on_device("edge-1core", out=tmp_path / "out", http_port=0)
    assert (config.workers, config.threads, config.cpu_affinity) == (1, 1, (0,))
    assert ServeConfig.on_device("console-2core", out=tmp_path / "out", http_port=0, workers=3).workers == 3
    with pytest.raises(ConfigError, match="no device profile 'toaster'"):
        ServeConfig.on_device("toaster", out=tmp_path / "out", http_port=0)


def _cpus_allowed(pid: int) -> set[str]:
    """The allowed-CPU lists of every thread of process ``pid``."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text().splitlines()
        lists |= {line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list")}
    return lists


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread affinity from Linux's /proc")
def test_serve_on_a_device_runs_every_thread_on_its_cpus(tmp_path):
    """`edgedx serve --device edge-1core`: one worker, and every thread of the daemon (listeners,
    workers, the interpreter's) on CPU 0, as bench measured the model there."""
    http_port = free_port()
    args = ["--out", str(tmp_path / "out"), "--http-port", str(http_port), "--device", "edge-1core"]
    daemon = DaemonProcess(args, tmp_path / "daemon.log")
    daemon.launch()
    try:
        assert _cpus_allowed(daemon.process.pid) == {"0"}
        assert "1 x 1 thread(s), CPUs [0] (edge-1core)" in (tmp_path / "daemon.log").read_text()
    finally:
        assert daemon.terminate() == 0


def test_pinning_to_cpus_this_machine_lacks_is_a_clear_error(tmp_path):
    """Refused before anything is pinned: the calling process keeps every CPU it had."""
    before = os.sched_getaffinity(0)
    with pytest.raises(ConfigError, match=r"CPUs \[9999\] do not exist here or are not ours"):
        Service(ServeConfig(out=tmp_path / "out", http_port=0, cpu_affinity=(min(before), 9999)))
    assert os.sched_getaffinity(0) == before


def test_http_connections_send_answers_at_once(tmp_path):
    """Nagle's algorithm is off on the daemon's HTTP connections. With it on, an answer written as
    headers then body waited for the client's delayed ACK: every request took ~44 ms where its work
    took 3 (benchmarks/README.md, stop 26)."""
    import socket

    with Service(ServeConfig(out=tmp_path / "out", http_port=0)) as service, httpx.Client() as client:
        assert client.get(f"http://127.0.0.1:{service.http.port}/healthz").status_code == 200
        (connection,) = service.http.server.server_state.connections  # kept alive by the client
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
