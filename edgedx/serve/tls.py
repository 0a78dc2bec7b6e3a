"""TLS for the daemon's two ports: DICOM (PS3.15 B.9, the BCP 195 secure transport profile) and HTTPS."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: IETF BCP 195 (RFC 9325) for TLS 1.2: forward-secret AEAD suites only. TLS 1.3 suites are all allowed.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The node's certificate and key (PEM), and optionally the CA whose certificates clients must present."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for option, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{option} {path} does not exist")

    def server_context(self) -> ssl.SSLContext:
        """A server context: TLS 1.2 or later, BCP 195 suites, client certificates required with a client CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(BCP195_CIPHERS)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot use the TLS certificate {self.cert} and key {self.key}: {exc}") from None
        return context

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
            "ssl_ciphers": BCP195_CIPHERS,
        }
        if self.client_ca is not None:
            options |= {"ssl_ca_certs": str(self.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options
