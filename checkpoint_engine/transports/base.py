"""The lifecycle every weight transport shares.

Sender (trainer side)::

    sender.prepare(metas, buckets)        # allocate + register the region (kept while
                                          # the plan is unchanged)
    manifest = sender.publish(v, tensors, receivers=["engine-a", "engine-b"])
    ...                                   # receivers pull (in parallel: reads are one-sided)
    sender.release(v, "engine-a")         # each one done, or declared dead; until all are,
    sender.release(v, "engine-b", dead=True)  # publish and prepare refuse to touch the region
    sender.close()                        # unregister, free, remove named resources

    manifest = sender.publish(v, tensors, pipelined=True)  # returns at once, packs on a
    ...                                   # thread; receivers wait per bucket for its stamp
    sender.wait_published()               # before touching what ``tensors`` reads

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
from typing import Any, ClassVar

import torch

from checkpoint_engine import ready
from checkpoint_engine.buckets import (
    BucketPacker,
    Checksum,
    bucket_checksums,
    combine_checksums,
    group_by_bucket,
    pack_into,
    region_bytes,
    validate_layout,
    views_of_bucket,
)
from checkpoint_engine.transports.common import (
    PublishStats,
    ReceiveStats,
    ReadersPendingError,
    TransportError,
    TransportUnavailableError,
    WeightIntegrityError,
)
from checkpoint_engine.transports.prefetch import BucketSource, Prefetcher, per_bucket_digests
from k1rl.protocol import WEIGHT_ALIGNMENT, BucketMeta, TensorMeta, WeightManifest


def _alloc_size(buckets: Sequence[BucketMeta], with_stamps: bool = False) -> int:
    # never zero: an all-empty plan still needs a mappable, registrable region
    stamps = ready.stamps_bytes(buckets) if with_stamps else 0
    return max(region_bytes(buckets) + stamps, WEIGHT_ALIGNMENT)


__all__ = [
    "BucketSource",
    "PublishStats",
    "ReadersPendingError",
    "ReceiveStats",
    "TransportError",
    "TransportUnavailableError",
    "WeightIntegrityError",
    "WeightReceiver",
    "WeightSender",
]

# --------------------------------------------------------------------------- sender


class WeightSender(ABC):
    """Owns the packed region receivers read from."""

    name: ClassVar[str]

    def __init__(self, *, checksum: str | None = "xxh3_128") -> None:
        """``checksum``: digest algorithm for every bucket ("xxh3_128", "xxh3_64",
        "crc32", "sha256"), or None to skip hashing (receivers then need
        ``require_checksum=False``)."""
        if checksum is not None:
            Checksum(checksum)
        self.checksum_algorithm = checksum
        self.stats: PublishStats | None = None
        self._region: torch.Tensor | None = None
        self._metas: list[TensorMeta] = []
        self._buckets: list[BucketMeta] = []
        self._closed = False
        self._packing: threading.Thread | None = None
        self._pack_error: BaseException | None = None
        self._cancel_pack = threading.Event()
        # receivers of the last publish that have not released it, and those declared dead
        self._readers: set[str] = set()
        self._readers_version = -1
        self.dead_receivers: set[str] = set()

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
        self.wait_published()
        validate_layout(buckets, metas)
        metas = list(metas)
        buckets = [b.model_copy(update={"checksum": None}) for b in buckets]
        if self._region is not None and (metas, buckets) == (self._metas, self._buckets):
            return False
        self._check_no_readers("allocating a new region")
        if self._region is not None:
            self._region = None
            self._release_region()
        self._metas, self._buckets = [], []
        self._region = self._allocate_region(_alloc_size(buckets, with_stamps=True))
        self._metas, self._buckets = metas, buckets
        return True

    def publish(
        self,
        version: int,
        tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
        *,
        pipelined: bool = False,
        receivers: Iterable[str] = (),
    ) -> WeightManifest:
        """Pack policy ``version`` into the region and describe it for receivers.

        Every bucket gets its own digest, so receivers verify each bucket as it lands.
        ``pipelined``: return the manifest at once and pack on a background thread;
        each bucket's ready stamp flips as it is packed, and receivers wait for it, so
        the export overlaps the transfer and the receivers' load. Until the pack has
        ended (``wait_published``), ``tensors`` is being consumed on that thread: the
        caller must not change what it yields (e.g. run an optimizer step).

        Receivers read the region in place: each of ``receivers`` (any names) must be
        :meth:`release`-d, done or declared dead, before the region is written again;
        until then ``publish`` and a ``prepare`` that reallocates raise
        :class:`ReadersPendingError`. A publish without receivers is the caller's to order.
        """
        self.wait_published()
        self._check_no_readers(f"publishing v{version}")
        region = self.region
        self._readers, self._readers_version = set(receivers), version
        if not pipelined:
            return self._publish_now(version, region, tensors)
        stamps = region[region_bytes(self._buckets) :]
        ready.reset(stamps, version)
        self._cancel_pack.clear()
        self._packing = threading.Thread(
            target=self._pack_in_background,
            args=(version, region, stamps, tensors, _current_cuda_device()),
            name=f"weight-pack-v{version}",
            daemon=True,
        )
        self._packing.start()
        return self._manifest(
            version,
            self._buckets,
            None,
            ready_offset=region_bytes(self._buckets),
            bucket_checksum=self.checksum_algorithm,
        )

    def wait_published(self, timeout: float | None = None) -> PublishStats | None:
        """Block until a pipelined pack has ended; re-raise its error (once).

        Returns the stats of the last publish. A timeout raises ``TimeoutError`` and
        leaves the pack running.
        """
        thread = self._packing
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"{self.name} sender still packing after {timeout} s")
            self._packing = None
        error, self._pack_error = self._pack_error, None
        if error is not None:
            raise TransportError(f"pipelined weight publish failed: {error}") from error
        return self.stats

    def release(self, version: int, receiver: str, *, dead: bool = False) -> None:
        """``receiver`` has finished reading ``version``, or (``dead``) will never say so and
        is not waited for. A release of another version than the last publish's is stale
        and ignored."""
        if version != self._readers_version:
            return
        self._readers.discard(receiver)
        if dead:
            self.dead_receivers.add(receiver)

    def abandon_readers(self) -> list[str]:
        """Declare every receiver still reading the last publish dead; returns them."""
        readers = self.readers
        for receiver in readers:
            self.release(self._readers_version, receiver, dead=True)
        return readers

    @property
    def readers(self) -> list[str]:
        """Receivers still reading the last publish."""
        return sorted(self._readers)

    def _check_no_readers(self, action: str) -> None:
        if self._readers:
            raise ReadersPendingError(
                f"{action} would overwrite policy v{self._readers_version} while "
                f"{', '.join(self.readers)} may still read it: release each receiver "
                "(done, or declared dead) first")

    @property
    def packing(self) -> bool:
        """True while a pipelined publish is still packing."""
        return self._packing is not None and self._packing.is_alive()

    def _publish_now(self, version: int, region: torch.Tensor, tensors: Any) -> WeightManifest:
        start = time.perf_counter()
        nbytes = pack_into(region, self._buckets, self._metas, tensors)
        packed = time.perf_counter()
        buckets, checksum = self._buckets, None
        if self.checksum_algorithm is not None:
            buckets = bucket_checksums(region, self._buckets, self.checksum_algorithm)
            checksum = combine_checksums(b.checksum for b in buckets)
        self.stats = PublishStats(
            version=version,
            bytes=nbytes,
            pack_s=packed - start,
            checksum_s=time.perf_counter() - packed,
        )
        return self._manifest(version, buckets, checksum)

    def _pack_in_background(
        self,
        version: int,
        region: torch.Tensor,
        stamps: torch.Tensor,
        tensors: Any,
        cuda_device: int | None,
    ) -> None:
        if cuda_device is not None:
            # a new thread starts on GPU 0: the export's copies and gathers must run on the
            # caller's GPU
            torch.cuda.set_device(cuda_device)
        stats = PublishStats(version=version, bytes=0, pack_s=0.0, checksum_s=0.0)
        start = time.perf_counter()
        marked: set[int] = set()
        try:
            packer = BucketPacker(region, self._buckets, self._metas)
            for index in packer.empty_buckets():
                stats.checksum_s += self._mark_ready(region, stamps, index, version)
                marked.add(index)
            items = tensors.items() if isinstance(tensors, dict) else tensors
            for name, tensor in items:
                if self._cancel_pack.is_set():
                    raise TransportError("the sender was closed while packing")
                index = packer.add(name, tensor)
                if index is not None:
                    stats.checksum_s += self._mark_ready(region, stamps, index, version)
                    marked.add(index)
            stats.bytes = packer.finish()
        except BaseException as exc:  # receivers learn from their stamps, the caller here
            self._pack_error = exc
            for index in range(len(self._buckets)):
                if index not in marked:
                    ready.mark(stamps, index, version, ready.FAILED, None)
        stats.pack_s = time.perf_counter() - start - stats.checksum_s
        self.stats = stats

    def _mark_ready(self, region: torch.Tensor, stamps: torch.Tensor, index: int, version: int):
        start = time.perf_counter()
        digest = None
        if self.checksum_algorithm is not None:
            bucket = self._buckets[index]
            data = region[bucket.offset : bucket.offset + bucket.nbytes]
            digest = Checksum.of(data, self.checksum_algorithm)
        ready.mark(stamps, index, version, ready.READY, digest)
        return time.perf_counter() - start

    def _manifest(
        self, version: int, buckets: list[BucketMeta], checksum: str | None, **extra: Any
    ) -> WeightManifest:
        return WeightManifest(
            version=version,
            transport=self.name,
            endpoint=self.endpoint,
            base_addr=self.base_addr,
            buckets=list(buckets),
            tensors=list(self._metas),
            checksum=checksum,
            **extra,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_pack.set()
        if self._packing is not None:
            # the tensor stream may block (e.g. a collective with a dead peer): don't hang
            self._packing.join(30)
            self._packing = None
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


def _current_cuda_device() -> int | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def _validate_stamps(manifest: WeightManifest) -> None:
    offset = manifest.ready_offset
    if offset is not None and (offset % 8 or offset < region_bytes(manifest.buckets)):
        raise ValueError(
            f"manifest ready_offset {offset} is unaligned or inside the buckets "
            f"(which end at {region_bytes(manifest.buckets)})"
        )


def _receiver_alloc_size(manifest: WeightManifest) -> int:
    # the stamps land at the sender's offsets, so the local region mirrors its layout
    size = _alloc_size(manifest.buckets)
    if manifest.ready_offset is not None:
        size = max(size, manifest.ready_offset + ready.stamps_bytes(manifest.buckets))
    return size


class WeightReceiver(ABC):
    """Pulls published weights into a local region and yields zero-copy views."""

    name: ClassVar[str]

    def __init__(
        self,
        *,
        require_checksum: bool = True,
        verify_before_load: bool = False,
        ready_timeout_s: float = 600.0,
    ):
        """``require_checksum``: refuse manifests without a checksum (an unverified
        update could be silently wrong). ``verify_before_load``: pull and verify every
        bucket before yielding the first tensor (no transfer/load overlap, and no part
        of a corrupt update is loaded). Otherwise each bucket is verified before its
        tensors are yielded (per-bucket digests; with only a whole-update digest,
        before any tensor of the last bucket), and a mismatch raises
        ``WeightIntegrityError`` from the iterator, aborting the load.
        ``ready_timeout_s``: how long to wait for a pipelined sender to pack a bucket."""
        if ready_timeout_s <= 0:
            raise ValueError(f"ready_timeout_s must be positive, got {ready_timeout_s}")
        self.require_checksum = require_checksum
        self.verify_before_load = verify_before_load
        self.ready_timeout_s = ready_timeout_s
        self.stats: ReceiveStats | None = None
        self._region: torch.Tensor | None = None
        self._prefetch: Prefetcher | None = None
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
        if self.require_checksum and manifest.checksum is None and not per_bucket_digests(
            manifest
        ):
            raise WeightIntegrityError(
                f"manifest of version {manifest.version} has no checksum; enable checksums on "
                "the sender or create the receiver with require_checksum=False"
            )
        for digest in (manifest.checksum, *(b.checksum for b in manifest.buckets)):
            if digest is not None:
                Checksum.for_digest(digest)
        if manifest.bucket_checksum is not None:
            Checksum(manifest.bucket_checksum)
        validate_layout(manifest.buckets, manifest.tensors)
        _validate_stamps(manifest)
        self._stop_prefetch()
        self._ensure_region(_receiver_alloc_size(manifest))
        source = self._connect(manifest)
        self._prefetch = Prefetcher(source, manifest, self.region, self.ready_timeout_s)
        self.stats = self._prefetch.stats
        return self._consume(manifest, self._prefetch, self.region)

    def _consume(
        self, manifest: WeightManifest, prefetch: Prefetcher, region: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        grouped = group_by_bucket(manifest.tensors)
        # without per-bucket digests the last bucket waits for the whole-update verdict
        last = len(manifest.buckets) - (0 if per_bucket_digests(manifest) else 1)
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
            prefetch.wait_all()
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
