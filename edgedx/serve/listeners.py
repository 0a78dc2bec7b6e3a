"""The daemon's inputs: an inbox folder, a DICOM C-STORE SCP (pynetdicom) and an HTTP API (starlette)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from pathlib import Path

# Imported here, before any worker thread starts: importing a package from two threads at once
# can see it half-initialised.
import pydicom
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom import sop_class as classes
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigError, DataError
from .daemon import Daemon, Refused
from .storage import content_key, file_content_key, uid_key

log = logging.getLogger("edgedx.serve")

#: Names a sender uses while a file is still being written; taken only once renamed.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".filepart", ".crdownload")


def _instance_key_of_file(path: Path) -> str:
    try:
        uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID")
    except Exception:  # unreadable: the worker quarantines it with the reason; name it by its bytes
        uid = None
    return uid_key(str(uid)) if uid else file_content_key(path)


class InboxWatcher:
    """Takes files from a folder the scanner exports to, once their size and mtime have been still
    for ``stable_seconds``; a file is removed from the inbox only after it is in the spool.
    Files are left where they are while the daemon is full.
    """

    def __init__(self, daemon: Daemon, folder: Path, *, stable_seconds: float, poll_seconds: float) -> None:
        self.daemon, self.folder = daemon, folder
        self.stable_seconds, self.poll_seconds = stable_seconds, poll_seconds
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, still since)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgedx-inbox", daemon=True)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.scan()
            except Exception:
                log.exception("inbox scan failed; retrying")

    def _candidates(self) -> dict[Path, tuple[int, int]]:
        found = {}
        for path in self.folder.rglob("*"):
            if path.name.startswith(".") or path.suffix.lower() in PARTIAL_SUFFIXES:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                found[path] = (stat.st_size, stat.st_mtime_ns)
        return found

    def scan(self) -> int:
        """One pass: take every file that has been still long enough; returns how many were taken."""
        now, taken = time.monotonic(), 0
        current = self._candidates()
        self._seen = {p: v for p, v in self._seen.items() if p in current}
        for path, (size, mtime) in sorted(current.items()):
            seen = self._seen.get(path)
            if seen is None or seen[:2] != (size, mtime):
                self._seen[path] = (size, mtime, now)
            elif now - seen[2] >= self.stable_seconds:
                if self._stop.is_set():
                    break
                try:
                    self.daemon.reserve("inbox")
                except Refused:
                    break  # full, or storage low: the rest waits in the inbox
                try:
                    pending = self.daemon.spool.accept_file(_instance_key_of_file(path), "inbox", path)
                except OSError as exc:
                    self.daemon.capacity.release()
                    reason = self.daemon.storage_failed(exc)
                    log.warning("could not spool an inbox file (%s); it stays in the inbox", reason)
                    break
                path.unlink(missing_ok=True)
                del self._seen[path]
                self.daemon.accept_spooled(pending, "inbox")
                taken += 1
        return taken


#: Storage SOP classes the SCP accepts: CT, MR, CR, DX and Secondary Capture.
STORAGE_CLASSES = (
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "SecondaryCaptureImageStorage",
)
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


class StoreSCP:
    """A DICOM Storage SCP and Verification SCP; an instance is acknowledged once it is spooled."""

    def __init__(
        self,
        daemon: Daemon,
        host: str,
        port: int,
        *,
        ae_title: str,
        allow_ae: tuple[str, ...],
        max_associations: int,
    ) -> None:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug output dumps datasets
        self.daemon = daemon
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_associations = max_associations
        if allow_ae:
            self.ae.require_calling_aet = list(allow_ae)
        for name in STORAGE_CLASSES:  # every transfer syntax: what cannot be decoded is quarantined
            self.ae.add_supported_context(getattr(classes, name), ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(classes.Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        try:
            self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigError(f"cannot listen for DICOM on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()

    def _on_store(self, event) -> int:
        try:
            self.daemon.reserve("cstore")
        except Refused:
            return OUT_OF_RESOURCES
        try:
            uid = str(event.request.AffectedSOPInstanceUID or "")
            data = event.encoded_dataset(include_meta=True)
            pending = self.daemon.spool.accept(uid_key(uid) if uid else content_key(data), "cstore", data)
        except OSError as exc:
            self.daemon.capacity.release()
            log.warning(
                "could not spool a C-STORE instance (%s); answered out of resources", self.daemon.storage_failed(exc)
            )
            return OUT_OF_RESOURCES
        except Exception:
            self.daemon.capacity.release()
            log.exception("could not spool a C-STORE instance; answered out of resources")
            return OUT_OF_RESOURCES
        self.daemon.accept_spooled(pending, "cstore")
        return SUCCESS


def http_app(daemon: Daemon, *, token: str | None, max_body_mb: float):
    """The HTTP API as a Starlette application.

    ``POST /v1/predict`` takes a DICOM file or an ``.npy`` array as the request body and answers
    with the result; ``/healthz`` (the process answers), ``/readyz`` (the model is loaded and the
    queue has room), ``/metrics`` (Prometheus text). With a token, every route but ``/healthz``
    needs ``Authorization: Bearer TOKEN``.
    """
    limit = int(max_body_mb * 1e6)
    expected = f"Bearer {token}".encode() if token else None

    def unauthorised(request) -> Response | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return JSONResponse({"error": "missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"})

    def refusal(refused: Refused) -> Response:
        if refused.reason == "storage":  # 507 Insufficient Storage: the node cannot keep what it would accept
            return JSONResponse({"error": f"insufficient storage: {refused}"}, 507, {"Retry-After": "30"})
        return JSONResponse({"error": f"busy: {refused}, retry shortly"}, 503, {"Retry-After": "1"})

    async def predict(request) -> Response:
        if (denied := unauthorised(request)) is not None:
            return denied
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return JSONResponse({"error": f"body over the {max_body_mb:g} MB limit"}, 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return JSONResponse({"error": f"body over the {max_body_mb:g} MB limit"}, 413)
        if not body:
            return JSONResponse({"error": "empty body: send a DICOM file or an .npy array"}, 400)
        try:
            future = daemon.submit(bytes(body))
        except Refused as refused:
            return refusal(refused)
        try:
            return JSONResponse(await asyncio.wrap_future(future))
        except DataError as exc:
            return JSONResponse({"error": str(exc)}, 422)

    async def healthz(request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request) -> Response:
        if (denied := unauthorised(request)) is not None:
            return denied
        problems = [] if daemon.ready else ["starting or stopping"]
        if daemon.capacity.used >= daemon.capacity.limit:
            problems.append("the queue is full")
        if (storage := daemon.storage_problem()) is not None:
            problems.append(storage)
        body = {
            "ready": not problems,
            "reasons": problems,
            "queue_depth": daemon.capacity.used,
            "queue_size": daemon.capacity.limit,
        }
        return JSONResponse(body, 503 if problems else 200)

    async def metrics(request) -> Response:
        if (denied := unauthorised(request)) is not None:
            return denied
        return Response(daemon.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    return Starlette(routes=routes)


class HttpServer:
    """Uvicorn serving :func:`http_app` from a thread, on a socket bound here (port 0: any free port)."""

    def __init__(self, daemon: Daemon, host: str, port: int, *, token: str | None, max_body_mb: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            http_app(daemon, token=token, max_body_mb=max_body_mb),
            log_level="warning",
            access_log=False,  # request lines are counted in /metrics instead
            lifespan="off",
            backlog=256,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.socket.close()
