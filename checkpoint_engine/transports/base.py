"""The lifecycle every weight transport shares.

Sender (trainer side)::

    sender.prepare(metas, buckets)        # allocate + register the region (kept while
                                          # the plan is unchanged)
    manifest = sender.publish(v, tensors) # pack, checksum -> WeightManifest for receivers
    ...                                   # receivers pull; do not publish again meanwhile
    sender.close()                        # unregister, free, remove named resources

Receiver (inside a rollout worker)::

    for name, tensor in receiver.receive(manifest):   # pulls bucket by bucket
        load(name, tensor)                            # while the next bucket arrives
    receiver.stats                                    # bytes, seconds, checksum_ok
    receiver.close()

A transport implements only region allocation and one "read bucket" primitive; the
prefetch thread, checksum verification and stats live here once. The receiver pulls the
whole update into one local region (re-used while its size is unchanged), so views it
hands out stay valid until the next ``receive``: vLLM may keep references while it
loads. Receiving is one-sided: the sender only serves reads.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from checkpoint_engine.buckets import (
    Checksum,
    group_by_bucket,
    pack_into,
    region_bytes,
    region_checksum,
    validate_layout,
    views_of_bucket,
)
from k1rl.protocol import WEIGHT_ALIGNMENT, BucketMeta, TensorMeta, WeightManifest


class TransportError(RuntimeError):
    """A weight transfer failed: peer gone, stale manifest, registration refused."""


class TransportUnavailableError(TransportError):
    """The configured transport cannot run on this host (e.g. RDMA without an HCA)."""


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
    elapsed_s: float = 0.0
    checksum_ok: bool | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.transfer_s / 1e9 if self.transfer_s else 0.0


def _alloc_size(buckets: Sequence[BucketMeta]) -> int:
    # never zero: an all-empty plan still needs a mappable, registrable region
    return max(region_bytes(buckets), WEIGHT_ALIGNMENT)


# --------------------------------------------------------------------------- sender


class WeightSender(ABC):
    """Owns the packed region receivers read from."""

    name: ClassVar[str]

    def __init__(self, *, checksum: str | None = "crc32") -> None:
        """``checksum``: digest algorithm put in every manifest ("crc32", "sha256"), or
        None to skip hashing (receivers then need ``require_checksum=False``)."""
        if checksum is not None:
            Checksum(checksum)
        self.checksum_algorithm = checksum
        self.stats: PublishStats | None = None
        self._region: torch.Tensor | None = None
        self._metas: list[TensorMeta] = []
        self._buckets: list[BucketMeta] = []
        self._closed = False

    # -- transport hooks

    @abstractmethod
    def _allocate_region(self, nbytes: int) -> torch.Tensor:
        """A zeroed uint8 tensor of ``nbytes`` that receivers can read."""

    @abstractmethod
    def _release_region(self) -> None:
        """Undo ``_allocate_region`` (the base has already dropped its reference)."""

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where receivers find the region (goes into the manifest)."""

    @property
    def base_addr(self) -> int:
        return 0

    def _shutdown(self) -> None:
        """Release transport resources beyond the region (engines, sockets)."""

    # -- lifecycle

    @property
    def region(self) -> torch.Tensor:
        """The packed bytes receivers read (for inspection; do not keep views of it)."""
        if self._region is None:
            raise RuntimeError(f"{self.name} sender has no region: call prepare() first")
        return self._region

    def prepare(self, metas: Sequence[TensorMeta], buckets: Sequence[BucketMeta]) -> bool:
        """Adopt a bucket plan; returns True when a new region was allocated.

        The region is kept while the plan is unchanged. Any other plan releases it and
        registers a fresh one, so a receiver holding a manifest of the old plan fails
        (segment gone, address unregistered) or, should the allocator hand back the same
        address, fails its checksum, instead of loading bytes laid out differently.
        """
        self._check_open()
        validate_layout(buckets, metas)
        metas, buckets = list(metas), list(buckets)
        if self._region is not None and (metas, buckets) == (self._metas, self._buckets):
            return False
        if self._region is not None:
            self._region = None
            self._release_region()
        self._metas, self._buckets = [], []
        self._region = self._allocate_region(_alloc_size(buckets))
        self._metas, self._buckets = metas, buckets
        return True

    def publish(
        self,
        version: int,
        tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    ) -> WeightManifest:
        """Pack policy ``version`` into the region and describe it for receivers.

        Receivers read the region in place, so the caller must not publish again until
        every receiver of this manifest has finished.
        """
        region = self.region
        start = time.perf_counter()
        nbytes = pack_into(region, self._buckets, self._metas, tensors)
        packed = time.perf_counter()
        checksum = None
        if self.checksum_algorithm is not None:
            checksum = region_checksum(region, self._buckets, self.checksum_algorithm)
        self.stats = PublishStats(
            version=version,
            bytes=nbytes,
            pack_s=packed - start,
            checksum_s=time.perf_counter() - packed,
        )
        return WeightManifest(
            version=version,
            transport=self.name,
            endpoint=self.endpoint,
            base_addr=self.base_addr,
            buckets=list(self._buckets),
            tensors=list(self._metas),
            checksum=checksum,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._region is not None:
            self._region = None
            self._release_region()
        self._shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} sender is closed")

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------- receiver


class BucketSource(ABC):
    """A connection to one published region, used by the prefetch thread only."""

    @abstractmethod
    def read(self, bucket: BucketMeta, dst: torch.Tensor) -> None:
        """Fill ``dst`` (the bucket's slice of the local region) with the bucket's bytes."""

    def close(self) -> None:
        """Release the connection (called once, when the prefetch thread ends)."""


class _Prefetcher:
    """Pulls every bucket in order on a thread; the consumer waits per bucket."""

    def __init__(self, source: BucketSource, manifest: WeightManifest, region: torch.Tensor):
        self.stats = ReceiveStats(version=manifest.version)
        self._source = source
        self._manifest = manifest
        self._region = region
        self._done = 0
        self._finished = False
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name=f"weight-prefetch-v{manifest.version}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self._pull_all()
        except BaseException as exc:  # handed to the consumer thread, re-raised there
            self._error = exc
        finally:
            self._source.close()
            self.stats.elapsed_s = time.perf_counter() - start
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _pull_all(self) -> None:
        manifest, stats = self._manifest, self.stats
        checksum = Checksum.for_digest(manifest.checksum) if manifest.checksum else None
        for bucket in manifest.buckets:
            if self._cancel.is_set():
                return
            dst = self._region[bucket.offset : bucket.offset + bucket.nbytes]
            t0 = time.perf_counter()
            if bucket.nbytes:
                self._source.read(bucket, dst)
            t1 = time.perf_counter()
            if checksum is not None:
                checksum.update(dst)
            stats.transfer_s += t1 - t0
            stats.checksum_s += time.perf_counter() - t1
            stats.bytes += bucket.nbytes
            stats.buckets += 1
            with self._cond:
                self._done += 1
                self._cond.notify_all()
        if checksum is not None:
            got = checksum.hexdigest()
            stats.checksum_ok = got == manifest.checksum
            if not stats.checksum_ok:
                raise WeightIntegrityError(
                    f"weights of version {manifest.version} from {manifest.endpoint} are "
                    f"corrupt: checksum {got} != manifest {manifest.checksum} "
                    f"over {stats.bytes} bytes"
                )

    def wait(self, buckets_needed: int) -> None:
        """Block until ``buckets_needed`` buckets have landed; re-raise a thread error."""
        start = time.perf_counter()
        with self._cond:
            while self._done < buckets_needed and not self._finished:
                self._cond.wait()
        self.stats.wait_s += time.perf_counter() - start
        self._raise_if_failed()

    def wait_all(self) -> None:
        """Block until the thread ended, so the checksum verdict is known."""
        start = time.perf_counter()
        self._thread.join()
        self.stats.wait_s += time.perf_counter() - start
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        # a newer receive (or close) owns the region now: these bytes are not ours any more
        if self.cancelled:
            raise TransportError(
                f"receive of version {self._manifest.version} was cancelled by a newer "
                "receive() or by close()"
            )
        if self._error is not None:
            raise self._error

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def stop(self) -> None:
        self._cancel.set()
        self._thread.join()


class WeightReceiver(ABC):
    """Pulls published weights into a local region and yields zero-copy views."""

    name: ClassVar[str]

    def __init__(self, *, require_checksum: bool = True, verify_before_load: bool = False):
        """``require_checksum``: refuse manifests without a checksum (an unverified
        update could be silently wrong). ``verify_before_load``: pull and verify every
        bucket before yielding the first tensor (no transfer/load overlap, but nothing
        corrupt ever reaches the caller). Otherwise verification finishes before any
        tensor of the last bucket is yielded, and a mismatch raises
        ``WeightIntegrityError`` from the iterator, aborting the load."""
        self.require_checksum = require_checksum
        self.verify_before_load = verify_before_load
        self.stats: ReceiveStats | None = None
        self._region: torch.Tensor | None = None
        self._prefetch: _Prefetcher | None = None
        self._closed = False

    # -- transport hooks

    @abstractmethod
    def _connect(self, manifest: WeightManifest) -> BucketSource:
        """Open the sender's region named by ``manifest``; fail here if unreachable."""

    def _allocate_region(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8)

    def _release_region(self) -> None:
        """Undo ``_allocate_region`` (the base has already dropped its reference)."""

    def _shutdown(self) -> None:
        """Release transport resources beyond the region."""

    # -- lifecycle

    @property
    def region(self) -> torch.Tensor:
        if self._region is None:
            raise RuntimeError(f"{self.name} receiver has no region: nothing received yet")
        return self._region

    def receive(self, manifest: WeightManifest | dict) -> Iterator[tuple[str, torch.Tensor]]:
        """Start pulling ``manifest``'s weights; iterate for ``(name, tensor)`` views.

        Validation and connection errors raise here; transfer and integrity errors raise
        from the iterator. A new ``receive`` cancels an unfinished previous one and
        overwrites the region its views point into.
        """
        if self._closed:
            raise RuntimeError(f"{self.name} receiver is closed")
        if not isinstance(manifest, WeightManifest):
            manifest = WeightManifest.model_validate(manifest)
        if manifest.transport != self.name:
            raise ValueError(
                f"manifest is for transport {manifest.transport!r}, this receiver is {self.name!r}"
            )
        if self.require_checksum and manifest.checksum is None:
            raise WeightIntegrityError(
                f"manifest of version {manifest.version} has no checksum; enable checksums on "
                "the sender or create the receiver with require_checksum=False"
            )
        if manifest.checksum is not None:
            Checksum.for_digest(manifest.checksum)
        validate_layout(manifest.buckets, manifest.tensors)
        self._stop_prefetch()
        self._ensure_region(_alloc_size(manifest.buckets))
        source = self._connect(manifest)
        self._prefetch = _Prefetcher(source, manifest, self.region)
        self.stats = self._prefetch.stats
        return self._consume(manifest, self._prefetch, self.region)

    def _consume(
        self, manifest: WeightManifest, prefetch: _Prefetcher, region: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        grouped = group_by_bucket(manifest.tensors)
        last = len(manifest.buckets) - 1
        try:
            if self.verify_before_load:
                prefetch.wait_all()
            for bucket in manifest.buckets:
                if bucket.index == last:
                    prefetch.wait_all()
                else:
                    prefetch.wait(bucket.index + 1)
                for item in views_of_bucket(region, bucket, grouped.get(bucket.index, [])):
                    prefetch.wait(0)
                    yield item
        finally:
            prefetch.stop()

    def _ensure_region(self, nbytes: int) -> None:
        if self._region is not None and self._region.numel() == nbytes:
            return
        if self._region is not None:
            self._region = None
            self._release_region()
        self._region = self._allocate_region(nbytes)

    def _stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_prefetch()
        if self._region is not None:
            self._region = None
            self._release_region()
        self._shutdown()

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
