"""The daemon's inputs: an inbox folder, a DICOM C-STORE SCP (pynetdicom) and an HTTP API (starlette)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import ssl
import threading
import time
import weakref
from pathlib import Path

# Imported here, before any worker thread starts: importing a package from two threads at once
# can see it half-initialised.
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom import sop_class as classes
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..data.dicom import header_text, read_dataset
from ..errors import ConfigError, DataError, DicomError
from .daemon import Daemon, Refused
from .storage import content_key, file_content_key, uid_key
from .tls import TlsFiles

log = logging.getLogger("edgedx.serve")

#: Names a sender uses while a file is still being written; taken only once renamed.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".filepart", ".crdownload")


def _instance_key_of_file(path: Path) -> str:
    """The name of an inbox file's instance, read through the same guards as the worker (no deflate bomb
    is expanded here either); an unreadable file is named by its bytes and quarantined by the worker."""
    try:
        uid = header_text(read_dataset(path, stop_before_pixels=True), "SOPInstanceUID", path.name)
    except DicomError:
        uid = ""
    return uid_key(uid) if uid else file_content_key(path)


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


#: Seconds a peer has to send its A-ASSOCIATE-RQ (and, over TLS, finish the handshake) after connecting,
#: to answer a release, or to send the next PDU of an association before it is aborted.
REQUEST_SECONDS = 10.0
IDLE_SECONDS = 60.0
LISTEN_BACKLOG = 128
#: Connections (association threads) held at once, of any state, as a multiple of --max-associations.
CONNECTIONS_PER_ASSOCIATION = 8
#: DUL states (PS3.8 9.2): a connection whose peer has not asked for an association yet, and all the
#: states that hold no association (idle, awaiting the request, released and awaiting the peer's close).
AWAITING_REQUEST = "Sta2"
NOT_ASSOCIATED = ("Sta1", AWAITING_REQUEST, "Sta13")


class _CountingEstablishedAE(AE):
    """An AE whose association limit counts only associations being negotiated or established.

    pynetdicom counts every connection thread, so silent or half-open TCP connections, and
    released ones whose peer has not closed yet, would take the slots of real scanners until their
    timer expires (a scanner locked out for the ARTIM timeout by a port scan). Connections of any
    state are bounded separately (see StoreSCP).
    """

    @property
    def active_associations(self):
        return [a for a in super().active_associations if a.dul.state_machine.current_state not in NOT_ASSOCIATED]

    @property
    def connections(self) -> int:
        return len(super().active_associations)

    def silent_connections(self) -> list:
        """Acceptor connections whose peer has not sent an A-ASSOCIATE-RQ yet, oldest first."""
        return [
            a
            for a in super().active_associations
            if a.is_acceptor and a.dul.state_machine.current_state == AWAITING_REQUEST
        ]


def _release_waiting_acceptor(event) -> None:
    """A peer closed before asking for an association: end its thread now, not at the request timeout.

    pynetdicom's acceptor waits ``acse_timeout`` for an A-ASSOCIATE-RQ even after the connection
    is gone; an empty primitive wakes it as a timeout would, and it cleans up.
    """
    assoc = event.assoc
    if assoc.is_acceptor and not assoc.is_established:
        assoc.dul.to_user_queue.put(None)


class StoreSCP:
    """A DICOM Storage SCP and Verification SCP; an instance is acknowledged once it is spooled.

    Peers that connect and stay silent, abort mid-PDU or send slowly are cut off by the request
    and idle timeouts. At ``CONNECTIONS_PER_ASSOCIATION * max_associations`` connections the
    oldest silent one is dropped to admit a new one; a newcomer is closed on arrival only when
    none is silent. With ``tls`` every connection is TLS (DICOM PS3.15 B.9, BCP 195); the
    handshake runs in the connection's own thread, under the request timeout, never in the accept loop.
    """

    def __init__(
        self,
        daemon: Daemon,
        host: str,
        port: int,
        *,
        ae_title: str,
        allow_ae: tuple[str, ...],
        max_associations: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its debug output dumps datasets; aborts log errors
        self.daemon, self.tls = daemon, tls
        self.ae = _CountingEstablishedAE(ae_title=ae_title)
        self.ae.maximum_associations = max_associations
        self.ae.acse_timeout = REQUEST_SECONDS
        self.ae.dimse_timeout = IDLE_SECONDS
        self.ae.network_timeout = IDLE_SECONDS
        self.max_connections = CONNECTIONS_PER_ASSOCIATION * max_associations
        if allow_ae:
            self.ae.require_calling_aet = list(allow_ae)
        for name in STORAGE_CLASSES:  # every transfer syntax: what cannot be decoded is quarantined
            self.ae.add_supported_context(getattr(classes, name), ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(classes.Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_CLOSE, _release_waiting_acceptor),
        ]
        try:
            self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigError(f"cannot listen for DICOM on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self.server.server_address[1]
        # socketserver listens with a backlog of 5: a burst of connections beyond it waits for SYN retries (1 s, 3 s)
        self.server.socket.listen(LISTEN_BACKLOG)
        self.refused_connections = 0
        self._dropped: weakref.WeakSet = weakref.WeakSet()
        self.server.verify_request = self._admit
        if tls is not None:
            self.server.get_request = self._accept_tls
            self._handle = self.server.process_request_thread
            self.server.process_request_thread = self._handshake_then_handle

    def stop(self) -> None:
        self.server.shutdown()

    def _admit(self, request, client_address) -> bool:
        """At the connection cap, make room by dropping the oldest peer that has not asked for an
        association yet; close the newcomer only when every connection is a real association."""
        if self.ae.connections < self.max_connections:
            return True
        silent = [a for a in self.ae.silent_connections() if a not in self._dropped]
        if silent:
            self._dropped.add(silent[0])  # counted until its thread has ended
            with contextlib.suppress(OSError, AttributeError):  # gone meanwhile
                silent[0].dul.socket.socket.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and ends
            self._count_refusal("silent DICOM connections dropped to admit a new one")
            return True
        self._count_refusal("DICOM connections closed on arrival")
        return False

    def _count_refusal(self, what: str) -> None:
        self.refused_connections += 1
        if self.refused_connections in (1, 10, 100) or self.refused_connections % 1000 == 0:
            log.warning("%d %s: %d open already", self.refused_connections, what, self.max_connections)

    def _accept_tls(self):
        client, address = self.server.socket.accept()
        return self.tls.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    def _handshake_then_handle(self, request, client_address) -> None:
        """In the connection's thread: the TLS handshake under the request timeout, then the association."""
        try:
            request.settimeout(REQUEST_SECONDS)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ValueError) as exc:  # plain text, a wrong certificate, a silent peer
            log.warning("DICOM TLS handshake failed (%s)", type(exc).__name__ if not str(exc) else str(exc)[:120])
            self.server.shutdown_request(request)
            return
        self._handle(request, client_address)

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

    def refusal(refused: Refused) -> Response:
        if refused.reason == "storage":  # 507 Insufficient Storage: the node cannot keep what it would accept
            return JSONResponse({"error": f"insufficient storage: {refused}"}, 507, {"Retry-After": "30"})
        return JSONResponse({"error": f"busy: {refused}, retry shortly"}, 503, {"Retry-After": "1"})

    async def predict(request) -> Response:
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
        if daemon.forwarder is not None:  # a PACS outage delays results; it does not stop the node taking images
            body |= {"forward_backlog": len(daemon.outbox), "forward_error": daemon.forwarder.last_error}
        return JSONResponse(body, 503 if problems else 200)

    async def metrics(request) -> Response:
        return Response(daemon.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    middleware = [Middleware(BearerToken, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware)


class BearerToken:
    """ASGI middleware: every request but ``/healthz`` (the supervisor's liveness probe) needs the token.

    As middleware, a route added later cannot forget the check.
    """

    OPEN_PATHS = ("/healthz",)

    def __init__(self, app, *, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                denied = JSONResponse({"error": "missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"})
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HttpServer:
    """Uvicorn serving :func:`http_app` from a thread, on a socket bound here (port 0: any free port)."""

    def __init__(
        self,
        daemon: Daemon,
        host: str,
        port: int,
        *,
        token: str | None,
        max_body_mb: float,
        tls: TlsFiles | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
        # sockets that name their protocol, and accepted connections inherit this one's. With Nagle
        # on, every answer (headers and body written apart) waited ~40 ms for the client's delayed ACK.
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
            **(tls.uvicorn_options() if tls is not None else {}),
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
