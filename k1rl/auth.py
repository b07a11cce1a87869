"""Who may call a service: secrets read from files, bearer tokens, the run's CURVE keys,
loopback-only plain mode.

A service reachable from other machines must authenticate its callers; one without a
secret configured may listen on loopback only, where every caller is on this machine.
ZMQ traffic between k1rl processes is CURVE-encrypted and authenticated when
``K1RL_CURVE_KEYS`` names a directory holding the run's keypair (`k1rl keys create DIR`;
on Kubernetes a Secret mounted into every container).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
from dataclasses import dataclass
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


# ------------------------------------------------------------------- ZMQ CURVE keys

CURVE_KEYS_ENV = "K1RL_CURVE_KEYS"
KEY_NAME = "run"  # run.key (public certificate) and run.key_secret in the keys directory


@dataclass(frozen=True)
class CurveKeys:
    """The run's CURVE identity: every k1rl process of a run holds the same keypair, so a
    server knows its clients' key and a client its server's. A server admits the public
    certificates (``*.key``) of ``directory``: the run's own, and any an operator adds."""

    directory: Path
    public: bytes
    secret: bytes


def create_curve_keys(directory: str | Path) -> Path:
    """A new run keypair in ``directory`` (created; the secret file readable by its owner
    only). Returns the directory: what ``K1RL_CURVE_KEYS`` names."""
    import zmq.auth

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / f"{KEY_NAME}.key_secret").exists():
        raise FileExistsError(f"{directory} holds a run keypair already")
    _, secret = zmq.auth.create_certificates(directory, KEY_NAME)
    os.chmod(secret, 0o600)
    return directory


@functools.lru_cache(maxsize=4)
def _load_curve_keys(directory: str) -> CurveKeys:
    import zmq.auth

    path = Path(directory) / f"{KEY_NAME}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{CURVE_KEYS_ENV}={directory}: cannot read the run keypair {path} "
                         f"({e}); create one with `k1rl keys create DIR`") from e
    if secret is None:
        raise ValueError(f"{CURVE_KEYS_ENV}={directory}: {path} holds no secret key")
    return CurveKeys(Path(directory), public, secret)


def curve_keys() -> CurveKeys | None:
    """The run keypair named by ``K1RL_CURVE_KEYS`` (None: plain mode, loopback only)."""
    directory = os.environ.get(CURVE_KEYS_ENV)
    return _load_curve_keys(directory) if directory else None


def endpoint_is_local(address: str) -> bool:
    """Whether a ZMQ endpoint is reachable from this machine only (loopback TCP, ipc,
    inproc)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return is_loopback(host)
