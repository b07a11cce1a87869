"""Who may call a service: secrets read from files, bearer tokens, loopback-only plain mode.

A service reachable from other machines must authenticate its callers; one without a
secret configured may listen on loopback only, where every caller is on this machine.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or '*' / '0.0.0.0'-style wildcards: other machines reach it
        return False


def read_secret(path: str | Path, what: str) -> str:
    """The secret in ``path`` (surrounding whitespace dropped); ValueError naming ``what``
    when the file is missing or empty."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from e
    if not secret:
        raise ValueError(f"{what}: {path} is empty")
    return secret


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an HTTP ``Authorization`` header carries ``token`` (compared in constant
    time, so the comparison leaks nothing of the token)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())
