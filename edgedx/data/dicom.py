"""DICOM in: one file or dataset to a checked 2-D image, and study folders labelled in the RSNA layout.

This module is on the TensorFlow-free side: the runtime reads scanner files through it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.uid import UID, RLELossless

from ..errors import ConfigError, DicomError, LabelError
from ..preprocess import modality_lut
from .dataset import SPLITS, Dataset, Split
from .synth import config_from_record, recorded_settings

#: Largest image side accepted; protects memory from absurd declared dimensions.
MAX_SIDE = 4096
#: Deepest sequence nesting accepted (DCMTK's limit); deeper files are refused, not recursed into.
MAX_NESTING = 64
#: Largest dataset a deflated file may inflate to: a decompression bomb is refused before it is expanded.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
#: Bits Allocated values a greyscale image may have.
BITS_ALLOCATED = (8, 16, 32)

#: What pydicom and its decoders raise on bytes that are not what their header says.
_PARSE_ERRORS = (
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
    UnicodeError,
    struct.error,
    zlib.error,
    NotImplementedError,  # an unknown VR, met when an element is converted
    BytesLengthException,  # a value's length does not fit its VR
)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _open(source: Path | str | bytes) -> tuple[BinaryIO, str | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), None
    path = Path(source)
    try:
        return open(path, "rb"), path.name  # closed by the caller
    except FileNotFoundError:
        raise DicomError(f"{path}: no such file") from None
    except OSError as exc:
        raise DicomError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _looks_headless(fp: BinaryIO) -> bool:
    """True when a file without the preamble starts like a DICOM data set (group 0002 or 0008, either byte order)."""
    fp.seek(0)
    head = fp.read(8)
    fp.seek(0)
    if len(head) < 8:
        return False
    little, big = struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]
    return little in (0x0002, 0x0008) or big in (0x0002, 0x0008)


def _refuse_deflate_bomb(fp: BinaryIO, name: str) -> None:
    """For the deflated transfer syntax, inflate at most MAX_INFLATED_BYTES before pydicom inflates it all."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp.seek(0)
    try:
        read_preamble(fp, False)
        syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
    except Exception:  # no readable meta: dcmread below says what is wrong
        syntax = None
    if syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflater.decompress(fp.read(), MAX_INFLATED_BYTES)
        except zlib.error as exc:
            raise DicomError(f"{name}: the deflated data set does not inflate ({exc})") from None
        if inflater.unconsumed_tail:
            raise DicomError(
                f"{name}: the deflated data set inflates to over {MAX_INFLATED_BYTES >> 20} MB (a decompression bomb)"
            )
        if not inflater.eof:
            raise DicomError(f"{name}: the deflated data set does not inflate (the deflate stream is incomplete)")
    fp.seek(0)


def _name_the_encoding(ds) -> None:
    """A file without meta information: record the encoding pydicom found, so its pixels can be decoded."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_nesting(ds, name: str, depth: int = 1) -> None:
    """Refuse sequences nested deeper than MAX_NESTING; walks only sequence elements, converting nothing else."""
    for raw in ds.elements():
        if raw.VR != "SQ":
            continue
        if depth > MAX_NESTING:
            raise DicomError(f"{name}: sequences nested over {MAX_NESTING} deep")
        for item in ds[raw.tag].value:
            _check_nesting(item, name, depth + 1)


def read_dataset(source: Path | str | bytes, *, stop_before_pixels: bool = False, name: str | None = None):
    """Read a DICOM file (a path, or its bytes) into a pydicom dataset.

    Also reads files written without the 128-byte preamble and ``DICM`` marker when they start
    like a DICOM data set (older systems still send them). Refuses, before expanding them,
    deflated data sets that would inflate beyond ``MAX_INFLATED_BYTES`` and sequences nested
    deeper than ``MAX_NESTING``. Anything not usable as DICOM becomes a :class:`DicomError`.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp, file_name = _open(source)
    name = name or file_name or "input"
    with fp:
        try:
            _refuse_deflate_bomb(fp, name)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                if not _looks_headless(fp):
                    raise DicomError(
                        f"{name}: not a DICOM file (no 'DICM' marker after the 128-byte preamble, "
                        "and it does not start like a DICOM data set)"
                    ) from None
                ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
                image_like = "Modality" in ds and ("PixelData" in ds or stop_before_pixels)
                if "SOPClassUID" not in ds and not image_like:
                    raise DicomError(
                        f"{name}: not a DICOM file (no preamble, and no SOP Class UID or modality and pixels)"
                    ) from None
                _name_the_encoding(ds)
            _check_nesting(ds, name)
        except RecursionError:
            raise DicomError(f"{name}: sequences nested too deep to read") from None
        except _PARSE_ERRORS as exc:
            raise DicomError(f"{name}: unreadable DICOM, the file may be truncated ({_short(exc)})") from None
    return ds


def header_value(ds, keyword: str, name: str, default=None):
    """One header value, or ``default`` when absent or empty; a value pydicom cannot convert is a DicomError."""
    try:
        element = ds.get(keyword)
    except RecursionError:
        raise DicomError(f"{name}: {keyword} has sequences nested too deep to read") from None
    except _PARSE_ERRORS as exc:
        raise DicomError(f"{name}: {keyword} cannot be read ({_short(exc)})") from None
    return default if element is None or element == "" else element


def header_int(ds, keyword: str, name: str, *, default: int, low: int, high: int) -> int:
    """An integer header value within [low, high]; anything else names the attribute and what was found."""
    value = header_value(ds, keyword, name, default)
    try:
        number = int(value)  # a string such as "abc", a multi-value, inf or nan fail here
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{name}: {keyword} is {_shown(value)}; expected one integer in {low}..{high}") from None
    if not low <= number <= high or (isinstance(value, float) and not value.is_integer()):
        raise DicomError(f"{name}: {keyword} is {_shown(value)}; expected one integer in {low}..{high}")
    return number


def header_float(ds, keyword: str, name: str, *, default: float) -> float:
    """A finite decimal header value (one value, not a list)."""
    value = header_value(ds, keyword, name, default)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{name}: {keyword} is {_shown(value)}; expected one finite number") from None
    if not math.isfinite(number):
        raise DicomError(f"{name}: {keyword} is {_shown(value)}; expected one finite number")
    return number


def header_text(ds, keyword: str, name: str, default: str = "") -> str:
    value = header_value(ds, keyword, name, default)
    if not isinstance(value, str):
        raise DicomError(f"{name}: {keyword} is {_shown(value)}; expected one text value")
    return value.strip()


def _shown(value) -> str:
    return repr(value if isinstance(value, (int, float, str)) else str(value))[:60]


def image_from_dataset(ds, *, name: str = "dataset", modalities: Iterable[str] | None = None) -> np.ndarray:
    """A DICOM dataset -> float32 (H, W) in output units (HU for CT), after checking it is usable.

    Every header value it uses is validated before any pixel is decoded, so the decoder never
    allocates more than ``MAX_SIDE`` x ``MAX_SIDE`` x 4 bytes. Applies the linear Modality LUT
    (Rescale Slope/Intercept, PS3.3 C.11.1) and inverts MONOCHROME1 so that higher always means denser.

    Raises:
        DicomError: no pixel data, an undecodable transfer syntax, colour or multi-frame image,
            absurd or unreadable header values, truncated pixel data, or a modality outside ``modalities``.
    """
    modality = header_text(ds, "Modality", name)
    if modalities is not None and modality not in set(modalities):
        raise DicomError(f"{name}: Modality is {modality!r}, expected one of {sorted(set(modalities))}")
    if "PixelData" not in ds:
        raise DicomError(f"{name}: no pixel data (PixelData (7FE0,0010) is absent)")
    image_type = header_value(ds, "ImageType", name, ())
    values = list(image_type) if isinstance(image_type, (list, tuple, MultiValue)) else [image_type]
    if "LOCALIZER" in {str(v).strip().upper() for v in values}:
        raise DicomError(f"{name}: ImageType says LOCALIZER; a localizer (scout) is a projection, not a slice")
    rows = header_int(ds, "Rows", name, default=0, low=0, high=0xFFFF)
    cols = header_int(ds, "Columns", name, default=0, low=0, high=0xFFFF)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise DicomError(f"{name}: image is {rows} x {cols}; expected 1..{MAX_SIDE} pixels a side")
    samples = header_int(ds, "SamplesPerPixel", name, default=1, low=0, high=0xFFFF)
    if samples != 1:
        raise DicomError(f"{name}: SamplesPerPixel is {samples}; only greyscale (1) images are supported")
    photometric = header_text(ds, "PhotometricInterpretation", name, "MONOCHROME2")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"{name}: PhotometricInterpretation is {photometric!r}; expected MONOCHROME1 or MONOCHROME2")
    frames = header_int(ds, "NumberOfFrames", name, default=1, low=0, high=2**31 - 1)
    if frames != 1:
        raise DicomError(f"{name}: {frames} frames; only single-frame images are supported")
    bits = header_int(ds, "BitsAllocated", name, default=0, low=0, high=0xFFFF)
    if bits not in BITS_ALLOCATED:
        raise DicomError(f"{name}: BitsAllocated is {bits}; expected one of {', '.join(map(str, BITS_ALLOCATED))}")
    stored = header_int(ds, "BitsStored", name, default=bits, low=1, high=bits)
    header_int(ds, "HighBit", name, default=stored - 1, low=stored - 1, high=bits - 1)
    header_int(ds, "PixelRepresentation", name, default=0, low=0, high=1)
    slope = header_float(ds, "RescaleSlope", name, default=1.0) or 1.0
    intercept = header_float(ds, "RescaleIntercept", name, default=0.0)
    syntax = _transfer_syntax(ds)
    _refuse_codestream_bomb(ds, name, rows, cols, syntax)
    pixels = _decoded_pixels(ds, name, syntax)
    if pixels.shape != (rows, cols):
        raise DicomError(f"{name}: pixel array has shape {pixels.shape}, expected ({rows}, {cols})")
    image = modality_lut(pixels, slope, intercept)
    if photometric == "MONOCHROME1":
        image = image.max() + image.min() - image
    if not np.isfinite(image).all():
        raise DicomError(f"{name}: pixel values are not finite after the modality LUT")
    return image


#: JPEG start-of-frame markers (baseline to lossless, arithmetic; JPEG-LS SOF55) that state the frame's size.
_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares in its header, or None if it states none.

    A decoder allocates what the codestream declares, whatever the DICOM header says: a slice
    whose codestream says 60000 x 60000 made libjpeg allocate 13.8 GB and spend a minute.
    """
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:  # JPEG 2000: SOC, then SIZ
        xsiz, ysiz, x_offset, y_offset = struct.unpack(">IIII", frame[8:24])
        return max(0, ysiz - y_offset), max(0, xsiz - x_offset)
    if frame[:2] != b"\xff\xd8":  # not a JPEG stream either (RLE, or damaged)
        return None
    at = 2
    while at + 4 <= len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = struct.unpack(">H", frame[at + 2 : at + 4])[0]
        if marker in _SOF_MARKERS and at + 9 <= len(frame):
            rows, cols = struct.unpack(">HH", frame[at + 5 : at + 9])
            return rows, cols
        if marker == 0xDA:  # start of scan before any frame header
            return None
        at += 2 + length
    return None


def _refuse_codestream_bomb(ds, name: str, rows: int, cols: int, syntax: UID | None) -> None:
    """Refuse compressed pixel data whose codestream declares another size than Rows x Columns."""
    from pydicom.encaps import generate_fragmented_frames

    if not (syntax is not None and syntax.is_transfer_syntax and syntax.is_encapsulated):
        return  # native pixel data (its size is checked against the header), or no decoder for it anyway
    try:
        first = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    except (StopIteration, *_PARSE_ERRORS) as exc:
        raise DicomError(f"{name}: encapsulated pixel data has no readable frame ({_short(exc)})") from None
    declared = codestream_size(first[:65536])
    if declared is not None and declared != (rows, cols):
        raise DicomError(
            f"{name}: the compressed frame declares {declared[0]} x {declared[1]} pixels, "
            f"the header {rows} x {cols}; refused before decoding"
        )


#: Decoders chosen by transfer syntax where the default one is not robust to hostile data: the
#: pylibjpeg-rle plugin (Rust) panics on malformed RLE segments; pydicom's own RLE decoder raises.
DECODING_PLUGINS = {RLELossless: "pydicom"}
#: Type 1 attributes of a greyscale image that older files omit, and the decoder option standing in for each.
GREYSCALE_DEFAULTS = {
    "PhotometricInterpretation": ("photometric_interpretation", "MONOCHROME2"),
    "SamplesPerPixel": ("samples_per_pixel", 1),
}


def _transfer_syntax(ds) -> UID | None:
    syntax = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    return syntax if isinstance(syntax, UID) else None


def _decoded_pixels(ds, name: str, syntax: UID | None) -> np.ndarray:
    """The pixel array, decoded by the plugin chosen for ``syntax``; every failure is a DicomError."""
    options = dict(value for keyword, value in GREYSCALE_DEFAULTS.items() if keyword not in ds)
    if syntax in DECODING_PLUGINS:
        options["decoding_plugin"] = DECODING_PLUGINS[syntax]
    try:
        if options:
            ds.pixel_array_options(**options)
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:  # no decoder installed / every decoder failed
        syntax_name = getattr(syntax, "name", str(syntax))
        raise DicomError(
            f"{name}: cannot decode pixel data in transfer syntax {syntax_name} ({syntax}): {_short(exc)}"
        ) from None
    except RecursionError:
        raise DicomError(f"{name}: sequences nested too deep to read") from None
    except _PARSE_ERRORS as exc:
        raise DicomError(
            f"{name}: pixel data is truncated or inconsistent with Rows/Columns/Bits ({_short(exc)})"
        ) from None
    except BaseException as exc:
        if type(exc).__name__ == "PanicException":  # a decoder written in Rust gave up (pyo3 panics are BaseException)
            raise DicomError(f"{name}: the pixel decoder failed on this data ({_short(exc)})") from None
        raise


def read_image(path: Path | str, *, modalities: Iterable[str] | None = None) -> np.ndarray:
    """A DICOM file -> float32 (H, W) in output units; see :func:`image_from_dataset`."""
    return image_from_dataset(read_dataset(path), name=Path(path).name, modalities=modalities)


def _split_for_patient(patient_id: str) -> str:
    """Deterministic 70/15/15 patient-level split for folders whose labels give no split column."""
    bucket = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


#: ``any`` and the five hemorrhage subtypes of the RSNA layout: a multi-label head-CT dataset.
RSNA_LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")

#: How many headers, spread over a folder, say which body parts it holds.
BODY_PART_SAMPLE = 16


def _body_parts(paths: list[Path]) -> tuple[str, ...]:
    """Body Part Examined values named in a sample of the files' headers (unreadable ones skipped)."""
    step = max(1, len(paths) // BODY_PART_SAMPLE)
    named = set()
    for p in paths[::step][:BODY_PART_SAMPLE]:
        try:
            named.add(header_text(read_dataset(p, stop_before_pixels=True), "BodyPartExamined", p.name).upper())
        except DicomError:
            continue
    return tuple(sorted(named - {""}))


def _synthetic_settings(folder: Path) -> dict[str, object] | None:
    """The settings ``edgedx data synth`` recorded in ``dataset.json``, if it made this folder."""
    try:
        made_by = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(made_by, dict) or made_by.get("generator") != "edgedx.data.synth":
        return None
    try:
        config = config_from_record(made_by)
    except (TypeError, ConfigError):
        return None  # a hand-edited dataset.json: the folder is read as ordinary DICOM data
    return {**recorded_settings(config), "generator_version": made_by.get("generator_version")}


def read_study_folder(
    folder: Path | str,
    *,
    labels_csv: str = "labels.csv",
    target: str | Sequence[str] = "any",
    modalities: Iterable[str] = ("CT",),
) -> Dataset:
    """A folder of DICOM slices labelled in the RSNA intracranial-hemorrhage wide layout.

    ``labels.csv`` has one row per slice and a column ``file`` (path relative to the folder) or
    ``SOPInstanceUID`` (files are then found by reading headers), and one 0/1 column per label
    (``any``, ``epidural``, ...). An optional ``split`` column (train/val/test) is used as is;
    without it patients are split 70/15/15 by a hash of ``PatientID`` (read from the files when
    the CSV has no such column), so no patient is in two splits.

    Args:
        folder: The study folder.
        labels_csv: Name of the labels file inside it.
        target: The label column to learn (binary: 0 = no, 1 = yes), or several (a multi-label
            dataset, e.g. ``any`` and the five RSNA subtypes; see :data:`RSNA_LABELS`).
        modalities: Modalities accepted.
    """
    folder = Path(folder)
    csv_path = folder / labels_csv
    if not csv_path.is_file():
        raise LabelError(
            f"{folder}: no {labels_csv}; a DICOM folder needs one row per slice with 'file' "
            f"or 'SOPInstanceUID' and a 0/1 column {target!r}"
        )
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise LabelError(f"{csv_path}: no rows")
    columns = set(rows[0])
    targets = [target] if isinstance(target, str) else list(target)
    if not targets or len(set(targets)) != len(targets):
        raise LabelError(f"labels to learn must be distinct column names, got {targets}")
    missing_columns = [t for t in targets if t not in columns]
    if missing_columns:
        raise LabelError(f"{csv_path}: no column {missing_columns[0]!r}; columns are {', '.join(sorted(columns))}")
    if not {"file", "SOPInstanceUID"} & columns:
        raise LabelError(f"{csv_path}: needs a 'file' or a 'SOPInstanceUID' column to find each slice")

    if "file" in columns:
        paths = [folder / r["file"] for r in rows]
    else:
        by_uid = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() not in (".csv", ".json", ".txt", ".md"):
                try:
                    by_uid[str(read_dataset(p, stop_before_pixels=True).get("SOPInstanceUID", ""))] = p
                except DicomError:
                    continue  # not DICOM: any slice it should have been is reported missing below
        missing = [r["SOPInstanceUID"] for r in rows if r["SOPInstanceUID"] not in by_uid]
        if missing:
            raise LabelError(
                f"{csv_path}: no file in {folder} has SOPInstanceUID {missing[0]}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
            )
        paths = [by_uid[r["SOPInstanceUID"]] for r in rows]
    for p in paths:
        if not p.is_file():
            raise LabelError(f"{csv_path}: row names {p.relative_to(folder)}, which does not exist")

    labels = []
    for line, row in enumerate(rows, start=2):
        values = []
        for column in targets:
            value = (row.get(column) or "").strip()
            if value not in ("0", "1"):
                raise LabelError(f"{csv_path}:{line}: {column!r} is {value!r}; expected 0 or 1")
            values.append(int(value))
        labels.append(values if len(targets) > 1 else values[0])

    if "split" in columns:
        split_of = [r["split"].strip() for r in rows]
        bad = sorted(set(split_of) - set(SPLITS))
        if bad:
            raise LabelError(f"{csv_path}: unknown split {bad[0]!r}; use train, val or test")
    else:
        patients = [
            r.get("PatientID") or str(read_dataset(p, stop_before_pixels=True).get("PatientID", p.parent.name))
            for r, p in zip(rows, paths, strict=True)
        ]
        split_of = [_split_for_patient(pid) for pid in patients]

    label_array = np.asarray(labels, np.int64)
    splits = {}
    for name in SPLITS:
        idx = [i for i, s in enumerate(split_of) if s == name]
        split_paths = [paths[i] for i in idx]
        splits[name] = Split(
            ids=tuple(str(p.relative_to(folder)) for p in split_paths),
            labels=label_array[idx],
            read=lambda i, ps=split_paths: read_image(ps[i], modalities=modalities),
        )
    input_kind = "hu" if set(modalities) <= {"CT"} else "intensity"
    return Dataset(
        body_parts=_body_parts(paths),
        synthetic=_synthetic_settings(folder),
        name=folder.name,
        source=str(folder),
        input=input_kind,
        class_names=tuple(targets) if len(targets) > 1 else (f"no-{targets[0]}", targets[0]),
        splits=splits,
        default_size=64,
    )
