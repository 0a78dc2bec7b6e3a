"""The dataset every reader returns: labelled 2-D images in train/val/test splits, read lazily."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..preprocess import InputKind

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Augmentation:
    """What may change in a training image without changing its label."""

    hflip: bool = True  # a left-right flip (not for organ laterality classes)
    geometric: bool = True  # shift, rotate and zoom (not for images that are an organ's bounding box resized)


@dataclass(frozen=True)
class Split:
    """One split: ``ids[i]`` names image ``i`` (a file path or ``npz:key[i]``), ``labels[i]`` its class.

    Images are read on demand by ``read(i)``, which returns the raw 2-D image: HU for CT, grey
    levels otherwise, float32 or integer (H, W).
    """

    ids: tuple[str, ...]
    labels: np.ndarray  # (N,) class index, or (N, L) 0/1 per label for a multi-label dataset
    read: Callable[[int], np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise DataError(f"{len(self.ids)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def images(self) -> Iterator[np.ndarray]:
        return (self.read(i) for i in range(len(self)))


@dataclass(frozen=True)
class Dataset:
    """Labelled images from one source, split by patient where the source knows patients.

    Attributes:
        name: Short name (``headct-synth``, ``pneumoniamnist``, a folder name).
        source: Where it was read from.
        input: ``"hu"`` when images are CT in Hounsfield units, ``"intensity"`` for grey levels.
        class_names: Name of each class index; of each label for a multi-label dataset, whose
            splits have (N, L) 0/1 labels (the first label is the headline, e.g. ``any``).
        splits: ``train``, ``val`` and ``test``.
        augmentation: What training may change in an image without changing its label.
        default_size: Input size a model should use when the user gives none.
        synthetic: What made the data, when it is the embedded synthetic set: ``edgedx.data.synth``'s
            settings, recorded in manifests instead of a path so any machine can make it again.
        body_parts: Body Part Examined values the DICOM headers name (empty when they name none,
            or the images are not DICOM); the model's scope (:class:`edgedx.guard.Scope`).
    """

    name: str
    source: str
    input: InputKind
    class_names: tuple[str, ...]
    splits: dict[str, Split]
    augmentation: Augmentation = field(default_factory=Augmentation)
    default_size: int = 64
    body_parts: tuple[str, ...] = ()
    synthetic: dict[str, object] | None = None  # the generator's settings, for the embedded synthetic data

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits or len(self.splits[s]) == 0]
        if missing:
            raise DataError(f"{self.source}: split(s) {', '.join(missing)} are empty or missing")
        for name, split in self.splits.items():
            if self.multilabel:
                if split.labels.ndim != 2 or split.labels.shape[1] != self.num_classes:
                    raise DataError(f"{self.source}: {name} split has labels of shape {split.labels.shape}")
                continue
            bad = split.labels[(split.labels < 0) | (split.labels >= len(self.class_names))]
            if bad.size:
                raise DataError(
                    f"{self.source}: {name} split has label {bad[0]} outside "
                    f"0..{len(self.class_names) - 1} ({', '.join(self.class_names)})"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        return self.splits["train"].labels.ndim == 2

    @property
    def task(self) -> str:
        """``binary``, ``multiclass`` or ``multilabel`` (one sigmoid per label)."""
        return "multilabel" if self.multilabel else "binary" if self.num_classes == 2 else "multiclass"

    def counts(self, split: str) -> list[int]:
        """Images per class, or positives per label for a multi-label dataset."""
        labels = self.splits[split].labels
        if self.multilabel:
            return labels.sum(axis=0).astype(int).tolist()
        return np.bincount(labels, minlength=self.num_classes).tolist()

    def summary(self) -> dict[str, object]:
        """What a manifest records of the data (the synthetic set by its settings, not its path)."""
        origin: dict[str, object] = (
            {"source": "synthetic", "synthetic": self.synthetic} if self.synthetic else {"source": self.source}
        )
        return {
            "name": self.name,
            **origin,
            **({"labels": list(self.class_names)} if self.multilabel else {}),
            "input": self.input,
            "classes": list(self.class_names),
            "body_parts": list(self.body_parts),
            "splits": {
                s: {"images": len(sp), ("positives" if self.multilabel else "per_class"): self.counts(s)}
                for s, sp in self.splits.items()
            },
        }
