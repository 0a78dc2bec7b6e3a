"""A DICOM Comprehensive SR per instance result (highdicom), referencing the source image.

The SR is what a PACS files next to the study, so it carries the source's patient and study
modules like any SR (highdicom copies them from the evidence); logs and metrics never do.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ..bundle import Bundle

#: Local coding scheme for the model's own concepts (DICOM PS3.16 8.2 allows "99" private schemes).
SCHEME = "99EDGEDX"


def structured_report(source: Any, record: dict[str, Any], bundle: Bundle):
    """The result of one instance as a ``highdicom.sr.ComprehensiveSR`` dataset."""

    # Deterministic UIDs: one SR series per source series and model, the same SR UID if redone.
    model = record["model"]["sha256"]

    decision_name = Code("decision", SCHEME, f"{bundle.name} decision")
    image = hd.sr.ImageContentItem(
        name=Code("121112", "DCM", "Source of Measurement"),
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type="INFERRED FROM",
    )
    probability = hd.sr.NumContentItem(
        name=Code("probability", SCHEME, f"Model probability of {bundle.class_names[1]}"),
        value=round(float(record["probability"]), 6),
        unit=Code("1", "UCUM", "no units"),
        relationship_type="CONTAINS",
    )
    probability.ContentSequence = [image]
    decision = hd.sr.CodeContentItem(
        name=decision_name,
        value=Code(record["label"], SCHEME, record["label"]),
        relationship_type="CONTAINS",
    )
    algorithm = hd.sr.TextContentItem(
        name=Code("111001", "DCM", "Algorithm Name"), value=bundle.name, relationship_type="CONTAINS"
    )
    version = hd.sr.TextContentItem(
        name=Code("111003", "DCM", "Algorithm Version"),
        value=f"{record['model']['role']} sha256:{record['model']['sha256'][:16]}",
        relationship_type="CONTAINS",
    )
    root = hd.sr.ContainerContentItem(name=Code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = [decision, probability, algorithm, version]
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=generate_uid(entropy_srcs=["edgedx-sr-series", source.SeriesInstanceUID, model]),
        series_number=9901,
        sop_instance_uid=generate_uid(entropy_srcs=["edgedx-sr", source.SOPInstanceUID, model]),
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer="edgedx",
        is_complete=True,
    )
