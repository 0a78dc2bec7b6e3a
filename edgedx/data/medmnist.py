"""MedMNIST ``.npz`` files (``train_images``, ``train_labels``, ``val_*``, ``test_*``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError, LabelError
from .dataset import SPLITS, Dataset, Split

#: The 11 organs of OrganAMNIST, OrganCMNIST and OrganSMNIST (MedMNIST v2), in label order.
ORGAN_CLASSES = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

#: Class names of MedMNIST v2 flavours, and whether a left-right flip keeps the label.
KNOWN_FLAVOURS: dict[str, tuple[tuple[str, ...], bool]] = {
    "pneumoniamnist": (("normal", "pneumonia"), True),
    "breastmnist": (("malignant", "normal-benign"), True),
    "organamnist": (ORGAN_CLASSES, False),
    "organcmnist": (ORGAN_CLASSES, False),
    "organsmnist": (ORGAN_CLASSES, False),
}


def read_medmnist(path: Path | str) -> Dataset:
    """Read a greyscale, single-label MedMNIST ``.npz`` with its official splits.

    Class names come from the flavour (the file name, e.g. ``pneumoniamnist.npz``); unknown
    flavours get ``class-0``, ``class-1``, ... and allow flips.
    """
    path = Path(path)
    try:
        arrays = np.load(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path.name}: not a readable .npz archive ({exc})") from None
    with arrays:
        needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
        missing = [k for k in needed if k not in arrays.files]
        if missing:
            raise DataError(
                f"{path.name}: missing array(s) {', '.join(missing)}; a MedMNIST .npz has {', '.join(needed)}"
            )
        data = {k: arrays[k] for k in needed}
    num_classes = 0
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if images.ndim != 3:
            raise DataError(
                f"{path.name}: {split}_images has shape {images.shape}; expected greyscale "
                "(N, H, W) (colour MedMNIST flavours are not supported)"
            )
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise LabelError(
                f"{path.name}: {split}_labels has shape {labels.shape}; multi-label "
                "MedMNIST flavours are not supported (expected (N, 1))"
            )
        if len(labels) != len(images):
            raise LabelError(f"{path.name}: {len(images)} {split} images but {len(labels)} labels")
        num_classes = max(num_classes, int(labels.max()) + 1)

    flavour = path.stem.split("_")[0].lower()
    class_names, hflip_ok = KNOWN_FLAVOURS.get(flavour, (tuple(f"class-{i}" for i in range(num_classes)), True))
    splits = {}
    for split in SPLITS:
        images = data[f"{split}_images"]
        splits[split] = Split(
            ids=tuple(f"{path.name}:{split}[{i}]" for i in range(len(images))),
            labels=data[f"{split}_labels"].reshape(-1).astype(np.int64),
            read=lambda i, im=images: im[i],
        )
    side = int(data["train_images"].shape[1])
    return Dataset(
        name=flavour,
        source=str(path),
        input="intensity",
        class_names=class_names,
        splits=splits,
        hflip_ok=hflip_ok,
        default_size=side,
    )
