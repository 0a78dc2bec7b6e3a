"""DICOM in: one file or dataset to a checked 2-D image, and study folders labelled in the RSNA layout.

This module is on the TensorFlow-free side: the runtime reads scanner files through it.
"""

from __future__ import annotations

import csv
import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DicomError, LabelError
from ..preprocess import modality_lut
from .dataset import SPLITS, Dataset, Split

#: Largest image side accepted; protects memory from absurd declared dimensions.
MAX_SIDE = 4096


def read_dataset(source: Path | str | bytes, *, stop_before_pixels: bool = False, name: str | None = None):
    """Read a DICOM file (a path, or its bytes); anything not readable as DICOM becomes a :class:`DicomError`."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(source, bytes):
        target, name = io.BytesIO(source), name or "input"
    else:
        target = Path(source)
        name = name or target.name
    try:
        return pydicom.dcmread(target, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise DicomError(f"{name}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except FileNotFoundError:
        raise DicomError(f"{target}: no such file") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, OverflowError, MemoryError, struct.error) as exc:
        raise DicomError(f"{name}: unreadable DICOM, the file may be truncated ({type(exc).__name__}: {exc})") from None


def image_from_dataset(ds, *, name: str = "dataset", modalities: Iterable[str] | None = None) -> np.ndarray:
    """A DICOM dataset -> float32 (H, W) in output units (HU for CT), after checking it is usable.

    Applies the linear Modality LUT (Rescale Slope/Intercept, PS3.3 C.11.1) and inverts
    MONOCHROME1 so that higher always means denser.

    Raises:
        DicomError: no pixel data, unsupported transfer syntax, colour or multi-frame image,
            absurd dimensions, truncated pixel data, or a modality outside ``modalities``.
    """
    modality = str(ds.get("Modality", ""))
    if modalities is not None and modality not in set(modalities):
        raise DicomError(f"{name}: Modality is {modality!r}, expected one of {sorted(set(modalities))}")
    if "PixelData" not in ds:
        raise DicomError(f"{name}: no pixel data (PixelData (7FE0,0010) is absent)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise DicomError(f"{name}: image is {rows} x {cols}; expected 1..{MAX_SIDE} pixels a side")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DicomError(f"{name}: SamplesPerPixel is {samples}; only greyscale (1) images are supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"{name}: PhotometricInterpretation is {photometric!r}; expected MONOCHROME1 or MONOCHROME2")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomError(f"{name}: {frames} frames; only single-frame images are supported")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:  # no decoder installed / every decoder failed
        syntax_name = getattr(syntax, "name", str(syntax))
        reason = " ".join(str(exc).split())[:200]
        raise DicomError(
            f"{name}: cannot decode pixel data in transfer syntax {syntax_name} ({syntax}): {reason}"
        ) from None
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise DicomError(
            f"{name}: pixel data is truncated or inconsistent with Rows/Columns/Bits "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    if pixels.shape != (rows, cols):
        raise DicomError(f"{name}: pixel array has shape {pixels.shape}, expected ({rows}, {cols})")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    image = modality_lut(pixels, slope, intercept)
    if photometric == "MONOCHROME1":
        image = image.max() + image.min() - image
    return image


def read_image(path: Path | str, *, modalities: Iterable[str] | None = None) -> np.ndarray:
    """A DICOM file -> float32 (H, W) in output units; see :func:`image_from_dataset`."""
    return image_from_dataset(read_dataset(path), name=Path(path).name, modalities=modalities)


def _split_for_patient(patient_id: str) -> str:
    """Deterministic 70/15/15 patient-level split for folders whose labels give no split column."""
    bucket = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def read_study_folder(
    folder: Path | str, *, labels_csv: str = "labels.csv", target: str = "any", modalities: Iterable[str] = ("CT",)
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
        target: The label column to learn (binary: 0 = no, 1 = yes).
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
    if target not in columns:
        raise LabelError(f"{csv_path}: no column {target!r}; columns are {', '.join(sorted(columns))}")
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
        value = (row.get(target) or "").strip()
        if value not in ("0", "1"):
            raise LabelError(f"{csv_path}:{line}: {target!r} is {value!r}; expected 0 or 1")
        labels.append(int(value))

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
        name=folder.name,
        source=str(folder),
        input=input_kind,
        class_names=(f"no-{target}", target),
        splits=splits,
        hflip_ok=True,
        default_size=64,
    )
