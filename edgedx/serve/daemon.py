"""The scanner-side daemon: accepted inputs -> a bounded queue -> runtime workers -> results on disk.

Inputs arrive from the inbox watcher, the DICOM C-STORE SCP and the HTTP API. Inbox and C-STORE
inputs are spooled to disk before they are acknowledged; HTTP requests are answered in the
response. Every input takes a slot of a fixed capacity until it is finished, so the backlog held
in memory never exceeds ``queue_size`` (a full daemon answers 503 or C-STORE 0xA700, and leaves
inbox files where they are).

This module imports no TensorFlow: only the runtime, pydicom, numpy and highdicom.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import io
import ipaddress
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.pixels  # noqa: F401  (decoders: imported once here, not by two workers at a time)

from ..bundle import MANIFEST, Bundle
from ..data.dicom import MAX_SIDE, header_int, read_dataset
from ..devices import load_profile, pin_process, unavailable_cpus
from ..errors import ConfigError, DataError, DicomError, ReportError
from ..outputs import decisions
from ..runtime import Model, Prediction
from .forward import Destination, Forwarder, Outbox
from .metrics import Metrics
from .report import report_bytes
from .storage import (
    Outputs,
    Spool,
    content_key,
    is_writable,
    json_bytes,
    lock_folder,
    publish_once,
    replace_atomically,
    uid_key,
)
from .tls import TlsFiles

#: Series whose instance records stay in memory for the series result; older ones are re-read.
SERIES_CACHE = 64

log = logging.getLogger("edgedx.serve")
logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module per report
# pydicom logs a traceback for every decoder that fails on a hostile file, and quotes header values
# (dates, names) when it meets non-conformant ones: the daemon reports both in its own PHI-free words.
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

#: Tags whose values identify a patient; scrubbed from any reason text that could carry them.
IDENTIFYING_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What ``edgedx serve`` listens to, where it writes, and its limits."""

    out: Path
    bundle: Path | None = None  # None: the shipped default (see :func:`default_bundle`)
    inbox: Path | None = None
    spool: Path | None = None  # None: OUT/.spool
    host: str = "127.0.0.1"
    dicom_port: int | None = None
    ae_title: str = "EDGEDX"
    allow_ae: tuple[str, ...] = ()
    max_associations: int = 4
    http_port: int | None = None
    token: str | None = None
    workers: int = 2
    threads: int = 1  # interpreter threads per worker
    cpu_affinity: tuple[int, ...] = ()  # CPUs the daemon runs on; () for any
    queue_size: int = 64
    max_file_mb: float = 64.0
    min_side: int = 32
    stable_seconds: float = 1.0
    poll_seconds: float = 0.2
    drain_seconds: float = 30.0
    structured_reports: bool = True
    min_free_mb: float = 256.0  # below this on --out, new inputs are refused (C-STORE 0xA700, HTTP 507)
    tls: TlsFiles | None = None  # DICOM TLS and HTTPS on both ports
    forward_to: Destination | None = None  # every SR is C-STOREd there from a durable outbox

    def __post_init__(self) -> None:
        if self.inbox is None and self.dicom_port is None and self.http_port is None:
            raise ConfigError("nothing to listen to: give --inbox DIR, --dicom-port P and/or --http-port P")
        for name in ("dicom_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0..65535, got {port}")
        if not is_loopback(self.host):
            if self.http_port is not None and not self.token:
                raise ConfigError(
                    f"HTTP on {self.host} would be open to the network: set a bearer token "
                    "(EDGEDX_TOKEN or --token-file), or bind 127.0.0.1"
                )
            if self.dicom_port is not None and not self.allow_ae:
                raise ConfigError(
                    f"DICOM on {self.host} would take images from any AE title: give --allow-ae, or bind 127.0.0.1"
                )
        if not 1 <= len(self.ae_title) <= 16:
            raise ConfigError(f"an AE title has 1 to 16 characters, got {self.ae_title!r}")
        if self.forward_to is not None and not self.structured_reports:
            raise ConfigError("--forward-to sends the SRs, and --no-sr makes none")
        if self.min_free_mb < 0:
            raise ConfigError(f"--min-free-mb must be >= 0, got {self.min_free_mb}")
        for name in ("workers", "threads", "queue_size", "max_associations", "min_side"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.inbox is not None and self.inbox.resolve() == self.out.resolve():
            raise ConfigError("--inbox and --out must be different folders")
        if any(cpu < 0 for cpu in self.cpu_affinity):
            raise ConfigError(f"CPU numbers are >= 0, got {list(self.cpu_affinity)}")

    @classmethod
    def on_device(cls, device: str | Path, **fields: Any) -> ServeConfig:
        """A config that runs the model as the device profile ``device`` says, the way ``edgedx bench``
        and ``compress --quantize auto`` measured it there: its workers, threads per worker and CPUs.
        ``fields`` are the other settings, and win over the profile's."""
        profile = load_profile(device)
        measured_as = {"workers": profile.workers, "threads": profile.threads, "cpu_affinity": profile.cpu_affinity}
        return cls(**measured_as | fields)


class Refused(Exception):
    """A new input was not accepted; ``reason`` is ``busy`` (every slot taken, or stopping: HTTP 503)
    or ``storage`` (space under the watermark, or writes failing: HTTP 507); C-STORE answers 0xA700 to both."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


#: Seconds between probe writes while storage is failing (readiness and new inputs wait for one to succeed).
PROBE_SECONDS = 1.0
#: Seconds before a spooled input whose outputs could not be written is tried again (doubling up to the last).
RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class Capacity:
    """A counter of accepted, unfinished inputs; acceptance fails when it reaches its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def force_acquire(self) -> None:
        """For inputs already accepted before a restart: they are on disk and must be finished."""
        with self._lock:
            self.used += 1

    def release(self) -> None:
        with self._lock:
            self.used -= 1


@dataclass
class _Job:
    source: str
    received: float  # time.monotonic()
    path: Path | None = None  # a spooled input
    payload: bytes | None = None  # an HTTP input, answered through ``future``
    future: concurrent.futures.Future | None = field(default=None, repr=False)
    attempts: int = 0  # failed attempts to write its outputs


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def redact(text: str, ds: Any) -> str:
    """``text`` with the values of identifying tags of ``ds`` (when readable) replaced."""
    if ds is None:
        return text
    for tag in IDENTIFYING_TAGS:
        try:
            value = ds.get(tag)
        except Exception:  # a broken element must not stop the scrubbing of the others
            continue
        for part in value if isinstance(value, (list, tuple)) else [value]:
            words = {str(part)} | set(str(part).replace("^", " ").split())
            for word in sorted((w for w in words if len(w) >= 3), key=len, reverse=True):
                text = text.replace(word, "[redacted]")
    return text


class Daemon:
    """The worker pool, the queue and the outputs; listeners feed it with :meth:`accept_spooled` and
    :meth:`submit`. Use :meth:`start` and :meth:`stop`, or :func:`edgedx.serve.run`.
    """

    def __init__(self, config: ServeConfig, bundle: Bundle) -> None:
        self.config = config
        self.bundle = bundle
        # refused before anything is pinned (a caller's process keeps its CPUs), and pinned before the
        # interpreters start their threads: those inherit it
        if missing := unavailable_cpus(config.cpu_affinity):
            usable = sorted(os.sched_getaffinity(0))
            raise ConfigError(f"CPUs {missing} do not exist here or are not ours (usable: {usable})")
        pin_process(config.cpu_affinity)
        self.models = [Model.load(bundle, threads=config.threads) for _ in range(config.workers)]
        model = self.models[0]
        self.role, self.threshold = model.role, model.threshold
        self.class_names = model.class_names
        # one threshold and two classes; a multi-label model has a list of thresholds, multi-class none
        self.binary = (
            model.threshold is not None and not isinstance(model.threshold, list) and len(model.class_names) == 2
        )
        self.model_record = {
            "name": bundle.name,
            "role": model.role,
            "sha256": bundle.model_record(model.role).sha256,
            "synthetic_only": bundle.synthetic_only,
        }
        self._lock = lock_folder(config.out)
        self.spool = Spool(config.spool or config.out / ".spool")
        self.outputs = Outputs(config.out)
        self.capacity = Capacity(config.queue_size)
        self.outbox = Outbox(config.out / ".outbox") if config.forward_to else None
        self.metrics = Metrics(
            lambda: self.capacity.used,
            bundle.name,
            model.role,
            model.backend,
            forward_backlog=(lambda: len(self.outbox)) if self.outbox is not None else None,
        )
        self.forwarder = (
            Forwarder(self.outbox, config.forward_to, ae_title=config.ae_title, metrics=self.metrics)
            if config.forward_to
            else None
        )
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.draining = False
        self.ready = False
        self.storage_fault: str | None = None  # the last write error, until a write succeeds again
        self._last_probe = 0.0
        self._workers: list[threading.Thread] = []
        # Instance records of recently active series; bounded, since a daemon runs for months.
        self._series_cache: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()
        self._series_guard = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> int:
        """Start the workers and queue what a previous run accepted but did not finish; returns that count."""
        for model in self.models:  # first calls are slow (interpreter, numpy's BLAS pool); make them now
            spec = model.spec
            blank = np.zeros((1, spec.size, spec.size, spec.channels), np.float32)
            model.predict_inputs(blank)
            model.ood_scores(blank)
        recovered = self.spool.waiting()
        for path in recovered:
            self.capacity.force_acquire()
            self.jobs.put(_Job(source=Spool.describe(path)[1], received=time.monotonic(), path=path))
        if self.forwarder is not None:
            self.forwarder.start()
        for index, model in enumerate(self.models):
            worker = threading.Thread(target=self._work, args=(model,), name=f"edgedx-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.ready = True
        if recovered:
            log.info("recovered %d accepted inputs from the spool", len(recovered))
        return len(recovered)

    def stop(self) -> bool:
        """Stop accepting, finish what is queued (up to ``drain_seconds``), stop the workers.

        Returns True if everything queued was finished; spooled inputs that were not stay on disk
        for the next start.
        """
        self.draining, self.ready = True, False
        for _ in self._workers:
            self.jobs.put(None)  # after everything already queued
        deadline = time.monotonic() + self.config.drain_seconds
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        drained = not any(w.is_alive() for w in self._workers)
        if self.forwarder is not None:  # what is not sent yet stays in the outbox for the next start
            self.forwarder.stop()
        self._lock.close()
        log.info("stopped: %s", "queue drained" if drained else "drain timed out; unfinished inputs stay spooled")
        return drained

    # -- intake ---------------------------------------------------------------------------------------
    def accept_spooled(self, path: Path, source: str) -> None:
        """Queue an input already spooled by a listener that holds a capacity slot for it."""
        self.jobs.put(_Job(source=source, received=time.monotonic(), path=path))
        log.info("accepted instance=%s source=%s", Spool.describe(path)[0], source)

    def storage_problem(self) -> str | None:
        """Why storage cannot take new inputs now (free space under the watermark, or writes failing), else None."""
        if self.storage_fault is not None:
            if time.monotonic() - self._last_probe < PROBE_SECONDS or not is_writable(self.outputs.root):
                self._last_probe = time.monotonic()
                return f"writes to {self.config.out} are failing ({self.storage_fault})"
            self.storage_fault = None
            log.info("storage writable again")
        free_mb = free_megabytes(self.config.out)
        if free_mb < self.config.min_free_mb:
            return f"{free_mb:.0f} MB free on {self.config.out}, under --min-free-mb {self.config.min_free_mb:g}"
        return None

    def reserve(self, source: str) -> None:
        """Take a slot for a new input.

        Raises:
            Refused: ``busy`` (every slot taken, or stopping) or ``storage`` (low or failing); counted.
        """
        if (problem := self.storage_problem()) is not None:
            self.metrics.count(source, "no-storage")
            raise Refused("storage", problem)
        if self.draining or not self.capacity.try_acquire():
            self.metrics.count(source, "busy")
            raise Refused("busy", "every slot is taken" if not self.draining else "the daemon is stopping")

    def submit(self, payload: bytes) -> concurrent.futures.Future:
        """An HTTP input: predicted in memory; the future gives the result record or raises DataError.

        Raises:
            Refused: the queue is full, the daemon is stopping, or storage is low.
        """
        self.reserve("http")
        job = _Job(source="http", received=time.monotonic(), payload=payload, future=concurrent.futures.Future())
        self.jobs.put(job)
        return job.future

    # -- work -----------------------------------------------------------------------------------------
    def _work(self, model: Model) -> None:
        while (job := self.jobs.get()) is not None:
            finished = True
            try:
                if job.path is not None:
                    self._finish_spooled(model, job)
                else:
                    self._answer(model, job)
            except OSError as exc:  # the disk: full, failing, read-only; the input stays spooled
                finished = not self._retry_later(job, exc)
            except Exception:  # a bug must not kill the worker; the input stays spooled for a restart
                log.exception("internal error on a %s input", job.source)
                self.metrics.count(job.source, "error")
            finally:
                if finished:
                    self.capacity.release()

    def storage_failed(self, exc: OSError) -> str:
        """Note a failed write: new inputs are refused until a probe write succeeds. Returns the reason."""
        reason = f"{exc.strerror or type(exc).__name__}" + (f" [errno {exc.errno}]" if exc.errno else "")
        self.storage_fault, self._last_probe = reason, time.monotonic()
        self.metrics.storage_errors.inc()
        return reason

    def _retry_later(self, job: _Job, exc: OSError) -> bool:
        """Queue a spooled input again after a back-off, keeping its slot; False for an HTTP input (answered now)."""
        reason = self.storage_failed(exc)
        if job.path is None:
            job.future.set_exception(exc)
            return False
        delay = RETRY_SECONDS[min(job.attempts, len(RETRY_SECONDS) - 1)]
        job.attempts += 1
        log.warning(
            "storage error on instance=%s (%s); it stays spooled, retry %d in %.1f s",
            Spool.describe(job.path)[0],
            reason,
            job.attempts,
            delay,
        )
        timer = threading.Timer(delay, self.jobs.put, args=(job,))
        timer.daemon = True
        timer.start()
        return True

    def _predict(self, model: Model, ds: Any, key: str) -> dict[str, Any]:
        """Check a dataset's size against this daemon's limits and run the model's one prediction path."""
        rows = header_int(ds, "Rows", key, default=0, low=0, high=0xFFFF)
        cols = header_int(ds, "Columns", key, default=0, low=0, high=0xFFFF)
        if 0 < min(rows, cols) < self.config.min_side:
            raise DicomError(f"{key}: image is {rows} x {cols}; expected at least {self.config.min_side} a side")
        return self._record(model.predict(ds, name=key))

    def _record(self, prediction: Prediction) -> dict[str, Any]:
        """A prediction as the JSON result: every class's probability, and ``probability`` for a binary model."""
        timings = prediction.timings_ms
        if "inference" in timings:  # not for an input its header ruled out
            self.metrics.inference.observe((timings.get("preprocess", 0.0) + timings["inference"]) / 1e3)
        record: dict[str, Any] = {
            "status": "classified" if prediction.in_distribution else "out_of_distribution",
            "in_distribution": prediction.in_distribution,
            "ood_score": prediction.ood_score,
            "ood_reasons": list(prediction.ood_reasons),
            "probabilities": prediction.scores(self.class_names),
            "decision": prediction.decision,
            "label": prediction.label,
            "threshold": prediction.threshold,
            "model": self.model_record,
            "timings_ms": dict(prediction.timings_ms),
        }
        if self.binary:
            p = prediction.probabilities
            record["probability"] = None if p is None else round(float(p), 6)
        elif isinstance(prediction.threshold, list):  # multi-label
            record["findings"] = list(prediction.findings)
        return record

    def _finish_spooled(self, model: Model, job: _Job) -> None:
        path, config = job.path, self.config
        key, source = Spool.describe(path)
        done = self.outputs.finished(key)
        if done is not None or not path.exists():
            # Sent twice, or a restart after the result was written: one result, already there.
            if done is not None and done.parent.name == "instances":  # the series may not count it yet
                self._update_series(done.parent.parent.name, json.loads(done.read_text()))
            path.unlink(missing_ok=True)
            self.metrics.count(source, "duplicate")
            log.info("duplicate instance=%s source=%s: result already published", key, source)
            return
        ds = None
        try:
            size = path.stat().st_size
            if size > config.max_file_mb * 1e6:
                raise DicomError(f"{key}: file is {size / 1e6:.1f} MB, over the {config.max_file_mb:g} MB limit")
            ds = read_dataset(path, name=key)
            record = self._predict(model, ds, key)
        except DicomError as exc:
            self._quarantine(path, key, source, redact(str(exc), ds))
            return
        uids = {name: str(ds.get(keyword, "") or "") for name, keyword in RESULT_UIDS.items()}
        series = uid_key(uids["series_instance_uid"] or key)
        record |= {"schema": "edgedx.instance-result/1", "instance": key, "series": series, "source": source}
        record |= uids | {"completed": _now()}
        report = self._report(ds, record, key) if config.structured_reports else None
        record["timings_ms"]["total"] = round((time.monotonic() - job.received) * 1e3, 3)
        folder = self.outputs.instance_folder(series)
        if report is not None:  # before the JSON: a published JSON means the instance is done
            publish_once(folder / f"{key}.sr.dcm", report)
            if self.outbox is not None:
                self.outbox.add(folder / f"{key}.sr.dcm")
                self.forwarder.notify()
        published = publish_once(folder / f"{key}.json", json_bytes(record))
        self.outputs.mark_done(key, series)
        self.storage_fault = None
        if not published:  # a restart after the result was written, before the index knew it
            self.metrics.count(source, "duplicate")
        else:
            self.metrics.processing.labels(source=source).observe(time.monotonic() - job.received)
            self.metrics.count(source, _outcome(record))
            log.info(
                "result instance=%s series=%s label=%s ms=%.1f sr=%s",
                key,
                series,
                record["label"] or record["status"],
                record["timings_ms"]["total"],
                "yes" if report is not None else "no",
            )
        if not published:  # the record the series must count is the one on disk
            record = json.loads((folder / f"{key}.json").read_text())
        self._update_series(series, record)
        path.unlink(missing_ok=True)

    def _report(self, ds: Any, record: dict[str, Any], key: str) -> bytes | None:
        """The SR's bytes, or None with the reason in ``record["structured_report"]``: an SR never costs the result."""
        try:
            report = report_bytes(ds, record, self.bundle)
        except ReportError as exc:
            reason = redact(str(exc), ds)
            record["structured_report"] = {"made": False, "reason": reason}
            self.metrics.reports_skipped.inc()
            log.warning("no SR for instance=%s: %s", key, reason)
            return None
        record["structured_report"] = {"made": True}
        return report

    def _quarantine(self, path: Path, key: str, source: str, reason: str) -> None:
        record = {"schema": "edgedx.quarantine/1", "instance": key, "source": source, "reason": reason}
        record["quarantined"] = _now()
        self.outputs.quarantine_input(path, key, record)
        path.unlink(missing_ok=True)
        self.storage_fault = None
        self.metrics.count(source, "quarantined")
        log.warning("quarantined instance=%s source=%s reason=%s", key, source, reason)

    def _update_series(self, series: str, record: dict[str, Any]) -> None:
        """Rewrite the series result from its instances (see :func:`series_summary`)."""
        with self.outputs.series_lock(series):
            with self._series_guard:
                instances = self._series_cache.get(series)
                if instances is not None:
                    self._series_cache.move_to_end(series)
            if instances is None:  # not seen lately: what earlier runs (or this one) published
                folder = self.outputs.instance_folder(series)
                instances = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
                with self._series_guard:
                    self._series_cache[series] = instances
                    while len(self._series_cache) > SERIES_CACHE:
                        self._series_cache.popitem(last=False)
            instances[record["instance"]] = record
            summary = series_summary(
                list(instances.values()),
                class_names=self.class_names,
                threshold=self.threshold if self.binary or isinstance(self.threshold, list) else None,
            )
            summary |= {"series": series, "model": self.model_record, "updated": _now()}
            replace_atomically(self.outputs.series_root / series / "series.json", json_bytes(summary))

    def _answer(self, model: Model, job: _Job) -> None:
        """An HTTP input: a DICOM file or an ``.npy`` array (a 2-D image, or an already preprocessed input)."""
        data, ds = job.payload, None
        try:
            if data.startswith(b"\x93NUMPY"):
                key = content_key(data)
                record = self._record(model.predict(self._upload_array(data), name="upload"))
            else:
                ds = read_dataset(data, name="upload")
                uid = str(ds.get("SOPInstanceUID", "") or "")
                key = uid_key(uid) if uid else content_key(data)
                record = self._predict(model, ds, key)
        except DataError as exc:
            reason = redact(str(exc), ds)
            self.metrics.count("http", "refused")
            log.warning("refused an HTTP input: %s", reason)
            job.future.set_exception(DataError(reason))
            return
        record |= {"instance": key, "completed": _now()}
        record["timings_ms"]["total"] = round((time.monotonic() - job.received) * 1e3, 3)
        self.metrics.processing.labels(source="http").observe(time.monotonic() - job.received)
        self.metrics.count("http", _outcome(record))
        job.future.set_result(record)

    def _upload_array(self, data: bytes) -> np.ndarray:
        """An uploaded ``.npy``: a 2-D image within this daemon's side limits, or a preprocessed input."""
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"upload: not a readable .npy array ({exc})") from None
        if array.ndim == 2 and (min(array.shape) < self.config.min_side or max(array.shape) > MAX_SIDE):
            raise DataError(f"upload: image is {array.shape}; expected {self.config.min_side}..{MAX_SIDE} a side")
        return array


#: The DICOM UIDs an instance result carries, by their JSON names.
RESULT_UIDS = {
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
}


def _outcome(record: dict[str, Any]) -> str:
    """The ``outcome`` label /metrics counts a published result under."""
    if not record["in_distribution"]:
        return "out_of_distribution"
    return "positive" if record["decision"] else "negative"


def free_megabytes(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 1e6


def series_summary(
    instances: list[dict[str, Any]], *, class_names: list[str], threshold: float | list[float] | None
) -> dict[str, Any]:
    """A series result from its instance results.

    Binary models (``threshold`` given): the series takes its most suspicious slice, the RSNA "any
    hemorrhage" rule. Multi-label models (a threshold per label): the maximum of each label over the
    slices, each against its threshold; the decision is the first label's. Multi-class models:
    every class's maximum over the slices, and the label
    most slices were given (ties: the class with the higher maximum). Only slices in the model's
    training distribution count; flagged ones are counted apart, and a series with none left is
    ``out_of_distribution`` with no decision.
    """
    first = instances[0]
    flagged = [r for r in instances if not r.get("in_distribution", True)]
    classified = [r for r in instances if r.get("in_distribution", True)]
    summary: dict[str, Any] = {
        "schema": "edgedx.series-result/3",
        "series_instance_uid": first.get("series_instance_uid", ""),
        "study_instance_uid": first.get("study_instance_uid", ""),
        "instances": len(instances),
        "out_of_distribution": len(flagged),
        "threshold": threshold,
    }
    if not classified:
        return summary | {"status": "out_of_distribution", "decision": None, "label": None}
    instances = classified
    summary |= {
        "status": "classified",
        "maximum_probabilities": {name: max(r["probabilities"][name] for r in instances) for name in class_names},
    }
    if isinstance(threshold, list):
        maxima = summary["maximum_probabilities"]
        findings = [name for name, t in zip(class_names, threshold, strict=True) if maxima[name] >= t]
        label = ", ".join(findings) or "none"
        summary |= {"rule": "maximum of each label over instances", "findings": findings}
        return summary | {"decision": int(class_names[0] in findings), "label": label}
    if threshold is not None:
        top = max(instances, key=lambda r: r["probability"])
        decision = int(decisions(np.array([top["probability"]]), threshold)[0])
        summary |= {
            "rule": "maximum over instances (RSNA any-hemorrhage)",
            "probability": top["probability"],
            "top_instance": top["instance"],
            "probabilities": {r["instance"]: r["probability"] for r in sorted(instances, key=lambda r: r["instance"])},
        }
    else:
        votes = {name: sum(r["label"] == name for r in instances) for name in class_names}
        maxima = summary["maximum_probabilities"]
        decision = max(range(len(class_names)), key=lambda i: (votes[class_names[i]], maxima[class_names[i]]))
        summary |= {"rule": "most frequent instance label", "labels": votes}
    return summary | {"decision": decision, "label": class_names[decision]}


def default_bundle() -> Path:
    """The shipped head-CT int8 bundle: ``$EDGEDX_MODELS``, ``./models``, the install's share folder, the repo."""
    import sys

    name = "headct-ich-int8"
    folders = [Path(p) for p in os.environ.get("EDGEDX_MODELS", "").split(os.pathsep) if p]
    folders += [
        Path.cwd() / "models",
        Path(sys.prefix) / "share" / "edgedx" / "models",
        Path(__file__).resolve().parents[2] / "models",
    ]
    for folder in folders:
        if (folder / name / MANIFEST).is_file():
            return folder / name
    raise ConfigError(f"no --bundle given and the default {name} was not found in {', '.join(map(str, folders))}")
