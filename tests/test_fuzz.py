"""Hostile DICOM: every header value validated, every failure one EdgedxError naming the file.

The named cases come from a fuzzing run of the earlier code (each leaked a plain Python
exception); the harness in ``fuzz_kit`` runs mutants of real and synthetic slices in child
processes, counting other exceptions, crashes and hangs.
"""

from __future__ import annotations

import io
import logging
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED_DATA
from fuzz_kit import mutant, run, seeds_from
from pydicom.dataelem import DataElement
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from edgedx.data import read_dataset
from edgedx.data.dicom import MAX_INFLATED_BYTES
from edgedx.errors import DicomError
from edgedx.runtime import Model
from edgedx.serve import ServeConfig, Service

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "headct-ich-int8"
REAL = SHARED_DATA / "dicom-real"


def seed_paths(tiny_headct: Path) -> list[Path]:
    """Real scanner files where present, and synthetic slices always."""
    real = sorted(REAL.rglob("*.dcm")) if REAL.is_dir() else []
    return real + sorted(tiny_headct.rglob("*.dcm"))[:4]


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(SHIPPED, threads=1)


@pytest.fixture
def slice_bytes(tiny_headct) -> bytes:
    real = REAL / "head-ct" / "toshiba-head-ct2-uncompressed.dcm"
    return real.read_bytes() if real.is_file() else next(iter(sorted(tiny_headct.rglob("*.dcm")))).read_bytes()


def rewritten(data: bytes, **elements) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, (vr, value) in elements.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def deflated_header_over(data: bytes, body: bytes) -> bytes:
    """The file meta of ``data`` saying Deflated Explicit VR Little Endian, followed by ``body``."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(meta), ds.file_meta)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body


def nested(data: bytes, depth: int) -> bytes:
    open_sequence = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return data + (open_sequence + open_item) * depth + close * depth


def compressed_bomb(data: bytes, syntax: str) -> bytes:
    """The slice compressed (JPEG-LS or JPEG 2000), its codestream then declaring 60000 x 60000 pixels."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.compress(syntax)
    frame = bytearray(ds.PixelData)
    if syntax == JPEGLSLossless:
        at = frame.find(b"\xff\xf7")  # SOF55: length, precision, rows, columns
        frame[at + 5 : at + 9] = struct.pack(">HH", 60000, 60000)
    else:
        at = frame.find(b"\xff\x4f\xff\x51")  # SOC, SIZ: length, capabilities, Xsiz, Ysiz
        frame[at + 8 : at + 16] = struct.pack(">II", 60000, 60000)
    ds.PixelData = bytes(frame)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


HOSTILE = {
    "rescale-intercept-abc": (lambda d: rewritten(d, RescaleIntercept=("LO", "abc")), "RescaleIntercept is 'abc'"),
    "rescale-slope-two-values": (lambda d: rewritten(d, RescaleSlope=("DS", ["1", "2"])), "RescaleSlope is"),
    "frames-abc": (lambda d: rewritten(d, NumberOfFrames=("LO", "abc")), "NumberOfFrames is 'abc'"),
    "rows-infinite": (lambda d: rewritten(d, Rows=("FD", float("inf"))), "Rows is inf"),
    "rows-fraction": (lambda d: rewritten(d, Rows=("FD", 511.5)), "Rows is 511.5"),
    "slope-nan": (lambda d: rewritten(d, RescaleSlope=("DS", "nan")), "RescaleSlope is"),
    "bits-allocated-12": (lambda d: rewritten(d, BitsAllocated=("US", 12)), "BitsAllocated is 12"),
    "image-type-number": (lambda d: rewritten(d, ImageType=("IS", "7"), Rows=("US", 9000)), "image is 9000 x"),
    # plain bytes read as raw deflate either fail to inflate or inflate to garbage: refused either way
    "deflate-over-plain-body": (lambda d: deflated_header_over(d, d[132 + 200 :]), ""),
    "deflate-bomb": (
        lambda d: deflated_header_over(d, zlib.compress(b"\0" * (MAX_INFLATED_BYTES + (1 << 20)))[2:-4]),
        "decompression bomb",
    ),
    "nested-250-deep": (lambda d: nested(d, 250), "nested"),
    "nested-65-deep": (lambda d: nested(d, 65), "nested"),
    "length-beyond-the-file": (lambda d: d[:-1000] + b"", "truncated"),
    "jpeg-ls-frame-60000-square": (lambda d: compressed_bomb(d, JPEGLSLossless), "declares 60000 x 60000"),
    "jpeg2000-frame-60000-square": (lambda d: compressed_bomb(d, JPEG2000Lossless), "declares 60000 x 60000"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_one_dicom_error_naming_the_file(case, slice_bytes, model):
    make, expected = HOSTILE[case]
    data = make(slice_bytes)
    with pytest.raises(DicomError, match=f"^{case}: .*{expected}") as caught:
        model.predict(data, name=case)
    assert "\n" not in str(caught.value)


def test_a_nesting_within_the_limit_still_reads(slice_bytes):
    assert "PixelData" in read_dataset(nested(slice_bytes, 8))


def test_mutants_are_deterministic(tiny_headct):
    seeds = seeds_from(seed_paths(tiny_headct))
    assert [mutant(seeds, n) for n in range(50)] == [mutant(seeds, n) for n in range(50)]
    assert len({mutant(seeds, n) for n in range(50)}) > 45


def check(report) -> None:
    print(f"\nfuzz: {report.summary()}")
    assert report.clean, (dict(list(report.leaked.items())[:5]), report.crashed[:5], report.hung[:5])
    assert report.outcomes["result"] > 0 and report.mutants == sum(report.outcomes.values())
    assert max(report.worker_rss_mb) < 400


def test_fuzz_1000_mutants(tiny_headct):
    check(run(SHIPPED, seed_paths(tiny_headct), range(1000)))


@pytest.mark.slow
def test_fuzz_10000_mutants(tiny_headct):
    check(run(SHIPPED, seed_paths(tiny_headct), range(1000, 11000)))


def test_fuzzed_files_through_the_daemon_all_accounted_for(tmp_path, tiny_headct, caplog):
    """Every mutant dropped in the inbox ends as a result, a duplicate or a quarantine, with no traceback."""
    seeds = seeds_from(seed_paths(tiny_headct))
    count = 300
    config = ServeConfig(out=tmp_path / "out", inbox=tmp_path / "inbox", http_port=0)
    config = ServeConfig(**{**config.__dict__, "stable_seconds": 0.1, "poll_seconds": 0.05})
    caplog.set_level(logging.INFO, logger="edgedx.serve")
    with Service(config) as service:
        for n in range(count):
            (config.inbox / f"{n:04d}.part").write_bytes(mutant(seeds, 50_000 + n))
            (config.inbox / f"{n:04d}.part").rename(config.inbox / f"{n:04d}.dcm")
        registry = service.daemon.metrics.registry

        def outcomes() -> dict[str, float]:
            names = ("positive", "negative", "out_of_distribution", "quarantined", "duplicate", "error")
            got = {
                o: registry.get_sample_value("edgedx_inputs_total", {"source": "inbox", "outcome": o}) for o in names
            }
            return {o: v or 0.0 for o, v in got.items()}

        deadline = time.monotonic() + 120
        while sum(outcomes().values()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        final = outcomes()
    print(f"\nfuzzed inbox: {final}")
    assert sum(final.values()) == count and final["error"] == 0
    out = config.out
    published = final["positive"] + final["negative"] + final["out_of_distribution"]
    assert len(list(out.glob("series/*/instances/*.json"))) == published
    assert len(list((out / "quarantine").glob("*.json"))) == final["quarantined"]
    assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert not list((out / ".spool" / "pending").iterdir())


def test_an_incomplete_deflate_stream_is_refused(slice_bytes, model):
    body = zlib.compress(slice_bytes[132 + 200 :])[2:-4]  # a raw deflate stream, then cut short
    with pytest.raises(DicomError, match="^cut: the deflated data set does not inflate"):
        model.predict(deflated_header_over(slice_bytes, body[: len(body) // 2]), name="cut")
