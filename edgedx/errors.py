"""The exceptions edgedx raises on purpose.

Every error a user can cause (bad input files, bad options, a damaged bundle, a missing optional
dependency) derives from :class:`EdgedxError`. The CLI prints such errors as one line,
``Type: message``, and exits non-zero; anything else is a bug and keeps its traceback.

::

    EdgedxError
    ├── ConfigError          an option or configuration value is invalid
    │   └── ModelNotFound    an unknown architecture name
    ├── DataError            input data cannot be used
    │   ├── DicomError       a file is not usable DICOM for this purpose
    │   └── LabelError       labels are missing, malformed or inconsistent
    ├── BundleError          a model bundle is missing, malformed or fails its checksums
    ├── ReportError          a DICOM SR cannot be made for an input (its result is published without)
    ├── CompressionRefused   a compressed model lost more accuracy than allowed; nothing was written
    └── DependencyError      an optional dependency is not installed
"""

from __future__ import annotations


class EdgedxError(Exception):
    """Base of every error edgedx raises on purpose; its message names the input and the fix."""


class ConfigError(EdgedxError):
    """An option or configuration value is invalid."""


class ModelNotFound(ConfigError):
    """An architecture name is not in the registry."""


class DataError(EdgedxError):
    """Input data cannot be used (missing, empty, wrong shape or type)."""


class DicomError(DataError):
    """A file is not usable DICOM for this purpose (not DICOM, no pixels, wrong modality, ...)."""


class LabelError(DataError):
    """Labels are missing, malformed or inconsistent with the images."""


class BundleError(EdgedxError):
    """A model bundle is missing, malformed, of an unknown version, or fails its checksums."""


class ReportError(EdgedxError):
    """A structured report cannot be made from an input's header; the result itself is still published."""


class CompressionRefused(EdgedxError):
    """A compressed model lost more validation accuracy than allowed; no output was written."""


class DependencyError(EdgedxError):
    """An optional dependency needed for this command is not installed."""
