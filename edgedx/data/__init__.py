"""Data in: DICOM study folders, MedMNIST ``.npz``, image folders, and the embedded synthetic head CT.

TensorFlow-free. :func:`load_dataset` picks the reader from what the path holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from .dataset import SPLITS, Dataset, PreparedSplit, Split, prepare_split
from .dicom import image_from_dataset, read_dataset, read_image, read_study_folder
from .folder import read_image_folder
from .medmnist import read_medmnist
from .synth import GENERATOR_VERSION, SynthConfig, synthesize

__all__ = [
    "SPLITS",
    "Dataset",
    "PreparedSplit",
    "Split",
    "SynthConfig",
    "default_dataset",
    "default_dataset_dir",
    "image_from_dataset",
    "load_dataset",
    "prepare_split",
    "read_dataset",
    "read_image",
    "read_image_folder",
    "read_medmnist",
    "read_study_folder",
    "synthesize",
]

#: The embedded default: what ``edgedx train`` uses when no ``--data`` is given.
DEFAULT_SYNTH = SynthConfig()


def load_dataset(path: Path | str) -> Dataset:
    """Read a dataset, choosing the reader from the path.

    - a ``.npz`` file: MedMNIST;
    - a folder with ``labels.csv``: DICOM slices labelled in the RSNA layout (the synthetic
      head-CT data is such a folder);
    - any other folder: an image folder with a sub-folder per class.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return read_medmnist(path)
        raise DataError(
            f"{path.name}: a data file must be a MedMNIST .npz; for DICOM give the folder that "
            "holds the slices and labels.csv"
        )
    if (path / "labels.csv").is_file():
        return read_study_folder(path)
    return read_image_folder(path)


def default_dataset_dir() -> Path:
    """Where the embedded default dataset is generated: ``$EDGEDX_HOME`` or ``~/.cache/edgedx``."""
    home = os.environ.get("EDGEDX_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgedx"
    c = DEFAULT_SYNTH
    return Path(home) / f"headct-synth-v{GENERATOR_VERSION}-{c.studies}x{c.slices}-seed{c.seed}-{c.difficulty}"


def default_dataset(progress: Callable[[int, int], None] | None = None) -> Dataset:
    """The embedded synthetic head-CT dataset, generated on first use (no download)."""
    folder = default_dataset_dir()
    if not (folder / "labels.csv").is_file():
        synthesize(folder, DEFAULT_SYNTH, progress=progress)
    return read_study_folder(folder)
