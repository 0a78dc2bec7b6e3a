"""A DICOM fuzz harness: mutants of real and synthetic slices, each run through the runtime in a child process.

Mutations are structure-aware (header values the decoder and preprocessing rely on, set to absurd
values or with the wrong VR; deleted tags; a wrong transfer syntax; short or long pixel data;
sequences nested deep) or byte-level (flipped bytes, forged lengths, inserted, cut or repeated
runs). A mutant is made from ``(seed file, mutant number)`` alone, so every finding is
reproducible from two numbers.

Each mutant runs ``Model.predict`` on its bytes in a worker process: anything but a result or an
:class:`~edgedx.errors.EdgedxError` is a finding, and so is a worker that dies (a crash) or takes
longer than the time limit (a hang); the worker is then replaced. ``benchmarks/fuzz_dicom.py``
runs it from the command line; ``tests/test_fuzz.py`` runs it in the suite.
"""

from __future__ import annotations

import io
import multiprocessing
import random
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

#: Header attributes the decoder and the preprocessing read, with their proper VR.
IMAGE_TAGS = {
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "RescaleSlope": (0x00281053, "DS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "WindowCenter": (0x00281050, "DS"),
    "WindowWidth": (0x00281051, "DS"),
    "Modality": (0x00080060, "CS"),
    "ImageType": (0x00080008, "CS"),
    "PixelSpacing": (0x00280030, "DS"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
}
ODD_TEXT = ["abc", "", " ", "1\\2", "inf", "-inf", "nan", "1e400", "-1", "0", "99999999999", "0x10", "\x00", "é"]
ODD_NUMBERS = [0, 1, 2, 3, 7, 9, 15, 17, 33, 64, 255, 256, 4096, 4097, 32767, 32768, 65535]
ODD_UIDS = ["../../etc/passwd", "a/b", "1.2\x00.3", "1." * 40, "", "..", "/", "1.2.3" + "4" * 70]
SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000,
    RLELossless,
    "1.2.3.4.5.6",
]


def seeds_from(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


# -- mutations -----------------------------------------------------------------------------------
def _odd_value(rng: random.Random, vr: str):
    """A value for an element of this VR that a reader must survive; sometimes with the wrong VR."""
    choice = rng.random()
    if choice < 0.35:
        return rng.choice(["DS", "IS", "LO", "CS"]), rng.choice(ODD_TEXT)  # text where a number belongs
    if choice < 0.55:
        return "FD", rng.choice([float("inf"), float("nan"), -1.0, 1e308, 0.5, 65535.5])
    if choice < 0.65:
        return "UI", rng.choice(ODD_UIDS)
    if vr == "US":
        return "US", rng.choice(ODD_NUMBERS) if rng.random() < 0.8 else [rng.choice(ODD_NUMBERS)] * 2
    if vr in ("DS", "IS"):
        return vr, rng.choice([*ODD_TEXT[3:], "1\\2\\3", "2", "-1024", "0.0001"])
    return vr, rng.choice(["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "", "MR", "CT", "LOCALIZER"])


def _structured(seed: bytes, rng: random.Random) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(seed), force=True)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        keyword = rng.choice(list(IMAGE_TAGS))
        tag, vr = IMAGE_TAGS[keyword]
        if kind < 0.55:
            new_vr, value = _odd_value(rng, vr)
            ds[tag] = DataElement(tag, new_vr, value)
        elif kind < 0.7:
            if tag in ds:
                del ds[tag]
        elif kind < 0.8 and "PixelData" in ds:
            pixels = bytes(ds.PixelData)
            cut = rng.choice([0, 1, len(pixels) // 2, len(pixels) - 1, len(pixels) + 2, len(pixels) * 2])
            ds.PixelData = pixels[:cut] if cut <= len(pixels) else pixels + bytes(cut - len(pixels))
        elif kind < 0.86:
            ds.file_meta.TransferSyntaxUID = rng.choice(SYNTAXES)
        elif kind < 0.92 and ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian).is_encapsulated:
            ds.PixelData = _forged_frame_size(bytes(ds.PixelData), rng)
        else:
            return _nested(_encode(ds, rng), rng.choice([8, 60, 70, 250, 2000]))
    return _encode(ds, rng)


def _forged_frame_size(pixel_data: bytes, rng: random.Random) -> bytes:
    """Compressed pixel data whose JPEG, JPEG-LS or JPEG 2000 header states another frame size."""
    data = bytearray(pixel_data)
    size = rng.choice([0, 1, 511, 513, 4096, 20000, 65535])
    for marker, offset, fmt in ((b"\xff\x4f\xff\x51", 8, ">II"), (b"\xff\xc3", 5, ">HH"), (b"\xff\xf7", 5, ">HH")):
        at = data.find(marker)
        if at >= 0:
            data[at + offset : at + offset + struct.calcsize(fmt)] = struct.pack(fmt, size, rng.choice([size, 512]))
            break
    return bytes(data)


def _encode(ds, rng: random.Random) -> bytes:
    """Write as the (possibly wrong) transfer syntax says, without re-encoding pixel data."""
    buffer = io.BytesIO()
    syntax = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    try:
        ds.save_as(buffer, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    except Exception:  # a value that pydicom will not write: write the element's VR as UN bytes instead
        buffer = io.BytesIO()
        for element in list(ds):
            if element.VR not in ("SQ",) and not isinstance(element.value, (bytes, bytearray)):
                ds[element.tag] = DataElement(element.tag, "UN", str(element.value).encode("latin-1", "replace"))
        ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def _nested(data: bytes, depth: int) -> bytes:
    """Append a ContentSequence nested ``depth`` deep (undefined lengths, explicit VR little endian)."""
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    open_sequence = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return data + (open_sequence + open_item) * depth + close * depth


def _bytewise(seed: bytes, rng: random.Random) -> bytes:
    data = bytearray(seed)
    start = 132 if data[128:132] == b"DICM" else 0
    for _ in range(rng.randint(1, 4)):
        if len(data) <= start:
            break
        kind = rng.random()
        at = rng.randrange(start, max(start + 1, min(len(data), 4096 if rng.random() < 0.8 else len(data))))
        if kind < 0.3:
            data[at] ^= 1 << rng.randrange(8)
        elif kind < 0.5:  # a forged 4-byte length or value
            data[at : at + 4] = struct.pack("<I", rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFF0, len(data), 0xFFFE]))
        elif kind < 0.65:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind < 0.8:
            del data[at : at + rng.randint(1, 64)]
        elif kind < 0.9:
            data = data[: rng.randrange(len(data))]
        else:
            chunk = data[at : at + rng.randint(8, 256)]
            data[at:at] = chunk * rng.randint(1, 8)
    return bytes(data)


def mutant(seeds: list[bytes], number: int) -> bytes:
    """Mutant ``number``: a structure-aware or byte-level mutation of one seed, the same bytes every time."""
    rng = random.Random(number)
    seed = seeds[number % len(seeds)]
    if rng.random() < 0.6:
        try:
            return _structured(seed, rng)
        except Exception:  # a seed pydicom cannot rewrite this way: fall back to bytes
            pass
    return _bytewise(seed, rng)


# -- running -------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def _worker(bundle: str, seed_paths: list[str], conn) -> None:
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns about each odd value it meets
    import logging

    logging.disable(logging.CRITICAL)
    from edgedx.errors import EdgedxError
    from edgedx.runtime import Model

    model = Model.load(bundle, threads=1)
    seeds = seeds_from([Path(p) for p in seed_paths])
    conn.send(("ready", _rss_mb()))
    while (number := conn.recv()) is not None:
        data = mutant(seeds, number)
        try:
            model.predict(data, name=f"mutant-{number}")
            outcome = "result"
        except EdgedxError as exc:
            outcome = f"refused:{type(exc).__name__}"
        except BaseException as exc:  # the finding this harness is for
            outcome = f"leaked:{type(exc).__name__}: {str(exc)[:200]}"
        conn.send((outcome, _rss_mb()))


@dataclass
class FuzzReport:
    mutants: int = 0
    outcomes: Counter = field(default_factory=Counter)
    leaked: dict[int, str] = field(default_factory=dict)  # mutant number -> exception
    crashed: list[int] = field(default_factory=list)
    hung: list[int] = field(default_factory=list)
    slowest_seconds: float = 0.0
    worker_rss_mb: list[float] = field(default_factory=list)  # (start, peak) of each worker
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.leaked or self.crashed or self.hung)

    def summary(self) -> str:
        refused = sum(n for k, n in self.outcomes.items() if k.startswith("refused"))
        return (
            f"{self.mutants} mutants in {self.seconds:.0f} s: {self.outcomes['result']} results, {refused} refused "
            f"with an EdgedxError, {len(self.leaked)} other exceptions, {len(self.crashed)} crashes, "
            f"{len(self.hung)} hangs; slowest {self.slowest_seconds * 1e3:.0f} ms; worker RSS "
            f"{min(self.worker_rss_mb, default=0):.0f}-{max(self.worker_rss_mb, default=0):.0f} MB"
        )


class _Slot:
    """One worker process, replaced when it crashes or hangs."""

    def __init__(self, bundle: str, seed_paths: list[str]) -> None:
        self.args = (bundle, seed_paths)
        self.context = multiprocessing.get_context("spawn")
        self.start()

    def start(self) -> None:
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(*self.args, child), daemon=True)
        self.process.start()
        child.close()
        _, self.start_rss = self.conn.recv()
        self.peak_rss = self.start_rss

    def replace(self) -> None:
        self.process.kill()
        self.process.join()
        self.start()


def run(bundle: Path, seed_paths: list[Path], numbers: range, *, workers: int = 2, timeout: float = 5.0) -> FuzzReport:
    """Run mutants ``numbers`` over ``workers`` processes; each mutant gets ``timeout`` seconds."""
    report = FuzzReport()
    lock = threading.Lock()
    todo = iter(numbers)
    began = time.monotonic()

    def drive() -> None:
        slot = _Slot(str(bundle), [str(p) for p in seed_paths])
        while True:
            with lock:
                number = next(todo, None)
            if number is None:
                break
            sent = time.monotonic()
            try:
                slot.conn.send(number)
                answered = slot.conn.poll(timeout)
                outcome, rss = slot.conn.recv() if answered else ("hung", 0.0)
            except (EOFError, OSError):
                outcome, rss = "crashed", 0.0
            took = time.monotonic() - sent
            with lock:
                report.mutants += 1
                report.slowest_seconds = max(report.slowest_seconds, took)
                if outcome == "hung":
                    report.hung.append(number)
                elif outcome == "crashed":
                    report.crashed.append(number)
                elif outcome.startswith("leaked:"):
                    report.leaked[number] = outcome[len("leaked:") :]
                report.outcomes[outcome.split(":")[0] if not outcome.startswith("refused") else outcome] += 1
            if outcome in ("hung", "crashed"):
                report.worker_rss_mb += [slot.start_rss, slot.peak_rss]
                slot.replace()
            else:
                slot.peak_rss = max(slot.peak_rss, rss)
        slot.conn.send(None)
        slot.process.join(10)
        with lock:
            report.worker_rss_mb += [slot.start_rss, slot.peak_rss]

    threads = [threading.Thread(target=drive) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.monotonic() - began
    return report
