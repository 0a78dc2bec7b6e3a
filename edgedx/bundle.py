"""Model bundles: a folder with the model file(s), ``manifest.json`` and the training history.

A bundle is self-describing: the manifest says how to preprocess an input
(:class:`~edgedx.preprocess.PreprocessSpec`), what the outputs mean, the decision threshold, the
metrics measured on validation and test data, and the SHA-256 of every file, so the runtime
needs nothing but the folder. Standard library and numpy only (TensorFlow-free).

Manifest, format version 1 (keys the runtime relies on)::

    format: "edgedx-bundle", format_version: 1, edgedx_version
    models: {role: {file, sha256, bytes, ...}}   roles: "keras", later "tflite-float32", "tflite-int8", ...
    files: {name: sha256}                        every other file (history.json, ...)
    task: {kind: binary|multiclass|multilabel, class_names, output: logits, activation: sigmoid|softmax}
    input: {shape: [1, S, S, C], dtype}
    preprocess: PreprocessSpec.to_dict()
    threshold: {value, policy, target_sensitivity}
    metrics: {val: {...}, test: {...}}
    guard: InputGuard.summary() (optional; its arrays in guard.npz)   see edgedx.guard
    models[role].calibration: Calibration.to_dict() (optional)        see edgedx.calibration
    data.synthetic: SynthConfig fields, when trained on the embedded synthetic data (no path)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .calibration import Calibration
from .errors import BundleError
from .guard import InputGuard
from .preprocess import PreprocessSpec

FORMAT = "edgedx-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A model bundle on disk; build one with :func:`read_bundle` or :func:`write_bundle`."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocess"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["task"]["class_names"])

    @property
    def threshold(self) -> float | list[float] | None:
        """The decision threshold: one for binary models, one per label for multi-label, None for argmax."""
        return self.manifest.get("threshold", {}).get("value")

    def calibration(self, role: str) -> Calibration:
        """The calibration of the model with ``role`` (none recorded: identity)."""
        return Calibration.from_dict(self.manifest["models"].get(role, {}).get("calibration"))

    def load_guard(self) -> InputGuard | None:
        """The out-of-distribution guard, or None for a bundle made before guards existed."""
        summary = self.manifest.get("guard")
        if not summary:
            return None
        path = self.path / summary.get("file", "")
        if not path.is_file():
            raise BundleError(f"{self.path}: the guard file {summary.get('file')!r} is missing")
        return InputGuard.load(summary, path.read_bytes())

    @property
    def synthetic_only(self) -> bool:
        """Whether the model was trained on the embedded synthetic data alone."""
        return bool(self.manifest.get("data", {}).get("synthetic"))

    def model_path(self, role: str) -> Path:
        """Path of the model file with ``role`` (``keras``, ``tflite-int8``, ...)."""
        models = self.manifest["models"]
        if role not in models:
            raise BundleError(f"{self.path}: no {role!r} model; this bundle has {', '.join(models) or 'none'}")
        return self.path / models[role]["file"]

    def verify(self) -> None:
        """Check every listed file exists and matches its SHA-256; raise :class:`BundleError` if not."""
        expected = {rec["file"]: rec["sha256"] for rec in self.manifest["models"].values()}
        expected |= dict(self.manifest.get("files", {}))
        for name, sha in expected.items():
            path = self.path / name
            if not path.is_file():
                raise BundleError(f"{self.path}: {name} is listed in {MANIFEST} but missing")
            actual = sha256_file(path)
            if actual != sha:
                raise BundleError(
                    f"{self.path}: {name} fails its checksum (SHA-256 {actual[:12]}..., manifest "
                    f"says {sha[:12]}...); the file was changed or truncated, re-copy the bundle"
                )


def read_bundle(path: Path | str, *, verify: bool = True) -> Bundle:
    """Open a bundle folder, check its format version and (by default) every file's SHA-256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an edgedx bundle manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle format version {version}; this edgedx "
            f"({__version__}) reads version {FORMAT_VERSION}"
        )
    for key in ("models", "task", "input", "preprocess"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: missing {key!r}")
    bundle = Bundle(path=path, manifest=manifest)
    if verify:
        bundle.verify()
    return bundle


def write_bundle(
    out: Path | str,
    manifest: Mapping[str, Any],
    *,
    models: Mapping[str, Path],
    files: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle atomically: everything goes to a temporary folder that is renamed into place.

    Args:
        out: Bundle folder to create.
        manifest: Manifest body; ``format``, ``edgedx_version``, ``models`` and ``files`` are filled in.
        models: Role -> model file to copy in (a file, or a folder such as a SavedModel is refused).
        files: Extra file name -> bytes (written as they are) or JSON-serialisable content
            (``history.json``, ...).
        overwrite: Replace an existing bundle at ``out``; otherwise an existing ``out`` is an error.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_records = {}
        for role, src in models.items():
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"model file for {role!r} is missing: {src}")
            dest = staging / src.name
            shutil.copy2(src, dest)
            model_records[role] = {"file": dest.name, "sha256": sha256_file(dest), "bytes": dest.stat().st_size}
        file_records = {}
        for name, content in (files or {}).items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(json.dumps(content, indent=2) + "\n")
            file_records[name] = sha256_file(staging / name)
        described = manifest.get("models", {})  # per-role details, e.g. quantization parameters
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "edgedx_version": __version__,
            **{k: v for k, v in manifest.items() if k not in ("models", "files")},
            "models": {role: {**described.get(role, {}), **rec} for role, rec in model_records.items()},
            "files": file_records,
        }
        with open(staging / MANIFEST, "w") as f:
            f.write(json.dumps(body, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(path=out, manifest=body)
