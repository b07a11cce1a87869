"""Errors and statistics every weight transport shares."""

from __future__ import annotations

from dataclasses import dataclass


class TransportError(RuntimeError):
    """A weight transfer failed: peer gone, stale manifest, registration refused."""


class TransportUnavailableError(TransportError):
    """The configured transport cannot run on this host (e.g. RDMA without an HCA)."""


class ReadersPendingError(TransportError):
    """The region is still being read by receivers of the last publish."""


class WeightIntegrityError(TransportError):
    """Received bytes do not match the sender's checksum: the update must be rejected."""


@dataclass
class PublishStats:
    version: int
    bytes: int
    pack_s: float
    checksum_s: float


@dataclass
class ReceiveStats:
    """Filled while a receive runs; complete once its iterator is exhausted."""

    version: int
    bytes: int = 0
    buckets: int = 0
    # seconds the background thread spent moving bytes / hashing them
    transfer_s: float = 0.0
    checksum_s: float = 0.0
    # seconds the consumer blocked waiting for a bucket (transfer not hidden by loading)
    wait_s: float = 0.0
    # seconds the background thread waited for a pipelined sender to pack buckets
    ready_wait_s: float = 0.0
    elapsed_s: float = 0.0
    checksum_ok: bool | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.transfer_s / 1e9 if self.transfer_s else 0.0
