"""``edgedx serve``: the scanner-side inference daemon (inbox folder, DICOM C-STORE, HTTP).

Runs on the base install: the runtime, pydicom, pynetdicom, highdicom, starlette and uvicorn;
never TensorFlow. Usage from Python::

    from edgedx.serve import ServeConfig, Service

    with Service(ServeConfig(out=Path("results"), inbox=Path("inbox"), dicom_port=11112)) as service:
        service.wait()  # until SIGTERM / SIGINT
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from ..bundle import read_bundle
from .daemon import Daemon, ServeConfig, default_bundle
from .forward import Destination
from .listeners import HttpServer, InboxWatcher, StoreSCP
from .tls import TlsFiles

__all__ = ["Destination", "Listener", "ServeConfig", "Service", "TlsFiles", "default_bundle"]

log = logging.getLogger("edgedx.serve")


@dataclass(frozen=True)
class Listener:
    kind: str
    where: str


class Service:
    """The daemon with its listeners; :meth:`start` opens them, :meth:`stop` drains and closes."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.bundle = read_bundle(config.bundle or default_bundle())
        self.daemon = Daemon(config, self.bundle)
        self.inbox: InboxWatcher | None = None
        self.scp: StoreSCP | None = None
        self.http: HttpServer | None = None
        self.recovered = 0
        self._stop = threading.Event()

    def start(self) -> Service:
        """Start the workers, then the listeners; if one cannot start, stop what did and re-raise."""
        self.recovered = self.daemon.start()
        try:
            self._open_listeners()
        except Exception:
            self.stop()
            raise
        if self.bundle.synthetic_only:
            log.warning("model %s was trained on synthetic data only: not validated on real scans", self.bundle.name)
        log.info("ready: %s", "; ".join(f"{item.kind} {item.where}" for item in self.listeners()))
        return self

    def _open_listeners(self) -> None:
        config = self.config
        if config.http_port is not None:
            self.http = HttpServer(
                self.daemon,
                config.host,
                config.http_port,
                token=config.token,
                max_body_mb=config.max_file_mb,
                tls=config.tls,
            )
            self.http.start()
        if config.dicom_port is not None:
            self.scp = StoreSCP(
                self.daemon,
                config.host,
                config.dicom_port,
                ae_title=config.ae_title,
                allow_ae=config.allow_ae,
                max_associations=config.max_associations,
                tls=config.tls.server_context() if config.tls is not None else None,
            )
        if config.inbox is not None:
            self.inbox = InboxWatcher(
                self.daemon, config.inbox, stable_seconds=config.stable_seconds, poll_seconds=config.poll_seconds
            )
            self.inbox.start()

    def listeners(self) -> list[Listener]:
        config, found = self.config, []
        if self.inbox is not None:
            found.append(Listener("inbox", str(config.inbox)))
        if self.scp is not None:
            allowed = ", ".join(config.allow_ae) if config.allow_ae else "any calling AE title"
            secure = ", TLS" if config.tls else ""
            found.append(Listener("dicom", f"{config.ae_title}@{config.host}:{self.scp.port} (from {allowed}{secure})"))
        if config.forward_to is not None:
            found.append(Listener("forward", f"SRs to {config.forward_to} (outbox {config.out / '.outbox'})"))
        if self.http is not None:
            auth = "bearer token" if config.token else "no token (loopback only)"
            scheme = "https" if config.tls else "http"
            found.append(Listener("http", f"{scheme}://{config.host}:{self.http.port} ({auth})"))
        return found

    def wait(self) -> None:
        """Block until SIGTERM or SIGINT (main thread only), or :meth:`request_stop`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> bool:
        """Stop taking inputs, finish what is queued, close the HTTP server last (its callers wait)."""
        if self.inbox is not None:
            self.inbox.stop()
        if self.scp is not None:
            self.scp.stop()
        drained = self.daemon.stop()
        if self.http is not None:
            self.http.stop()
        return drained

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
