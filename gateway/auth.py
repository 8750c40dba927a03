"""API keys: who may call the gateway, over HTTP (`Authorization: Bearer KEY`) and gRPC
(metadata `authorization: Bearer KEY`).

Off unless `--api-keys-file` is given (a local mesh needs none). The file holds one key
a line; blank lines and lines starting with `#` are skipped. It is read once at start
(restart the gateway to change keys). Keys are kept only as SHA-256 digests, so the
lookup of a presented key takes the same time whichever key it matches or misses.
Health checks and reflection stay open: probes and tools carry no key. Which calls
check a key is the servicer's and the HTTP app's business; this module only decides.
"""

from __future__ import annotations

import hashlib
import pathlib

import grpc

from ditmesh.common.errors import DitmeshError

AUTHORIZATION_KEY = "authorization"


class Unauthenticated(DitmeshError):
    """No key, or a key not in the gateway's file."""

    code = grpc.StatusCode.UNAUTHENTICATED


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The keys the gateway accepts."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("an API key file must hold at least one key")
        for key in keys:
            if any(c.isspace() for c in key):
                raise ValueError("an API key may not contain spaces")
        self._digests = frozenset(_digest(k) for k in keys)

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> ApiKeys:
        try:
            text = pathlib.Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"--api-keys-file {path}: {exc.strerror or exc}") from None
        keys = [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
        if not keys:
            raise ValueError(f"--api-keys-file {path} holds no key (one a line, # comments)")
        return cls(keys)

    def check(self, authorization: str | None) -> None:
        """Accepts `Bearer KEY` with a known key; raises Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated(
                "this gateway needs an API key: send it as 'Authorization: Bearer KEY'"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization must be 'Bearer KEY'")
        if _digest(key.strip()) not in self._digests:
            raise Unauthenticated("the API key is not valid for this gateway")


def load_keys(path: str | None) -> ApiKeys | None:
    """The keys of `--api-keys-file`, or None (no file: every caller is let in)."""
    return None if path is None else ApiKeys.from_file(path)


def check_grpc(keys: ApiKeys | None, context: grpc.aio.ServicerContext) -> None:
    """Checks a gRPC call's `authorization` metadata (nothing to check without keys)."""
    if keys is None:
        return
    value = None
    for k, v in context.invocation_metadata() or ():
        if k == AUTHORIZATION_KEY:
            value = v if isinstance(v, str) else v.decode()
    keys.check(value)
