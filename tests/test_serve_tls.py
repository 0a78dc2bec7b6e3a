"""DICOM TLS and HTTPS: a TLS C-STORE and an HTTPS request succeed; plain text and a wrong client
certificate fail cleanly, and the node keeps serving."""

from __future__ import annotations

import io
import ssl
import subprocess

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from serve_kit import dcmtk, instances, make_pki
from test_serve import results, wait_for

from edgedx.errors import ConfigError
from edgedx.serve import ServeConfig, Service, TlsFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def service(tmp_path, pki):
    tls = TlsFiles(cert=pki["server"], key=pki["server-key"], client_ca=pki["ca"])
    config = ServeConfig(out=tmp_path / "out", dicom_port=0, http_port=0, allow_ae=("SCANNER",), tls=tls, min_free_mb=0)
    with Service(config) as running:
        yield running


def client_context(pki, who: str | None = "client") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if who is not None:
        context.load_cert_chain(pki[who], pki[f"{who}-key"])
    return context


def store(port: int, datasets, tls_context: ssl.SSLContext | None):
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="EDGEDX", tls_args=(tls_context, "localhost") if tls_context else None
    )
    if not assoc.is_established:
        return None
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses


def test_tls_cstore_and_https_succeed(service, pki, tiny_headct):
    datasets = instances(tiny_headct, 2, tag="tls")
    assert store(service.scp.port, datasets, client_context(pki)) == [0x0000, 0x0000]
    wait_for(lambda: len(results(service.config.out)) == 2, what="two results over TLS")
    url = f"https://localhost:{service.http.port}"
    with httpx.Client(verify=client_context(pki)) as client:
        assert client.get(f"{url}/readyz").status_code == 200
        body = io.BytesIO()
        datasets[0].save_as(body, enforce_file_format=True)
        answer = client.post(f"{url}/v1/predict", content=body.getvalue(), timeout=30)
        assert answer.status_code == 200 and answer.json()["label"] in ("no-any", "any")
    assert "https://" in " ".join(item.where for item in service.listeners())


def test_plain_text_and_wrong_certificates_fail_cleanly(service, pki, tiny_headct):
    datasets = instances(tiny_headct, 1, tag="tls-bad")
    assert store(service.scp.port, datasets, None) is None  # plain DICOM to the TLS port
    assert store(service.scp.port, datasets, client_context(pki, "stranger")) is None  # a certificate of another CA
    assert store(service.scp.port, datasets, client_context(pki, None)) is None  # no client certificate
    url = f"https://localhost:{service.http.port}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{service.http.port}/healthz", timeout=5)  # plain HTTP to the HTTPS port
    with pytest.raises((httpx.HTTPError, ssl.SSLError)):
        httpx.get(f"{url}/healthz", verify=client_context(pki, "stranger"), timeout=5)
    assert not results(service.config.out)
    # still serving the right peers
    assert store(service.scp.port, datasets, client_context(pki)) == [0x0000]
    assert httpx.get(f"{url}/healthz", verify=client_context(pki), timeout=5).status_code == 200


@pytest.mark.skipif(dcmtk("storescu") is None, reason="DCMTK is not installed")
def test_dcmtk_storescu_over_tls(service, pki, tiny_headct, tmp_path):
    """DCMTK, the reference DICOM client, sends over TLS with its client certificate."""
    ds = instances(tiny_headct, 1, tag="dcmtk-tls")[0]
    ds.save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    command = [
        dcmtk("storescu"), "--aetitle", "SCANNER", "--call", "EDGEDX",
        "+tls", str(pki["client-key"]), str(pki["client"]), "+cf", str(pki["ca"]),
        "127.0.0.1", str(service.scp.port), str(tmp_path / "slice.dcm"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: len(results(service.config.out)) == 1, what="DCMTK's instance")


def test_tls_options_are_checked(tmp_path, pki):
    with pytest.raises(ConfigError, match="--tls-cert .* does not exist"):
        TlsFiles(cert=tmp_path / "missing.pem", key=pki["server-key"])
    with pytest.raises(ConfigError, match="cannot use the TLS certificate"):
        TlsFiles(cert=pki["server"], key=pki["client-key"]).server_context()  # a key of another certificate
