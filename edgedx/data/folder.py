"""Image folders: one sub-folder per class, optionally inside ``train/``, ``val/`` and ``test/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError, DependencyError
from .dataset import SPLITS, Dataset, Split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _read_grey(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DependencyError("reading image folders needs Pillow: pip install 'edgedx[train]'") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path.name}: not a readable image ({exc})") from None


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = {
        d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    return {name: files for name, files in classes.items() if files}


def read_image_folder(folder: Path | str, *, seed: int = 0) -> Dataset:
    """Read ``folder/<class>/*.png`` (or ``folder/<split>/<class>/*``) as greyscale images.

    Without split sub-folders, each class is shuffled with ``seed`` and cut 70/15/15. Class
    indices follow the sorted class-folder names.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    if all((folder / s).is_dir() for s in SPLITS):
        per_split = {s: _class_files(folder / s) for s in SPLITS}
        class_names = tuple(sorted(set().union(*per_split.values())))
    else:
        files = _class_files(folder)
        class_names = tuple(sorted(files))
        rng = np.random.default_rng(seed)
        per_split = {s: {} for s in SPLITS}
        for name, paths in files.items():
            order = [paths[i] for i in rng.permutation(len(paths))]
            n_val = n_test = max(1, round(0.15 * len(order))) if len(order) >= 3 else 0
            per_split["test"][name] = order[:n_test]
            per_split["val"][name] = order[n_test : n_test + n_val]
            per_split["train"][name] = order[n_test + n_val :]
    if len(class_names) < 2:
        raise DataError(
            f"{folder}: found {len(class_names)} class folder(s) with images "
            f"({', '.join(class_names) or 'none'}); need at least 2, e.g. {folder}/normal/*.png"
        )
    splits = {}
    for split, classes in per_split.items():
        pairs = [(p, class_names.index(c)) for c, paths in classes.items() for p in paths]
        paths = [p for p, _ in pairs]
        splits[split] = Split(
            ids=tuple(str(p.relative_to(folder)) for p in paths),
            labels=np.asarray([c for _, c in pairs], np.int64),
            read=lambda i, ps=paths: _read_grey(ps[i]),
        )
    first = _read_grey(folder / splits["train"].ids[0]) if len(splits["train"]) else np.zeros((64, 64))
    return Dataset(
        name=folder.name,
        source=str(folder),
        input="intensity",
        class_names=class_names,
        splits=splits,
        default_size=min(128, max(first.shape)),
    )
