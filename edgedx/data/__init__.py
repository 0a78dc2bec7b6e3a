"""Data in: DICOM study folders, MedMNIST ``.npz``, image folders, and the embedded synthetic head CT.

TensorFlow-free. :func:`load_dataset` picks the reader from what the path holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import DataError
from .cache import CachedInputs, CachedSplit, cache_root, cache_split, input_batches
from .dataset import SPLITS, Augmentation, Dataset, Split
from .dicom import RSNA_LABELS, image_from_dataset, read_dataset, read_image, read_study_folder
from .folder import read_image_folder
from .medmnist import read_medmnist
from .synth import GENERATOR_VERSION, SynthConfig, config_from_record, synthesize

__all__ = [
    "RSNA_LABELS",
    "SPLITS",
    "Augmentation",
    "CachedInputs",
    "CachedSplit",
    "Dataset",
    "Split",
    "SynthConfig",
    "cache_root",
    "cache_split",
    "default_dataset",
    "default_dataset_dir",
    "image_from_dataset",
    "input_batches",
    "load_dataset",
    "read_dataset",
    "read_image",
    "read_image_folder",
    "read_medmnist",
    "read_study_folder",
    "recorded_dataset",
    "synthesize",
]

#: The embedded default: what ``edgedx train`` uses when no ``--data`` is given.
DEFAULT_SYNTH = SynthConfig()


def load_dataset(path: Path | str, *, labels: Sequence[str] | None = None) -> Dataset:
    """Read a dataset, choosing the reader from the path.

    - a ``.npz`` file: MedMNIST;
    - a folder with ``labels.csv``: DICOM slices labelled in the RSNA layout (the synthetic
      head-CT data is such a folder); ``labels`` names the columns to learn (default ``any``;
      several make a multi-label dataset, e.g. :data:`RSNA_LABELS`);
    - any other folder: an image folder with a sub-folder per class.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if labels:
            raise DataError(f"{path.name}: choosing label columns needs a folder with labels.csv (the RSNA layout)")
        if path.suffix.lower() == ".npz":
            return read_medmnist(path)
        raise DataError(
            f"{path.name}: a data file must be a MedMNIST .npz; for DICOM give the folder that "
            "holds the slices and labels.csv"
        )
    if (path / "labels.csv").is_file():
        return read_study_folder(path, target=tuple(labels or ("any",)))
    if labels:
        raise DataError(f"{path}: choosing label columns needs a folder with labels.csv (the RSNA layout)")
    return read_image_folder(path)


def default_dataset_dir(config: SynthConfig = DEFAULT_SYNTH) -> Path:
    """Where synthetic data made with ``config`` is cached: ``$EDGEDX_HOME`` or ``~/.cache/edgedx``."""
    home = os.environ.get("EDGEDX_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgedx"
    c = config
    split = "" if c.split == DEFAULT_SYNTH.split else "-split" + "-".join(f"{f:g}" for f in c.split)
    scanner = "-scanner" if c.scanner else ""
    name = f"headct-synth-v{GENERATOR_VERSION}-{c.studies}x{c.slices}-seed{c.seed}-{c.difficulty}{split}{scanner}"
    return Path(home) / name


def default_dataset(
    progress: Callable[[int, int], None] | None = None,
    config: SynthConfig = DEFAULT_SYNTH,
    labels: Sequence[str] | None = None,
) -> Dataset:
    """The embedded synthetic head-CT dataset (or another synthetic ``config``), made on first use."""
    folder = default_dataset_dir(config)
    if not (folder / "labels.csv").is_file():
        synthesize(folder, config, progress=progress)
    return read_study_folder(folder, target=tuple(labels or ("any",)))


def recorded_dataset(
    record: dict, data: Path | str | None = None, progress: Callable[[int, int], None] | None = None
) -> Dataset:
    """The data a bundle was trained on (its manifest's ``data`` section), or ``data`` when given.

    Synthetic data is recorded by its settings and made again here if it is not cached; any other
    data by the path it was read from, which has to exist on this machine.
    """
    labels = record.get("labels")  # the label columns a multi-label dataset was read with
    if data is not None:
        return load_dataset(data, labels=labels)
    settings = record.get("synthetic")
    if settings:
        version = settings.get("generator_version")
        if version != GENERATOR_VERSION:
            raise DataError(
                f"the bundle was trained on synthetic data of generator version {version}; this edgedx makes "
                f"version {GENERATOR_VERSION}. Give the data with --data"
            )
        return default_dataset(progress, config_from_record(settings), labels)
    source = record.get("source")
    if not source or not Path(source).exists():
        raise DataError(
            f"the bundle was trained on {record.get('name', 'data')} from {source or 'an unrecorded place'}, "
            "which is not on this machine; give the data with --data"
        )
    return load_dataset(source, labels=labels)
