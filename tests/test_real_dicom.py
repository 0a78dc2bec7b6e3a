"""Real scanner DICOM (../shared/data/dicom-real): decoding, vendor quirks, and a result for every CT image.

Skips cleanly where the shared data is absent.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from edgedx.data import read_dataset, read_image
from edgedx.errors import DicomError
from edgedx.runtime import Model
from edgedx.serve import ServeConfig, Service
from edgedx.serve.storage import uid_key

REAL = SHARED_DATA / "dicom-real"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "headct-ich-int8"
TOSHIBA = {
    "uncompressed": "toshiba-head-ct2-uncompressed.dcm",
    "jpeg-lossless": "toshiba-head-ct2-jpll.dcm",
    "jpeg-ls-lossless": "toshiba-head-ct2-jlsl.dcm",
    "rle": "toshiba-head-ct2-rle.dcm",
    "jpeg2000-lossless": "toshiba-head-ct2-j2kr.dcm",
    "jpeg2000-lossy": "toshiba-head-ct2-j2ki.dcm",
}
LOSSLESS = ("uncompressed", "jpeg-lossless", "jpeg-ls-lossless", "rle", "jpeg2000-lossless")

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (real data lives in ../shared/data)")


def real_files() -> list[Path]:
    return sorted(REAL.rglob("*.dcm")) if REAL.is_dir() else []


def is_ct_image(path: Path) -> bool:
    """What the head-CT model must answer: a single-frame greyscale CT image (not a localizer)."""
    ds = read_dataset(path, stop_before_pixels=True)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return ds.get("Modality") == "CT" and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and "LOCALIZER" not in image_type


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(SHIPPED, threads=1)


def test_six_transfer_syntaxes_decode_alike(model):
    images = {name: read_image(REAL / "head-ct" / file) for name, file in TOSHIBA.items()}
    reference = images["uncompressed"]
    assert reference.shape == (512, 512)
    for name in LOSSLESS:  # lossless means the same pixels, bit for bit
        np.testing.assert_array_equal(images[name], reference, err_msg=name)
    lossy = images["jpeg2000-lossy"]
    assert np.abs(lossy - reference).mean() < 20  # HU: the lossy copy is close, not equal
    predictions = {name: model.predict(REAL / "head-ct" / file) for name, file in TOSHIBA.items()}
    assert len({p.decision for p in predictions.values()}) == 1
    base = float(predictions["uncompressed"].probabilities)
    for name in LOSSLESS:
        assert abs(float(predictions[name].probabilities) - base) <= 0.01, name


def test_every_real_file_decodes_or_gives_a_one_line_reason(model):
    files = real_files()
    assert len(files) >= 30
    answered, refused = {}, {}
    for path in files:
        try:
            prediction = model.predict(path)
        except DicomError as exc:
            refused[path.name] = str(exc)
            continue
        answered[path.name] = prediction
        if prediction.probabilities is not None:  # decoded and run
            assert prediction.timings_ms["decode"] > 0
            assert prediction.label in model.class_names or not prediction.in_distribution
    for name, reason in refused.items():
        assert reason.startswith(f"{name}: ") and "\n" not in reason
    cts = {p.name for p in files if is_ct_image(p)}
    assert cts <= {n for n, p in answered.items() if p.probabilities is not None}, sorted(cts - set(answered))
    assert "ct-implicit-little-headless-retired.dcm" in answered  # no preamble, still read
    for scout in ("ct-jpeg70.dcm", "philips-phantom-000.dcm"):  # header checks: no pixel is decoded
        assert not answered[scout].in_distribution and answered[scout].probabilities is None
        assert any("localizer" in r for r in answered[scout].ood_reasons)
    for other in ("wg04-mr1-jlsl.dcm", "wg04-nm1-jlsl.dcm", "us-explicit-big-rgb.dcm"):
        assert any(r.startswith("modality") for r in answered[other].ood_reasons), other
    assert set(refused) == {"philips-phantom-432.dcm"}  # CT, but an RGB dose summary: not a greyscale slice
    scout = read_dataset(REAL / "other" / "ct-jpeg70.dcm")  # JPEG Lossless process 14 decodes all the same
    assert scout.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1 and scout.pixel_array.shape == (400, 512)


def test_the_shipped_model_makes_no_confident_false_alarm_on_real_scans(model):
    """Every real CT here is normal or not a head: flagged out of distribution, or called negative.

    A synthetic-only model has not seen a real scanner, so the guard flagging real head CT is the
    honest answer; what must never happen again is "hemorrhage, p = 1.000" on a chest CT.
    """
    assert model.guard is not None, "the shipped bundle carries no out-of-distribution guard"
    outcomes = {}
    for path in real_files():
        if not is_ct_image(path):
            continue
        p = model.predict(path)
        outcomes[path.name] = p
        assert not p.in_distribution or p.decision == 0, (path.name, float(p.probabilities), p.ood_score)
    for not_a_head in ("wg04-ct1-jlsl.dcm", "ct-implicit-little-headless-retired.dcm"):  # chest, lumbar spine
        assert not outcomes[not_a_head].in_distribution, not_a_head
    phantom = [p for name, p in outcomes.items() if name.startswith("philips-phantom")]
    assert len(phantom) == 15 and not any(p.decision for p in phantom)


def anonymised(path: Path) -> pydicom.Dataset:
    """A real slice as the DICOM confidentiality profile leaves it: Type 2 patient attributes removed."""
    ds = pydicom.dcmread(path)
    for keyword in ("PatientBirthDate", "PatientSex", "PatientName", "ReferringPhysicianName", "StudyID"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_every_real_file_through_inbox_cstore_and_http(tmp_path):
    """Each real file via all three inputs: a result (JSON, and an SR) for each CT image, a reason for the rest."""
    config = ServeConfig(
        out=tmp_path / "out", inbox=tmp_path / "inbox", dicom_port=0, http_port=0, allow_ae=("SCANNER",)
    )
    config = ServeConfig(**{**config.__dict__, "stable_seconds": 0.2, "poll_seconds": 0.05})
    files = real_files()
    cts = {p for p in files if is_ct_image(p)}
    refused = set()  # what the one prediction path refuses as DICOM: quarantined by the daemon
    model = Model.load(SHIPPED, threads=1)
    for path in files:
        try:
            model.predict(path)
        except DicomError:
            refused.add(path)
    anonymous = anonymised(REAL / "head-ct" / TOSHIBA["uncompressed"])
    anonymous.SOPInstanceUID = anonymous.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    with Service(config) as service:
        url = f"http://127.0.0.1:{service.http.port}"
        for path in files:  # HTTP answers in the response
            answer = httpx.post(f"{url}/v1/predict", content=path.read_bytes(), timeout=60)
            if path in refused:
                assert answer.status_code == 422 and answer.json()["error"], path.name
            else:
                assert answer.status_code == 200, (path.name, answer.text)
                body = answer.json()
                assert body["label"] in ("no-any", "any") or body["status"] == "out_of_distribution"
        # C-STORE: the compressed syntaxes are offered as they are stored, and accepted
        ae = AE(ae_title="SCANNER")
        syntaxes = sorted({str(read_dataset(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in cts})
        for syntax in syntaxes:  # one context each: the SCP accepts every one
            ae.add_requested_context(CTImageStorage, syntax)
        assoc = ae.associate("127.0.0.1", service.scp.port, ae_title="EDGEDX")
        assert assoc.is_established
        stored = [p for p in sorted(cts) if "SOPClassUID" in read_dataset(p, stop_before_pixels=True)]
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in stored]
        statuses.append(assoc.send_c_store(anonymous).Status)
        assoc.release()
        assert statuses == [0x0000] * len(statuses)
        for path in files:  # the inbox takes every file, whatever it is
            (config.inbox / path.name).write_bytes(path.read_bytes())
        out = config.out
        expected = len(stored) + 1 + len(files)

        def settled():
            done = list(out.glob("series/*/instances/*.json")) + list((out / "quarantine").glob("*.json"))
            return len(done) >= expected - duplicates

        # The same SOP Instance through C-STORE and the inbox is one instance: one result.
        keys = [uid_key(str(read_dataset(p, stop_before_pixels=True).get("SOPInstanceUID", ""))) for p in files]
        stored_keys = [uid_key(str(read_dataset(p, stop_before_pixels=True).SOPInstanceUID)) for p in stored]
        duplicates = len(set(stored_keys) & set(keys)) + (len(keys) - len(set(keys)))
        import time

        deadline = time.monotonic() + 120
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert settled()
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("series/*/instances/*.json")}
    reasons = {p.stem: json.loads(p.read_text())["reason"] for p in (out / "quarantine").glob("*.json")}
    for path in cts:
        key = uid_key(str(read_dataset(path, stop_before_pixels=True).get("SOPInstanceUID", "")))
        if "SOPInstanceUID" in read_dataset(path, stop_before_pixels=True):
            assert key in results, path.name
    assert all("\n" not in r for r in reasons.values())
    without_sr = {k: r["structured_report"] for k, r in results.items() if not r["structured_report"]["made"]}
    print(
        f"\nreal files: {len(results)} results, {len(reasons)} quarantined, {len(without_sr)} without SR {without_sr}"
    )
    assert all(r["reason"] for r in without_sr.values())
    assert len(without_sr) <= 1  # only a source with no SOP Instance UID (the headless retired file) has no SR
    assert len(reasons) == len(refused)  # the rest are results: classified, or out of distribution
    anonymous_key = uid_key(anonymous.SOPInstanceUID)
    record = results[anonymous_key]
    assert record["structured_report"] == {"made": True}
    report = pydicom.dcmread(out / "series" / record["series"] / "instances" / f"{anonymous_key}.sr.dcm")
    assert report.PatientBirthDate == "" and report.PatientSex == ""
    assert "Traceback" not in "".join(reasons.values())


def test_codestream_sizes_of_real_compressed_files_match_their_headers():
    """The size check that refuses decompression bombs reads every real JPEG, JPEG-LS and JPEG 2000 frame right."""
    from pydicom.encaps import generate_fragmented_frames

    from edgedx.data.dicom import codestream_size

    checked = 0
    for path in real_files():
        ds = read_dataset(path)
        syntax = ds.file_meta.TransferSyntaxUID
        if not syntax.is_encapsulated or syntax == pydicom.uid.RLELossless:
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        first = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=frames)))
        assert codestream_size(first) == (ds.Rows, ds.Columns), path.name
        checked += 1
    assert checked >= 10
