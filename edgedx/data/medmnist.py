"""MedMNIST ``.npz`` files (``train_images``, ``train_labels``, ``val_*``, ``test_*``)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, LabelError
from .dataset import SPLITS, Augmentation, Dataset, Split

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


@dataclass(frozen=True)
class Flavour:
    """What edgedx knows of a MedMNIST v2 flavour.

    Attributes:
        class_names: Name of each class index.
        augmentation: What training may change. The Organ flavours get no flip (left and right
            organs are classes) and no shift, rotation or zoom: each image is the organ's bounding
            box resized to the image, so the frame itself is the organ's extent and shape. On
            OrganAMNIST, training without them raised test accuracy from 0.917 to 0.947
            (``benchmarks/README.md``).
    """

    class_names: tuple[str, ...]
    augmentation: Augmentation = field(default_factory=Augmentation)


#: An organ's bounding box, resized: nothing may move or mirror it.
_ORGAN_CROP = Augmentation(hflip=False, geometric=False)

KNOWN_FLAVOURS: dict[str, Flavour] = {
    "pneumoniamnist": Flavour(("normal", "pneumonia")),
    "breastmnist": Flavour(("malignant", "normal-benign")),
    "organamnist": Flavour(ORGAN_CLASSES, _ORGAN_CROP),
    "organcmnist": Flavour(ORGAN_CLASSES, _ORGAN_CROP),
    "organsmnist": Flavour(ORGAN_CLASSES, _ORGAN_CROP),
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
    known = KNOWN_FLAVOURS.get(flavour) or Flavour(tuple(f"class-{i}" for i in range(num_classes)))
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
        class_names=known.class_names,
        splits=splits,
        augmentation=known.augmentation,
        default_size=side,
    )
