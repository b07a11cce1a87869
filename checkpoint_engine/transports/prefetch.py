"""The receiver's background puller: reads buckets in order, verifies, hands them over.

Kept apart from ``base.py`` so the receive loop (ready stamps, per-bucket digests,
cancellation) reads on its own; transports only implement :class:`BucketSource`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod

import torch

from checkpoint_engine import ready
from checkpoint_engine.buckets import Checksum, combine_checksums
from checkpoint_engine.transports.common import (
    ReceiveStats,
    TransportError,
    WeightIntegrityError,
)
from k1rl.protocol import BucketMeta, WeightManifest


class BucketSource(ABC):
    """A connection to one published region, used by the prefetch thread only."""

    @abstractmethod
    def read(self, bucket: BucketMeta, dst: torch.Tensor) -> None:
        """Fill ``dst`` (the bucket's slice of the local region) with the bucket's bytes."""

    def read_stamps(self, offset: int, dst: torch.Tensor) -> None:
        """Fill ``dst`` (the local region's slice at ``offset``) with the sender's ready
        stamps at ``offset``. Transports override this for a clearer error message."""
        self.read(BucketMeta(index=0, nbytes=dst.numel(), offset=offset), dst)

    def close(self) -> None:
        """Release the connection (called once, when the prefetch thread ends)."""


class Prefetcher:
    """Pulls every bucket in order on a thread; the consumer waits per bucket.

    With per-bucket digests (from the manifest or, for a pipelined publish, from the
    ready stamps) a bucket counts as landed only once verified, so nothing unverified
    reaches the consumer. A manifest with only a whole-update digest is verified at the
    end, and the consumer holds the last bucket back until then.
    """

    def __init__(
        self,
        source: BucketSource,
        manifest: WeightManifest,
        region: torch.Tensor,
        ready_timeout_s: float,
    ):
        self.stats = ReceiveStats(version=manifest.version)
        self._source = source
        self._manifest = manifest
        self._region = region
        self._ready_timeout_s = ready_timeout_s
        self._ready: dict[int, str | None] = {}
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
        whole = None
        if manifest.checksum and not per_bucket_digests(manifest):
            whole = Checksum.for_digest(manifest.checksum)
        digests = []
        for bucket in manifest.buckets:
            if self._cancel.is_set():
                return
            digest = bucket.checksum
            if manifest.ready_offset is not None:
                digest = self._await_ready(bucket.index)
            dst = self._region[bucket.offset : bucket.offset + bucket.nbytes]
            t0 = time.perf_counter()
            if bucket.nbytes:
                self._source.read(bucket, dst)
            t1 = time.perf_counter()
            if whole is not None:
                whole.update(dst)
            elif digest is not None:
                self._verify(bucket, dst, digest)
                digests.append(digest)
            stats.transfer_s += t1 - t0
            stats.checksum_s += time.perf_counter() - t1
            stats.bytes += bucket.nbytes
            stats.buckets += 1
            with self._cond:
                self._done += 1
                self._cond.notify_all()
        if whole is not None:
            self._verify_whole(whole.hexdigest())
        elif digests:
            if manifest.checksum and combine_checksums(digests) != manifest.checksum:
                self._corrupt(f"bucket digests do not combine to manifest {manifest.checksum}")
            stats.checksum_ok = True

    def _verify(self, bucket: BucketMeta, data: torch.Tensor, digest: str) -> None:
        got = Checksum.of(data, Checksum.for_digest(digest).algorithm)
        if got != digest:
            self._corrupt(f"bucket {bucket.index} checksum {got} != {digest}")

    def _verify_whole(self, got: str) -> None:
        if got != self._manifest.checksum:
            self._corrupt(f"checksum {got} != manifest {self._manifest.checksum}")
        self.stats.checksum_ok = True

    def _corrupt(self, what: str) -> None:
        self.stats.checksum_ok = False
        m = self._manifest
        raise WeightIntegrityError(
            f"weights of version {m.version} from {m.endpoint} are corrupt: {what} "
            f"(after {self.stats.bytes} bytes)"
        )

    def _await_ready(self, index: int) -> str | None:
        """Poll the sender's ready stamps until bucket ``index`` is packed; its digest."""
        m = self._manifest
        offset = m.ready_offset
        area = self._region[offset : offset + ready.stamps_bytes(m.buckets)]
        start = time.perf_counter()
        delay = 1e-4
        while index not in self._ready:
            if self._cancel.is_set():
                raise TransportError("receive cancelled while waiting for the sender")
            self._source.read_stamps(offset, area)
            for i in range(len(m.buckets)):
                if i not in self._ready:
                    self._read_stamp(area, i)
            if index in self._ready:
                break
            waited = time.perf_counter() - start
            if waited > self._ready_timeout_s:
                raise TransportError(
                    f"bucket {index} of version {m.version} from {m.endpoint} was not packed "
                    f"within {self._ready_timeout_s:g} s: is the sender still exporting?"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)
        self.stats.ready_wait_s += time.perf_counter() - start
        return self._ready[index]

    def _read_stamp(self, area: torch.Tensor, index: int) -> None:
        m = self._manifest
        version, state, digest = ready.read(area, index, m.bucket_checksum)
        if version > m.version:
            raise TransportError(
                f"the sender at {m.endpoint} moved on to version {version}: the manifest of "
                f"version {m.version} is stale"
            )
        if version != m.version or state == ready.PENDING:
            return
        if state == ready.FAILED:
            raise TransportError(
                f"the sender at {m.endpoint} failed while packing version {m.version} "
                "(see the trainer's log); the update is incomplete"
            )
        if m.bucket_checksum is not None and digest is None:
            self._corrupt(f"the ready stamp of bucket {index} carries no digest")
        self._ready[index] = digest

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


def per_bucket_digests(manifest: WeightManifest) -> bool:
    """True when every bucket can be verified on its own as it lands."""
    if manifest.ready_offset is not None:
        return manifest.bucket_checksum is not None
    return all(b.checksum for b in manifest.buckets)
