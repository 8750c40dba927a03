"""TLS on the serving side: `ServerTLS`, the `--tls-cert/--tls-key/--tls-ca` flags, and binding.

Every ditmesh server (the three stages on the thread-pool server, the gateway on the
asyncio one, and the gateway's HTTP API) serves TLS with the same three settings:
its certificate and key, and optionally the CA whose certificates its clients must
present (mutual TLS: a caller without one is refused in the handshake). Without them
it serves plaintext, as before. The files are read and checked when `ServerTLS` is
made, so a wrong path or a key that does not belong to the certificate stops the
process at start with a sentence naming the flag.

How callers connect (the SDK, the gateway to its stages) is `ditmesh.client.tls`'s;
mounting the files from Secrets is the Helm chart's.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ditmesh.client.tls import ChannelTLS, add_channel_tls_flags, channel_tls_from_flags, check_pem


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerTLS:
    """What a server serves TLS with; checked when made (see the module doc)."""

    cert: str
    """PEM certificate (chain) of the server."""
    key: str
    """PEM private key of `cert`."""
    client_ca: str | None = None
    """PEM CA(s) that must have signed a client's certificate (mutual TLS); None: any client."""

    def __post_init__(self) -> None:
        check_pem(ca=self.client_ca, cert=self.cert, key=self.key, flags="--tls")

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=Path(self.client_ca).read_bytes() if self.client_ca else None,
            require_client_auth=self.mutual,
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's keywords for HTTPS with the same certificate and clients."""
        return {
            "ssl_certfile": self.cert,
            "ssl_keyfile": self.key,
            "ssl_ca_certs": self.client_ca,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE,
        }


def label(tls: ServerTLS | None) -> str:
    """What a "listening on" log line adds: the kind of TLS, or nothing for plaintext."""
    if tls is None:
        return ""
    return " (mutual TLS)" if tls.mutual else " (TLS)"


def bind(server: grpc.Server | grpc.aio.Server, address: str, tls: ServerTLS | None) -> int:
    """Adds the listening port (TLS when `tls`); returns the port bound, 0 when none was."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())


def add_serve_tls_flags(p: argparse.ArgumentParser) -> None:
    """`ditmesh serve`'s TLS flags: how every server serves, and how the gateway calls stages."""
    g = p.add_argument_group("TLS (default: plaintext)")
    g.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve TLS with this certificate (chain); with --tls-key",
    )
    g.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    g.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="mutual TLS: accept only clients whose certificate this CA signed",
    )
    g = p.add_argument_group("gateway: TLS to the stages (default: plaintext)")
    add_channel_tls_flags(g, "stage-", "the stages")


def serve_tls_from_flags(
    args: argparse.Namespace, stage: str
) -> tuple[ServerTLS | None, ChannelTLS | None]:
    """The server's TLS and (gateway) the stages' TLS from `add_serve_tls_flags`' flags;
    None for plaintext. Raises ValueError naming the flag that is wrong."""
    stages = channel_tls_from_flags(args, "stage-")
    if stages is not None and stage != "gateway":
        raise ValueError(f"--stage-tls-* are the gateway's; the {stage} stage calls no stage")
    return _server_tls(args), stages


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if cert is None and key is None:
        if ca is not None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key (the server's own)")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    return ServerTLS(cert=cert, key=key, client_ca=ca)
