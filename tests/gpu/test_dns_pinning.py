"""DNS rebinding: the GPU downloader connects to the address it checked, not to a second lookup.

Two local HTTPS servers with a certificate for `rebind.test`: "public" stands in for the public
address the check saw, "internal" for the private address a rebinding DNS server answers with
afterwards. `socket.getaddrinfo` is patched to answer public first and 127.0.0.1 (internal) after;
`socket.create_connection` maps the public address to the "public" server. A downloader that let
httpx resolve the name again would fetch the internal server's bytes.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu.service.runner.config import JobFailed, RunnerConfig
from gpu.service.runner.transport import check_url, download, pin_url

PUBLIC_IP = "93.184.216.34"  # is_global; never actually reached (mapped to a loopback server)
NAME = "rebind.test"


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TlsServer:
    """An HTTPS server on 127.0.0.1 answering every GET with `body`; records Host headers and SNI."""

    def __init__(self, cert: Path, key: Path, body: bytes) -> None:
        self.body = body
        self.hosts: list[str] = []
        self.snis: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hosts.append(str(self.headers.get("Host")))
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sni_callback = lambda _sock, name, _ctx: self.snis.append(name)  # type: ignore[assignment,func-returns-value]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cert, key = _certificate(tmp_path, NAME)
    public = TlsServer(cert, key, b"public bytes")
    internal = TlsServer(cert, key, b"internal secret")
    client = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)))
    try:
        yield {"public": public, "internal": internal, "http": client, "cert": cert}
    finally:
        client.close()
        public.stop()
        internal.stop()


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch, tls: dict[str, Any]) -> list[str]:
    """`rebind.test` resolves to a public address once, then to 127.0.0.1; the public address is
    served by the "public" loopback server. Returns the names looked up."""
    real_getaddrinfo = socket.getaddrinfo
    real_create_connection = socket.create_connection
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in (NAME, "wrong.test"):
            lookups.append(host)
            address = PUBLIC_IP if lookups.count(host) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        host, _port = address
        if host == PUBLIC_IP:
            address = ("127.0.0.1", tls["public"].port)
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return lookups


def _config() -> RunnerConfig:
    # No loopback allowance: the production rules, with the real resolver (socket.getaddrinfo).
    return RunnerConfig(allow_http_loopback=False, connect_timeout_s=5, read_timeout_s=5)


def test_a_rebinding_resolver_cannot_redirect_the_download(tls, rebinding_dns):
    internal = tls["internal"]
    # The port is the internal server's: a second lookup (127.0.0.1) would land right on it.
    url = f"https://{NAME}:{internal.port}/inputs/clip.mp4?X-Amz-Signature=abc"
    data = download(tls["http"], url, "reference video", 1 << 20, _config())
    assert data == b"public bytes"
    assert rebinding_dns == [NAME]  # resolved once: for the check, used for the connection
    assert internal.hosts == [] and internal.snis == []
    # The vetted address got the request under the original name: Host header and TLS SNI
    # (the certificate was verified for rebind.test, not for the IP).
    assert tls["public"].hosts == [f"{NAME}:{internal.port}"]
    assert tls["public"].snis == [NAME]


def test_a_rebinding_resolver_after_the_start_check_cannot_redirect_either(tls, rebinding_dns):
    """The job-start check resolves the name first; the download checks and pins again, so a
    resolver that turns private by then is refused instead of followed."""
    url = f"https://{NAME}:{tls['internal'].port}/inputs/clip.mp4"
    check_url(url, _config())  # first answer: public
    with pytest.raises(JobFailed) as failed:
        download(tls["http"], url, "reference video", 1 << 20, _config())
    assert failed.value.error.code == "input" and "non-public" in failed.value.error.message
    assert tls["internal"].hosts == [] and tls["public"].hosts == []


def test_the_certificate_is_still_verified_for_the_name(tls, rebinding_dns):
    # wrong.test resolves to the same public address, whose certificate is for rebind.test only.
    url = f"https://wrong.test:{tls['internal'].port}/x.mp4"
    with pytest.raises(JobFailed) as failed:
        download(tls["http"], url, "reference video", 1 << 20, _config())
    assert failed.value.error.code == "internal" and "ConnectError" in failed.value.error.message
    assert tls["public"].hosts == [] and tls["internal"].hosts == []


def test_pinned_targets():
    config = RunnerConfig(allow_http_loopback=True, resolver=lambda host, port: [PUBLIC_IP, "2606:2800::1"])
    pinned = pin_url("https://Bucket.S3.amazonaws.com/k%20x?X-Amz-Signature=1", config)
    assert pinned.url == f"https://{PUBLIC_IP}/k%20x?X-Amz-Signature=1"
    assert pinned.headers == {"Host": "Bucket.S3.amazonaws.com"}
    assert pinned.extensions == {"sni_hostname": "bucket.s3.amazonaws.com"}
    v6 = RunnerConfig(resolver=lambda host, port: ["2606:2800::1"])
    assert pin_url("https://h.example:8443/p", v6).url == "https://[2606:2800::1]:8443/p"
    # IP literals and the local stack's loopback http are used as they are.
    assert pin_url("https://93.184.216.34/p", config).url == "https://93.184.216.34/p"
    local = pin_url("http://127.0.0.1:4566/bucket/key?sig=1", config)
    assert local.url == "http://127.0.0.1:4566/bucket/key?sig=1"
    assert not local.headers and not local.extensions


def test_normal_downloads_from_the_local_test_server_still_work():
    """The loopback allowance (the local stack) is unchanged: plain http to 127.0.0.1."""
    body = b"\x00\x01local media" * 100
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(str(self.headers.get("Host")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with httpx.Client() as http:
            config = RunnerConfig(allow_http_loopback=True)
            assert download(http, f"http://127.0.0.1:{port}/media/ref.mp4", "video", 1 << 20, config) == body
            assert download(http, f"http://localhost:{port}/media/ref.mp4", "video", 1 << 20, config) == body
        assert seen == [f"127.0.0.1:{port}", f"localhost:{port}"]
    finally:
        server.shutdown()
        server.server_close()
