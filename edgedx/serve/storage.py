"""The daemon's disk: a durable spool of accepted inputs, no-clobber result files, a quarantine.

Crash safety rests on three rules:

- An input is *accepted* once its bytes are in ``spool/pending`` (written to a temporary file,
  fsynced, renamed in, directory fsynced). Only then is the sender told so (C-STORE success, or
  the file removed from the inbox).
- A result is published with ``link()`` from a fsynced temporary file, which fails if the result
  already exists: a result file is never written twice, whatever crashed when.
- A pending input is removed only after its result (or its quarantine record) is on disk. After
  ``kill -9`` the restart finds the input still pending, sees its result already there and just
  removes it: one accepted input, one result.

Instances are named by a hash of their SOP Instance UID (inputs too broken to have one, by a hash
of their bytes), never by anything that could identify a patient.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SOURCES = ("inbox", "cstore", "http")


def uid_key(uid: str) -> str:
    """The name logs, metrics and files use for a DICOM UID: 16 hex digits of its SHA-256."""
    return hashlib.sha256(uid.strip().encode()).hexdigest()[:16]


def content_key(data: bytes) -> str:
    """The name of an input with no readable SOP Instance UID: ``x`` + 15 hex digits of its bytes' SHA-256."""
    return "x" + hashlib.sha256(data).hexdigest()[:15]


def file_content_key(path: Path) -> str:
    """:func:`content_key` of a file's bytes, read in chunks (an unreadable file may be a huge one)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "x" + digest.hexdigest()[:15]


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(folder: Path, name: str) -> Path:
    return folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"


def _write_synced(path: Path, chunks: Iterable[bytes]) -> None:
    """Create ``path`` with the given byte chunks, fsynced; on any failure nothing is left behind.

    Every write goes through ``os`` calls (open, write, fsync, close), the operations a full or
    failing disk refuses; the tests inject ENOSPC and EIO at each of them.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _file_chunks(file: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(file, "rb") as f:
        yield from iter(lambda: f.read(size), b"")


def _replace_with(path: Path, chunks: Iterable[bytes]) -> None:
    """Put the chunks at ``path`` by a fsynced temporary file renamed over it; no temporary file survives a failure.

    The caller syncs the folder: what a failure of that sync means differs (see :meth:`Spool.accept`).
    """
    tmp = _temporary(path.parent, path.name)
    _write_synced(tmp, chunks)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(path: Path, chunks: Iterable[bytes]) -> bool:
    """Create ``path`` by a fsynced temporary file hard-linked into place; False if ``path`` existed."""
    tmp = _temporary(path.parent, path.name)
    _write_synced(tmp, chunks)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part (summaries)."""
    _replace_with(path, [data])
    fsync_dir(path.parent)


def publish_once(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` atomically unless it exists; False (nothing written) if it did."""
    if not _link_new(path, [data]):
        return False
    fsync_dir(path.parent)
    return True


def link_into(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target`` durably (no copy, however big); a link already there is kept.

    Across file systems (a ``--spool`` elsewhere) the file is copied instead, as durably.
    """
    try:
        os.link(source, target)
    except FileExistsError:  # linked before a crash
        pass
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _link_new(target, _file_chunks(source))
    fsync_dir(target.parent)


def is_writable(folder: Path) -> bool:
    """Whether a small file can be written and synced in ``folder`` now (a probe after a storage error)."""
    probe = _temporary(folder, "probe")
    try:
        _write_synced(probe, [b"edgedx storage probe\n"])
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True


def json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


class Spool:
    """Accepted inputs waiting for a result: ``ROOT/pending/<key>~<source>.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending = root / "pending"
        self.pending.mkdir(parents=True, exist_ok=True)
        for stale in self.pending.glob(".*.tmp"):  # a write a crash interrupted: never acknowledged
            stale.unlink(missing_ok=True)

    def accept(self, key: str, source: str, data: bytes) -> Path:
        """Put an input's bytes durably in the spool; from here on it is the daemon's to finish."""
        return self._accept(key, source, [data])

    def accept_file(self, key: str, source: str, file: Path) -> Path:
        """Copy a file into the spool durably (the inbox may be on another file system)."""
        return self._accept(key, source, _file_chunks(file))

    def _accept(self, key: str, source: str, chunks: Iterable[bytes]) -> Path:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}")
        path = self.pending / f"{key}~{source}.dcm"
        earlier = path.exists()  # the same instance sent again while its first copy waits: already accepted
        _replace_with(path, chunks)
        try:
            fsync_dir(self.pending)
        except BaseException:  # not durable, so not accepted: the sender is told so and sends again
            if not earlier:  # an earlier, acknowledged copy is never removed (its job is queued)
                path.unlink(missing_ok=True)
            raise
        return path

    def waiting(self) -> list[Path]:
        """Pending inputs, oldest first (what a restart must finish)."""
        files = [p for p in self.pending.glob("*~*.dcm")]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    @staticmethod
    def describe(path: Path) -> tuple[str, str]:
        """(key, source) of a pending file."""
        key, _, source = path.stem.partition("~")
        return key, source


def lock_folder(folder: Path):
    """Hold an exclusive lock on ``folder`` for this process's life; ConfigError if another has it."""
    import fcntl

    from ..errors import ConfigError

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")  # noqa: SIM115 (kept open: the lock lives as long as the file)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"{folder} is in use by another edgedx serve; give each daemon its own --out") from None
    return handle


class Outputs:
    """Where results go: ``OUT/series/<series>/{series.json, instances/<key>.json, <key>.sr.dcm}``
    and ``OUT/quarantine/<key>.dcm`` with ``<key>.json`` giving the reason.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.series_root = root / "series"
        self.quarantine = root / "quarantine"
        self.index = root / ".index"  # <instance key> -> its series key, one small file each
        for folder in (self.series_root, self.quarantine, self.index):
            folder.mkdir(parents=True, exist_ok=True)
        # Temporary files a crash left half-written: never published, safe to drop (the lock below
        # keeps a second daemon off this folder).
        for stale in [*root.glob("series/**/.*.tmp"), *self.quarantine.glob(".*.tmp"), *self.index.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        self._locks = [threading.Lock() for _ in range(64)]  # striped: bounded however many series come

    def instance_folder(self, series: str) -> Path:
        folder = self.series_root / series / "instances"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def instance_result(self, series: str, key: str) -> Path:
        return self.instance_folder(series) / f"{key}.json"

    def finished(self, key: str) -> Path | None:
        """The result or quarantine record an instance already has, if any (two lookups, no scan)."""
        record = self.quarantine / f"{key}.json"
        if record.exists():
            return record
        marker = self.index / key
        return self.instance_result(marker.read_text(), key) if marker.exists() else None

    def mark_done(self, key: str, series: str) -> None:
        """Record which series holds an instance's result, so :meth:`finished` need not search."""
        publish_once(self.index / key, series.encode())

    def series_lock(self, series: str) -> threading.Lock:
        return self._locks[int(series[:8], 16) % len(self._locks)]

    def quarantine_input(self, pending: Path, key: str, record: dict[str, Any]) -> bool:
        """Link a pending input into the quarantine, then publish its reason beside it; False if the reason was there.

        The input lands first and the reason last, and the caller removes the pending file after
        both: a crash anywhere in between leaves the pending input for the restart to finish, so a
        reason never stands without its input and no input is dropped. A hard link (the spool is
        under OUT too, and results are published with links already) copies nothing, however big.
        """
        link_into(pending, self.quarantine / f"{key}.dcm")
        return publish_once(self.quarantine / f"{key}.json", json_bytes(record))
