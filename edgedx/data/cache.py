"""The preprocessed cache: each split scaled once, in parallel, into shards on disk.

Training, compression and benchmarking read model inputs from here instead of holding a split in
memory, so peak memory does not grow with the data set: a split is a list of ``.npy`` shards of
at most :data:`SHARD_BYTES`, read one at a time and normalised on read.

A cache entry is keyed by the preprocessing (without its normalisation, which is applied on read),
the split's image ids and the size and modification time of every file behind them, so changed
files make a new entry. An entry is built in a scratch folder and renamed into place when complete:
an interrupted build leaves nothing that a later run would read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..preprocess import PreprocessSpec, scale_and_resize
from .dataset import Dataset, Split

#: Bumped when the layout or the scaling of cached inputs changes.
CACHE_VERSION = 1
#: Largest shard; peak memory of a reader is a few shards, whatever the split's size.
SHARD_BYTES = 16 * 2**20
_COMPLETE = "meta.json"
#: Names how a split's fingerprint is made: SHA-256 over the SHA-256 of each raw image, then the labels.
FINGERPRINT_SCHEME = "sha256-of-images:"


def cache_root() -> Path:
    """``$EDGEDX_CACHE``, else ``prepared/`` under ``$EDGEDX_HOME`` or ``~/.cache/edgedx``."""
    if os.environ.get("EDGEDX_CACHE"):
        return Path(os.environ["EDGEDX_CACHE"])
    home = os.environ.get("EDGEDX_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgedx"
    return Path(home) / "prepared"


@dataclass(frozen=True)
class CachedInputs:
    """A split's model inputs in shards on disk, normalised with ``mean``/``std`` as they are read.

    Behaves as a read-only array of shape (N, S, S, C) where code needs one: ``len``, ``shape``,
    indexing with a slice or index array (reads only the shards involved) and ``np.asarray``
    (reads everything: for small data and tests).
    """

    shard_files: tuple[Path, ...]
    shard_sizes: tuple[int, ...]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    @property
    def ndim(self) -> int:
        return 4

    def normalised(self, mean: Sequence[float], std: Sequence[float]) -> CachedInputs:
        return CachedInputs(self.shard_files, self.shard_sizes, self.image_shape, tuple(mean), tuple(std))

    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` as float32 (n, S, S, C), normalised in place (no temporary copies)."""
        x = np.load(self.shard_files[index])
        if self.mean:
            x -= np.asarray(self.mean, np.float32)
            x /= np.asarray(self.std, np.float32)
        return x

    def shards(self) -> Iterator[np.ndarray]:
        return (self.shard(i) for i in range(len(self.shard_files)))

    def _positions(self, key) -> np.ndarray:
        """The rows ``key`` selects, as numpy would, without an index array the size of the split."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(*key.indices(n))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"a boolean index of shape {index.shape} for {n} inputs")
            return np.flatnonzero(index)
        if not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"cached inputs take integers, slices or boolean masks, not {index.dtype}")
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"index out of range for {n} inputs")
        return np.where(index < 0, index + n, index)

    def __getitem__(self, key) -> np.ndarray:
        indices = self._positions(key)
        if indices.ndim == 0:
            return self[indices[None]][0]
        starts = np.cumsum((0, *self.shard_sizes))
        owner = np.searchsorted(starts, indices, side="right") - 1
        out = np.empty((len(indices), *self.image_shape), np.float32)
        for shard in np.unique(owner):
            rows = owner == shard
            out[rows] = self.shard(int(shard))[indices[rows] - starts[shard]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(list(self.shards())) if self.shard_files else np.empty((0, *self.image_shape))
        return whole.astype(dtype or np.float32, copy=False)


def input_batches(x: np.ndarray | CachedInputs, size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of at most ``size`` inputs, from an array or from the cache."""
    if isinstance(x, CachedInputs):
        for shard in x.shards():
            yield from (shard[i : i + size] for i in range(0, len(shard), size))
    else:
        yield from (x[i : i + size] for i in range(0, len(x), size))


@dataclass(frozen=True)
class CachedSplit:
    """A split scaled to [0, 1] by a spec (not yet normalised), its labels and its fingerprint."""

    inputs: CachedInputs
    y: np.ndarray
    fingerprint: str  # SHA-256 of the per-image SHA-256s of the raw images, then of the labels


def _fingerprint(image_digests: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(image_digests).tobytes())
    digest.update(labels.astype(np.int64).tobytes())
    return FINGERPRINT_SCHEME + digest.hexdigest()


def same_data(fingerprint: str, recorded: str | None) -> bool | None:
    """Whether a split's fingerprint matches one a manifest recorded; None when the manifest's is
    of the scheme before this one (a bare SHA-256 of all raw images, made before the cache)."""
    if not recorded or not recorded.startswith(FINGERPRINT_SCHEME):
        return None
    return fingerprint == recorded


def cache_key(split: Split, spec: PreprocessSpec, source: str) -> str:
    """Names a cache entry: what decides the pixels of the cached inputs, and nothing else.

    That is the scaling (the spec without its normalisation), every image id, and the size and
    modification time of the source and of each file an id names, hashed one at a time (a list of
    750,000 paths would cost hundreds of MB to serialise whole).
    """
    digest = hashlib.sha256(f"{CACHE_VERSION}\n".encode())
    digest.update(json.dumps(spec.with_normalization((), ()).to_dict(), sort_keys=True, default=str).encode())
    for path in (source, *split.ids):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:  # "npz:..." ids, or an in-memory source
            stamp = "-"
        digest.update(f"\n{path}\t{stamp}".encode())
    return digest.hexdigest()[:32]


def _scale_range(split: Split, spec: PreprocessSpec, start: int, stop: int, out: Path) -> np.ndarray:
    """Scale images ``start:stop`` into the shard file ``out``; returns their raw images' SHA-256s (n, 32)."""
    x = np.empty((stop - start, spec.size, spec.size, spec.channels), np.float32)
    digests = np.empty((stop - start, 32), np.uint8)
    for row, i in enumerate(range(start, stop)):
        image = split.read(i)
        digests[row] = np.frombuffer(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest(), np.uint8)
        x[row] = scale_and_resize(image, spec)
    np.save(out, x)
    return digests


# -- worker processes: forked, each holds the split it was forked with and scales whole shards -----

_forked_split: Split | None = None


def _hold_split(split: Split) -> None:
    global _forked_split
    _forked_split = split


def _scale_shard_in_worker(start: int, stop: int, spec: PreprocessSpec, out: str) -> np.ndarray:
    assert _forked_split is not None
    return _scale_range(_forked_split, spec, start, stop, Path(out))


def _scratch_name(key: str) -> str:
    return f"{key}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_partials(root: Path, key: str) -> None:
    """Remove scratch folders of builders on this host that have died; another host's (a shared
    volume) are left alone, as their process cannot be checked from here."""
    for partial in root.glob(f"{key}.partial-*"):
        host, _, pid = partial.name.removeprefix(f"{key}.partial-").rpartition("-")[0].rpartition("-")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_entry(folder: Path, labels: np.ndarray) -> CachedSplit:
    meta = json.loads((folder / _COMPLETE).read_text())
    inputs = CachedInputs(
        shard_files=tuple(folder / name for name in meta["shards"]),
        shard_sizes=tuple(meta["sizes"]),
        image_shape=tuple(meta["image_shape"]),
    )
    digests = np.load(folder / "digests.npy")
    if len(digests) != len(labels):
        raise DataError(f"{folder}: the cache holds {len(digests)} images but the split has {len(labels)}; remove it")
    return CachedSplit(inputs=inputs, y=labels.astype(np.int64), fingerprint=_fingerprint(digests, labels))


def cache_split(
    dataset: Dataset,
    split_name: str,
    spec: PreprocessSpec,
    *,
    root: Path | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CachedSplit:
    """The split ``split_name`` of ``dataset`` scaled by ``spec``, from the cache or built into it.

    Args:
        root: The cache folder (default :func:`cache_root`).
        workers: Processes that scale shards (default: every core); 1 scales in this process.
        progress: ``progress(done, total)`` in images, as shards complete.
    """
    split = dataset.splits[split_name]
    root = Path(root) if root is not None else cache_root()
    key = cache_key(split, spec, dataset.source)
    folder = root / key
    if (folder / _COMPLETE).is_file():
        if progress:
            progress(len(split), len(split))
        return _open_entry(folder, split.labels)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, key)
    scratch = root / _scratch_name(key)
    scratch.mkdir()
    try:
        per_shard = max(1, SHARD_BYTES // (spec.size * spec.size * spec.channels * 4))
        ranges = [(start, min(start + per_shard, len(split))) for start in range(0, len(split), per_shard)]
        names = [f"shard-{i:05d}.npy" for i in range(len(ranges))]
        digests = _scale_shards(split, spec, ranges, [scratch / n for n in names], workers, progress)
        np.save(scratch / "digests.npy", np.concatenate(digests) if digests else np.empty((0, 32), np.uint8))
        meta = {
            "version": CACHE_VERSION,
            "source": dataset.source,
            "split": split_name,
            "spec": spec.with_normalization((), ()).to_dict(),
            "shards": names,
            "sizes": [b - a for a, b in ranges],
            "image_shape": [spec.size, spec.size, spec.channels],
        }
        (scratch / _COMPLETE).write_text(json.dumps(meta, indent=1))
        try:
            scratch.rename(folder)
        except OSError:  # another process completed the same entry first: use theirs
            if not (folder / _COMPLETE).is_file():
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return _open_entry(folder, split.labels)


def _scale_shards(
    split: Split,
    spec: PreprocessSpec,
    ranges: list[tuple[int, int]],
    files: list[Path],
    workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> list[np.ndarray]:
    workers = min(workers or os.cpu_count() or 1, len(ranges))
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            shards = zip(ranges, files, strict=True)
            digests = (_scale_range(split, spec, start, stop, out) for (start, stop), out in shards)
        else:
            # Forked, so the workers inherit the split however it reads its images (a closure over
            # an in-memory array included) and import nothing again; they run numpy and pydicom
            # only, never TensorFlow, whose threads a fork does not copy.
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, get_context("fork"), initializer=_hold_split, initargs=(split,))
            )
            futures = [
                pool.submit(_scale_shard_in_worker, start, stop, spec, str(out))
                for (start, stop), out in zip(ranges, files, strict=True)
            ]
            digests = (future.result() for future in futures)
        done, scaled = 0, []
        for start, stop in ranges:
            try:
                scaled.append(next(digests))
            except BrokenProcessPool:
                raise DataError(
                    f"a process scaling images {split.ids[start]} .. {split.ids[stop - 1]} ended abruptly "
                    "(out of memory, or a decoder crash on one of them); nothing was cached"
                ) from None
            done += stop - start
            if progress:
                progress(done, len(split))
        return scaled
