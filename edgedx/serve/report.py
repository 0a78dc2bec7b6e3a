"""A DICOM Comprehensive SR per instance result (highdicom), referencing the source image.

The SR is what a PACS files next to the study, so it carries the source's patient and study
modules like any SR; logs and metrics never do. Real sources lack attributes: de-identification
empties or removes Type 2 ones (PatientBirthDate, PatientSex, ...), older systems omit the SOP
Class UID. The SR is built from what the source has: missing Type 2 attributes become empty
values, a missing SOP Class UID is derived from the modality, and a source without the UIDs an
SR must reference gives a :class:`~edgedx.errors.ReportError` (the result is published without an SR).
"""

from __future__ import annotations

import io
import re
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ..bundle import Bundle
from ..errors import ReportError

#: Local coding scheme for the model's own concepts (DICOM PS3.16 8.2 allows "99" private schemes).
SCHEME = "99EDGEDX"

#: Patient and study attributes an SR copies from its evidence: Type 2, so empty when the source lacks them.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: What a conformant DA or TM value looks like, for the dates and times the SR copies.
DATE_TIME_PATTERNS = {
    "PatientBirthDate": re.compile(r"\d{8}"),
    "StudyDate": re.compile(r"\d{8}"),
    "StudyTime": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
    "PatientSex": re.compile(r"[MFO]"),
}
#: UIDs without which the SR cannot say which image it is about, or be filed with its study.
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: Storage SOP classes by modality, for sources that omit the SOP Class UID.
SOP_CLASS_BY_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}


def evidence_of(source: Any) -> Dataset:
    """The few attributes of ``source`` an SR needs, completed as the standard allows; ReportError if it cannot be."""
    evidence = Dataset()
    missing = [keyword for keyword in REQUIRED_UIDS if not str(source.get(keyword, "") or "").strip()]
    if missing:
        raise ReportError(f"the source has no {', '.join(missing)} (Type 1) for the SR to reference")
    for keyword in REQUIRED_UIDS:
        setattr(evidence, keyword, str(source.get(keyword)).strip())
    sop_class = str(source.get("SOPClassUID", "") or "").strip()
    if not sop_class:
        modality = str(source.get("Modality", "") or "")
        sop_class = SOP_CLASS_BY_MODALITY.get(modality, "")
        if not sop_class:
            raise ReportError(f"the source has no SOPClassUID and its modality {modality!r} does not imply one")
    evidence.SOPClassUID = sop_class
    for keyword in COPIED_TYPE2:
        value = source.get(keyword)
        setattr(evidence, keyword, _conformant(keyword, "" if value is None else value))
    if "SpecificCharacterSet" in source:
        evidence.SpecificCharacterSet = source.SpecificCharacterSet
    return evidence


def _conformant(keyword: str, value: Any) -> Any:
    """A Type 2 value as the SR may carry it: dates and times in the ACR-NEMA form (``1999.05.05``,
    ``10:52:34.53``) rewritten in the DICOM form, anything else unparseable left empty, as Type 2 allows."""
    if keyword not in DATE_TIME_PATTERNS:
        return value
    text = str(value).strip().replace(".", "", 2 if keyword.endswith("Date") else 0).replace(":", "")
    return text if DATE_TIME_PATTERNS[keyword].fullmatch(text) else ""


#: The SR's decision for an input the model's guard flagged, and the line a synthetic-only model adds.
INDETERMINATE = "indeterminate: input outside the model's training distribution"
SYNTHETIC_NOTICE = "trained on synthetic data only; not validated on real scans"


def structured_report(source: Any, record: dict[str, Any], bundle: Bundle):
    """The result of one instance as a ``highdicom.sr.ComprehensiveSR`` dataset."""
    evidence = evidence_of(source)
    # Deterministic UIDs: one SR series per source series and model, the same SR UID if redone.
    model = record["model"]["sha256"]
    image = hd.sr.ImageContentItem(
        name=Code("121112", "DCM", "Source of Measurement"),
        referenced_sop_class_uid=evidence.SOPClassUID,
        referenced_sop_instance_uid=evidence.SOPInstanceUID,
        relationship_type="INFERRED FROM",
    )
    scores = record["probabilities"]
    shown = [bundle.class_names[1]] if "probability" in record else list(scores)  # binary: the positive class
    shown = [name for name in shown if name in scores]  # none when the header ruled the input out
    label = record["label"] if record["label"] is not None else INDETERMINATE
    items = [
        hd.sr.CodeContentItem(
            name=Code("decision", SCHEME, f"{bundle.name} decision"),
            value=Code(label[:16], SCHEME, label),
            relationship_type="CONTAINS",
        )
    ]
    if not record.get("in_distribution", True):
        reasons = "; ".join(record.get("ood_reasons", []))
        items.append(
            hd.sr.TextContentItem(
                name=Code("ood", SCHEME, "Input outside the model's training distribution"),
                value=f"indeterminate: {reasons}"[:1024],
                relationship_type="CONTAINS",
            )
        )
    if bundle.synthetic_only:
        items.append(
            hd.sr.TextContentItem(
                name=Code("training-data", SCHEME, "Training data"),
                value=SYNTHETIC_NOTICE,
                relationship_type="CONTAINS",
            )
        )
    for class_name in shown:
        probability = hd.sr.NumContentItem(
            name=Code(f"p-{class_name}"[:16], SCHEME, f"Model probability of {class_name}"),
            value=round(float(scores[class_name]), 6),
            unit=Code("1", "UCUM", "no units"),
            relationship_type="CONTAINS",
        )
        probability.ContentSequence = [image]
        items.append(probability)
    items += [
        hd.sr.TextContentItem(
            name=Code("111001", "DCM", "Algorithm Name"), value=bundle.name, relationship_type="CONTAINS"
        ),
        hd.sr.TextContentItem(
            name=Code("111003", "DCM", "Algorithm Version"),
            value=f"{record['model']['role']} sha256:{model[:16]}",
            relationship_type="CONTAINS",
        ),
    ]
    root = hd.sr.ContainerContentItem(name=Code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=generate_uid(entropy_srcs=["edgedx-sr-series", evidence.SeriesInstanceUID, model]),
        series_number=9901,
        sop_instance_uid=generate_uid(entropy_srcs=["edgedx-sr", evidence.SOPInstanceUID, model]),
        instance_number=_instance_number(source),
        manufacturer="edgedx",
        is_complete=True,
    )


def _instance_number(source: Any) -> int:
    try:
        number = int(source.get("InstanceNumber", 1) or 1)
    except (TypeError, ValueError, OverflowError):
        return 1
    return number if 0 < number < 2**31 else 1


def report_bytes(source: Any, record: dict[str, Any], bundle: Bundle) -> bytes:
    """The SR encoded as a DICOM file; any failure of the SR library on odd source values is a ReportError."""
    try:
        report = structured_report(source, record, bundle)
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
    except ReportError:
        raise
    except Exception as exc:  # highdicom validates every value it copies; its errors are many and untyped
        raise ReportError(f"the SR library refused a source value ({type(exc).__name__}: {exc})") from None
    return buffer.getvalue()
