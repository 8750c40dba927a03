"""TLS on the calling side of a gRPC link: `ChannelTLS`, its flags, and what a failed handshake means.

One type for every caller of a ditmesh server: the SDK and `ditmesh generate` calling a
gateway, and the gateway calling its stages (gateway/replicas.py). It lives in the client
package because the client is the lowest layer (grpc and the standard library only), so a
client-only install has it and the gateway need not define a second one.

- `ChannelTLS`: the CA to trust (None: the system's roots), an optional client certificate
  and key (for a server that requires them: mutual TLS), and an optional server name (the
  name the server's certificate must carry when the address is not it, e.g. a pod IP).
  Its files are read and checked when it is made, so a wrong path or a key that does not
  match its certificate fails at start with a sentence, not at the first call.
- `channel_tls`: what `Client(tls=...)` accepts (True, a CA path, a `ChannelTLS`) made one type.
- `explain`: gRPC reports a failed handshake as UNAVAILABLE with OpenSSL's words; this
  turns them into a sentence that says what is wrong and what to change.

What a server serves with (its certificate, and the CA of the clients it admits) is
services/common/tls.py's.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "ChannelTLS",
    "add_channel_tls_flags",
    "channel_tls",
    "channel_tls_from_flags",
    "check_pem",
    "explain",
    "handshake_failed",
    "open_aio_channel",
    "open_channel",
]


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


def check_pem(
    *, ca: str | None = None, cert: str | None = None, key: str | None = None, flags: str = "--tls"
) -> None:
    """Checks PEM files the way OpenSSL will read them; raises ValueError naming the flag.

    gRPC reads its credentials only when a connection is made, and then reports a bad file
    as a failed handshake; the standard library's ssl reads them now."""
    if (cert is None) != (key is None):
        raise ValueError(f"{flags}-cert and {flags}-key go together: give both or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        _read(ca, f"{flags}-ca")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ValueError(
                f"{flags}-ca {ca}: not a usable CA certificate ({exc.reason})"
            ) from None
    if cert is not None and key is not None:
        _read(cert, f"{flags}-cert")
        _read(key, f"{flags}-key")
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ValueError(
                f"{flags}-cert {cert} and {flags}-key {key}: not a certificate and its private "
                f"key ({exc.reason})"
            ) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelTLS:
    """How a caller connects with TLS (see the module doc); checked when made."""

    ca: str | None = None
    """PEM file of the CA(s) the server's certificate must be signed by; None: system roots."""
    cert: str | None = None
    """PEM certificate this caller presents (mutual TLS); with `key`."""
    key: str | None = None
    """PEM private key of `cert`."""
    server_name: str | None = None
    """Name the server's certificate must carry, when the address is not that name."""
    flags: str = "--tls"
    """Prefix of the flags (or argument) these came from, for error sentences."""

    def __post_init__(self) -> None:
        check_pem(ca=self.ca, cert=self.cert, key=self.key, flags=self.flags)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read(self.ca, f"{self.flags}-ca"),
            private_key=None if self.key is None else _read(self.key, f"{self.flags}-key"),
            certificate_chain=None if self.cert is None else _read(self.cert, f"{self.flags}-cert"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options TLS adds (the server name to check)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def open_channel(address: str, options: list[tuple[str, Any]], tls: ChannelTLS | None):
    """A blocking channel: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), [*options, *tls.options()])


def open_aio_channel(address: str, options: list[tuple[str, Any]], tls: ChannelTLS | None):
    """An asyncio channel: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), [*options, *tls.options()])


def channel_tls(tls: bool | str | os.PathLike | ChannelTLS | None) -> ChannelTLS | None:
    """`Client(tls=...)`: None or False plaintext; True the system's roots; a path the CA file."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return ChannelTLS()
    if isinstance(tls, ChannelTLS):
        return tls
    if isinstance(tls, str | os.PathLike):
        return ChannelTLS(ca=os.fspath(tls))
    raise TypeError(f"tls must be a bool, a CA file path or a ChannelTLS; got {type(tls).__name__}")


def add_channel_tls_flags(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str, whom: str
) -> None:
    """`--{prefix}tls-ca`, `-cert`, `-key`, `-server-name`: how this process connects to `whom`."""
    p.add_argument(
        f"--{prefix}tls-ca",
        default=None,
        metavar="PEM",
        help=f"connect to {whom} with TLS, trusting this CA (default: plaintext)",
    )
    p.add_argument(
        f"--{prefix}tls-cert",
        default=None,
        metavar="PEM",
        help=f"certificate this process presents to {whom}, for mutual TLS (with "
        f"--{prefix}tls-key)",
    )
    p.add_argument(f"--{prefix}tls-key", default=None, metavar="PEM", help="its private key")
    p.add_argument(
        f"--{prefix}tls-server-name",
        default=None,
        metavar="NAME",
        help=f"name the certificate of {whom} must carry when the address dialled is not "
        "that name (e.g. pod IPs behind one Service's certificate)",
    )


def channel_tls_from_flags(
    args: argparse.Namespace, prefix: str, *, tls: bool = False
) -> ChannelTLS | None:
    """The flags of `add_channel_tls_flags`; None (plaintext) unless one is given or `tls`.
    Raises ValueError naming the flag that is wrong."""
    dest = prefix.replace("-", "_")
    ca, cert, key, name = (
        getattr(args, f"{dest}tls_{f}") for f in ("ca", "cert", "key", "server_name")
    )
    if not tls and ca is None and cert is None and key is None:
        if name is not None:
            raise ValueError(f"--{prefix}tls-server-name needs TLS: give --{prefix}tls-ca")
        return None
    return ChannelTLS(ca=ca, cert=cert, key=key, server_name=name, flags=f"--{prefix}tls")


# OpenSSL's and gRPC's words for a failed handshake, as the calling side sees them.
_NOT_TRUSTED = "CERTIFICATE_VERIFY_FAILED"
_NOT_TLS = "WRONG_VERSION_NUMBER"
_WRONG_NAME = "Hostname Verification Check failed"
_CLOSED = "Socket closed"
_CONNECTING = "failed to connect to all addresses"


def handshake_failed(details: str) -> bool:
    """The caller's own connection failed in a TLS handshake for a reason a retry cannot
    change (a server's sentence that quotes such a failure of its own is not one)."""
    return details.startswith(_CONNECTING) and any(
        w in details for w in (_NOT_TRUSTED, _NOT_TLS, _WRONG_NAME)
    )


def explain(details: str, tls: ChannelTLS | bool | None, peer: str = "the server") -> str | None:
    """What a connection failure's `details` say about TLS, as a sentence; None: nothing.

    `tls`: how the caller connected (a `ChannelTLS`, False for plaintext, None: unknown).
    A server that closes the connection as it opens says nothing more; its reason is a
    guess, worded as one, from how the caller connected. Only the caller's own connection
    failures are explained: a server's sentence that quotes one (the gateway's, about a
    stage) is left as it is."""
    if not details.startswith(_CONNECTING):
        return None
    if _NOT_TRUSTED in details:
        return f"TLS: {peer}'s certificate is not signed by a CA this caller trusts"
    if _WRONG_NAME in details:
        return (
            f"TLS: {peer}'s certificate does not carry the name connected to "
            "(set the server name its certificate carries)"
        )
    if _NOT_TLS in details:
        return f"TLS: {peer} does not speak TLS (it serves plaintext)"
    if _CLOSED not in details:
        return None
    if tls is False:
        return (
            f"{peer} closed the connection as it opened: it may serve TLS only (connect with TLS)"
        )
    if isinstance(tls, ChannelTLS):
        if tls.cert is None:
            return (
                f"TLS: {peer} closed the connection after the handshake: it requires a client "
                "certificate (mutual TLS) and none was given"
            )
        return (
            f"TLS: {peer} closed the connection after the handshake: it did not accept the "
            f"client certificate {tls.cert} (not signed by the CA it trusts for clients)"
        )
    return (
        f"{peer} closed the connection as it opened: a server that serves TLS does so to a "
        "plaintext caller, and one that requires client certificates (mutual TLS) to a caller "
        "with none it accepts"
    )
