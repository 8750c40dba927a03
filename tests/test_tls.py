"""TLS everywhere, with certificates made here (the `cryptography` package).

- A mesh over TLS end to end: the tiny model's three stages serve mutual TLS (they admit
  only clients whose certificate the test CA signed), the gateway calls them with its
  client certificate and itself serves TLS, gRPC and HTTPS; the SDK and `ditmesh generate`
  trusting the CA get an image.
- A stage with a client CA refuses a gateway without the right certificate, and the
  gateway's health check says why (none given; one another CA signed).
- The SDK with the wrong CA fails at once with a `TLSError` that says so; a plaintext
  client of a TLS gateway fails with a sentence that names TLS.
- `ditmesh serve STAGE --tls-cert --tls-key --tls-ca` in a process; flags that are wrong
  stop it at start with a sentence.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from ditmesh.cli import main as cli_main
from ditmesh.client import ChannelTLS, Client, TLSError, UnavailableError
from ditmesh.client.tls import explain, handshake_failed
from ditmesh.common.server import StageOptions
from ditmesh.common.tls import ServerTLS
from ditmesh.gateway.main import serve as serve_gateway
from ditmesh.gateway.settings import GatewaySettings

from .helpers import wait_for

# ------------------------------------------------------------ certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key) -> tuple[str, str]:
    crt, pem = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(crt), str(pem)


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@dataclass
class Authority:
    """A CA and the certificates it signed, as PEM files."""

    folder: Path
    name: str

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            _builder(self.name, _name(self.name), self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca, _ = _write(self.folder, self.name, self.cert, self.key)

    def issue(self, stem: str, *, server: bool) -> tuple[str, str]:
        """(certificate, key) files: a server's for localhost and 127.0.0.1, or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = _builder(stem, self.cert.subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.folder, f"{self.name}-{stem}", b.sign(self.key, hashes.SHA256()), key)


@dataclass
class Pki:
    ca: Authority
    other: Authority
    """A CA nobody here trusts."""
    server: tuple[str, str]
    client: tuple[str, str]
    stranger: tuple[str, str]
    """A client certificate the other CA signed."""

    def server_tls(self, *, mutual: bool) -> ServerTLS:
        cert, key = self.server
        return ServerTLS(cert=cert, key=key, client_ca=self.ca.ca if mutual else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority(folder, "ca"), Authority(folder, "other")
    return Pki(
        ca=ca,
        other=other,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        stranger=other.issue("client", server=False),
    )


# ------------------------------------------------------------ a mesh over TLS


@pytest.fixture(scope="module")
def tls_mesh(tiny_flux, pki):
    """Stages serving mutual TLS; a gateway calling them with its client certificate and
    serving TLS (gRPC and HTTPS)."""
    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.vae.service import serve as serve_vae

    options = StageOptions(tls=pki.server_tls(mutual=True))
    stages = [serve_encoder(tiny_flux, options), serve_denoiser(tiny_flux, options)]
    stages.append(serve_vae(tiny_flux, options))
    cert, key = pki.client
    gateway = _gateway(
        tiny_flux,
        stages,
        tls=pki.server_tls(mutual=False),
        stage_tls=ChannelTLS(ca=pki.ca.ca, cert=cert, key=key, flags="--stage-tls"),
        http_port=0,
    )
    yield gateway, stages
    gateway.stop(0)
    for s in stages:
        s.stop(0)


def _gateway(model: str, stages: list, **settings):
    encoder, denoiser, vae = (s.address for s in stages)
    return serve_gateway(
        model,
        encoder=[encoder],
        denoiser=[denoiser],
        vae=[vae],
        settings=GatewaySettings(**settings),
    )


def test_mesh_over_tls_end_to_end(tls_mesh, pki):
    gateway, _ = tls_mesh
    assert gateway.gateway.healthy()
    with Client(gateway.address, tls=pki.ca.ca) as client:
        client.wait_ready(30)
        result = client.generate("a red square", height=64, width=64, steps=2, seed=3)
    assert result.images[0].size == (64, 64)


def test_http_api_serves_https_with_the_same_certificate(tls_mesh, pki):
    gateway, _ = tls_mesh
    assert gateway.http_api.url.startswith("https://")
    context = ssl.create_default_context(cafile=pki.ca.ca)
    with urllib.request.urlopen(f"{gateway.http_api.url}/v1/models", context=context) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["tiny-flux"]


def test_generate_cli_over_tls(tls_mesh, pki, tmp_path, capsys):
    gateway, _ = tls_mesh
    out = tmp_path / "fox.png"
    args = ["generate", "a fox", "--gateway", gateway.address, "--height", "64"]
    args += ["--width", "64", "--steps", "2", "-o", str(out)]
    assert cli_main([*args, "--tls-ca", pki.ca.ca]) == 0
    assert Image.open(out).size == (64, 64)
    # The system's CAs did not sign the test CA's certificate: one line that says so.
    assert cli_main([*args, "--tls"]) == 1
    err = capsys.readouterr().err
    assert "error: UNAVAILABLE: TLS: the gateway's certificate is not signed by a CA" in err
    assert "Traceback" not in err


@pytest.mark.alone  # bounds the wall time of a refused handshake
def test_sdk_with_the_wrong_ca_fails_at_once_and_says_why(tls_mesh, pki):
    gateway, _ = tls_mesh
    t0 = time.monotonic()
    with Client(gateway.address, tls=pki.other.ca, retry_backoff=1.0) as client:
        with pytest.raises(TLSError) as info:
            client.list_models(timeout=20)
    assert "the gateway's certificate is not signed by a CA this caller trusts" in str(info.value)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # Not retried: three retries would pause at least 0.5 + 1 + 2 seconds.
    assert time.monotonic() - t0 < 3.0


def test_plaintext_client_of_a_tls_gateway_fails_clearly(tls_mesh):
    gateway, _ = tls_mesh
    with Client(gateway.address, retries=0) as client:
        with pytest.raises(UnavailableError) as info:
            client.list_models(timeout=20)
    assert "a server that serves TLS does so to a plaintext caller" in str(info.value)


@pytest.mark.parametrize("who", ["none", "stranger"])
def test_a_stage_with_a_client_ca_refuses_a_gateway_without_the_right_certificate(
    tls_mesh, pki, tiny_flux, who
):
    _, stages = tls_mesh
    cert, key = pki.stranger if who == "stranger" else (None, None)
    stage_tls = ChannelTLS(ca=pki.ca.ca, cert=cert, key=key, flags="--stage-tls")
    gateway = _gateway(tiny_flux, stages, stage_tls=stage_tls)
    try:
        wait_for(lambda: gateway.gateway.settled(), timeout=30)
        assert not gateway.gateway.healthy()
        with grpc.insecure_channel(gateway.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        why = {p.name: p.replicas.why_down() for p in gateway.gateway.pools}
    finally:
        gateway.stop(0)
    want = (
        "it requires a client certificate (mutual TLS) and none was given"
        if who == "none"
        else f"it did not accept the client certificate {cert}"
    )
    for stage in ("encoder", "denoiser", "vae"):
        assert f"TLS: the {stage} replica closed the connection after the handshake" in why[stage]
        assert want in why[stage]


# ------------------------------------------------------------ `ditmesh serve` with TLS flags


@pytest.mark.slow
def test_serve_a_stage_with_mutual_tls(tiny_flux, pki, tmp_path):
    cert, key = pki.server
    cmd = [sys.executable, "-m", "ditmesh.cli", "serve", "encoder", "--model", tiny_flux]
    cmd += ["--tls-cert", cert, "--tls-key", key, "--tls-ca", pki.ca.ca]
    log = tmp_path / "encoder.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, log.read_text()
        address = line.split()[-1]
        client_cert, client_key = pki.client
        good = ChannelTLS(ca=pki.ca.ca, cert=client_cert, key=client_key)
        with grpc.secure_channel(address, good.credentials()) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        no_cert = ChannelTLS(ca=pki.ca.ca)
        with grpc.secure_channel(address, no_cert.credentials()) as ch:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert "requires a client certificate" in explain(info.value.details(), no_cert)
    finally:
        proc.kill()
        proc.wait(30)
    assert "listening on" in log.read_text() and "(mutual TLS)" in log.read_text()


def test_wrong_tls_flags_stop_serve_at_start(pki, tmp_path, capsys):
    cert, key = pki.server
    base = ["serve", "encoder", "--model", str(tmp_path / "no-model")]
    cases = {
        "--tls-cert": [*base, "--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", key],
        "go together": [*base, "--tls-cert", cert],
        "--tls-ca needs": [*base, "--tls-ca", pki.ca.ca],
        "not a certificate and its private key": [
            *base,
            "--tls-cert",
            cert,
            "--tls-key",
            pki.client[1],
        ],
        "are the gateway's": [*base, "--stage-tls-ca", pki.ca.ca],
        "--stage-tls-server-name needs TLS": [
            "serve",
            "gateway",
            "--model",
            str(tmp_path / "no-model"),
            "--stage-tls-server-name",
            "x",
        ],
    }
    for words, argv in cases.items():
        assert cli_main(argv) == 2, words
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (words, err)


def test_bad_ca_file_is_an_sdk_argument_error(tmp_path):
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="not a PEM file"):
        Client("127.0.0.1:1", tls=str(not_pem))
    with pytest.raises(ValueError, match="No such file"):
        Client("127.0.0.1:1", tls=str(tmp_path / "none.crt"))


# ------------------------------------------------------------ gRPC's words, explained

# What grpcio 1.85 says on the caller's side (seen with the certificates above).
_CONNECT = "failed to connect to all addresses; last error: "
WORDS = {
    "untrusted": _CONNECT + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK",
    "plaintext server": _CONNECT + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
    "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
    "wrong name": _CONNECT + "UNKNOWN: ipv4:127.0.0.1:1: Custom verification check failed "
    "with error: UNAUTHENTICATED: Hostname Verification Check failed.",
    "closed": _CONNECT + "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed",
}


def test_explain_says_what_each_handshake_failure_means(pki):
    cert, key = pki.client
    assert "not signed by a CA" in explain(WORDS["untrusted"], None)
    assert "does not speak TLS" in explain(WORDS["plaintext server"], ChannelTLS())
    assert "does not carry the name" in explain(WORDS["wrong name"], ChannelTLS())
    assert "may serve TLS only" in explain(WORDS["closed"], False)
    assert "none was given" in explain(WORDS["closed"], ChannelTLS())
    assert cert in explain(WORDS["closed"], ChannelTLS(cert=cert, key=key))
    assert explain(_CONNECT + "UNKNOWN: Connection refused", None) is None
    # Retries cannot help the three certain ones; a closed socket may be a restart.
    assert [handshake_failed(w) for w in WORDS.values()] == [True, True, True, False]
    # A server's own sentence quoting a stage's failure is not the caller's to explain.
    relayed = f"the vae stage is unavailable: no healthy replica ({WORDS['untrusted']})"
    assert explain(relayed, None) is None and not handshake_failed(relayed)
