"""Weight transport through a POSIX shared-memory file (same host, no network stack).

The sender's region *is* a file in ``/dev/shm`` mapped into its address space, so
packing writes straight into shared memory; the manifest's endpoint is the file name.
A receiver copies buckets out with ``preadv`` into its own region rather than mapping
the file: views of a mapping would change under the caller at the sender's next
publish, and a private copy keeps the contract every transport shares (views valid until
the next ``receive``). ``preadv`` releases the GIL and ran at 6-8 GB/s here, on par with
copying from a mapping.

The file is created 0600 with a name holding the sender's pid, unlinked on ``close()``
and, as a safety net, at interpreter exit; only a killed sender leaves it behind.
"""

from __future__ import annotations

import mmap
import os
import secrets
import weakref

import torch

from checkpoint_engine.ready import STAMP_BYTES
from checkpoint_engine.transports.base import (
    BucketSource,
    TransportError,
    WeightReceiver,
    WeightSender,
)
from k1rl.protocol import BucketMeta, WeightManifest

DEFAULT_SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "k1rl-weights"
DEFAULT_CHUNK_BYTES = 64 << 20


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_dir(shm_dir: str) -> str:
    if not os.path.isdir(shm_dir):
        raise ValueError(f"shared-memory directory {shm_dir!r} does not exist")
    return shm_dir


class ShmSender(WeightSender):
    """Packs weights into a named shared-memory file that receivers read."""

    name = "shm"

    def __init__(
        self,
        *,
        shm_dir: str = DEFAULT_SHM_DIR,
        prefix: str = DEFAULT_PREFIX,
        checksum: str | None = "xxh3_128",
    ) -> None:
        """``shm_dir``: a tmpfs directory shared with the receivers (a pod's /dev/shm
        volume). ``prefix``: start of segment names, so leftovers are recognizable."""
        if not prefix or "/" in prefix:
            raise ValueError(f"shm prefix must be a non-empty name without '/', got {prefix!r}")
        super().__init__(checksum=checksum)
        self.shm_dir = _check_dir(shm_dir)
        self.prefix = prefix
        self._segment: str | None = None
        self._mmap: mmap.mmap | None = None
        self._unlinker: weakref.finalize | None = None

    @property
    def endpoint(self) -> str:
        if self._segment is None:
            raise RuntimeError("shm sender has no segment: call prepare() first")
        return self._segment

    def _allocate_region(self, nbytes: int) -> torch.Tensor:
        segment = f"{self.prefix}-{os.getpid()}-{secrets.token_hex(6)}"
        path = os.path.join(self.shm_dir, segment)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self._unlinker = weakref.finalize(self, _unlink, path)
        try:
            os.ftruncate(fd, nbytes)
            self._mmap = mmap.mmap(fd, nbytes)
        except BaseException:
            self._unlinker()
            raise
        finally:
            os.close(fd)
        self._segment = segment
        # a fresh tmpfs file reads as zeros, so padding between tensors is deterministic
        return torch.frombuffer(self._mmap, dtype=torch.uint8)

    def _release_region(self) -> None:
        if self._unlinker is not None:
            self._unlinker()
        self._segment = None
        if self._mmap is not None:
            mapping, self._mmap = self._mmap, None
            try:
                mapping.close()
            except BufferError:
                # a caller still holds a view of the region: the mapping goes when it does;
                # the file name is already gone, so nothing can leak in shm_dir
                pass


class _ShmSource(BucketSource):
    def __init__(self, path: str, manifest: WeightManifest, chunk_bytes: int) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise TransportError(
                f"shared-memory segment {path!r} of version {manifest.version} does not exist: "
                "the sender closed or re-planned; request a fresh manifest"
            ) from None
        size = os.fstat(self._fd).st_size
        needed = max(b.offset + b.nbytes for b in manifest.buckets)
        if manifest.ready_offset is not None:
            needed = max(needed, manifest.ready_offset + STAMP_BYTES * len(manifest.buckets))
        if size < needed:
            os.close(self._fd)
            raise TransportError(
                f"shared-memory segment {path!r} has {size} bytes, the manifest of version "
                f"{manifest.version} needs {needed}: the manifest is stale"
            )
        self._path = path
        self._chunk_bytes = chunk_bytes

    def read(self, bucket: BucketMeta, dst: torch.Tensor) -> None:
        self._read(bucket.offset, dst[: bucket.nbytes], f"bucket {bucket.index}")

    def read_stamps(self, offset: int, dst: torch.Tensor) -> None:
        self._read(offset, dst, "the ready stamps")

    def _read(self, offset: int, dst: torch.Tensor, what: str) -> None:
        view = memoryview(dst.numpy())
        done, nbytes = 0, dst.numel()
        while done < nbytes:
            end = min(done + self._chunk_bytes, nbytes)
            got = os.preadv(self._fd, [view[done:end]], offset + done)
            if got <= 0:
                raise TransportError(
                    f"shared-memory segment {self._path!r} ended early while reading {what}"
                )
            done += got

    def close(self) -> None:
        os.close(self._fd)


class ShmReceiver(WeightReceiver):
    """Copies buckets out of a ShmSender's segment into a private region."""

    name = "shm"

    def __init__(
        self,
        *,
        shm_dir: str = DEFAULT_SHM_DIR,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        require_checksum: bool = True,
        verify_before_load: bool = False,
        ready_timeout_s: float = 600.0,
    ) -> None:
        """``shm_dir``: where the sender's segments live. ``chunk_bytes``: bytes per
        ``preadv`` call."""
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        super().__init__(
            require_checksum=require_checksum,
            verify_before_load=verify_before_load,
            ready_timeout_s=ready_timeout_s,
        )
        self.shm_dir = _check_dir(shm_dir)
        self.chunk_bytes = chunk_bytes

    def _connect(self, manifest: WeightManifest) -> BucketSource:
        segment = manifest.endpoint
        if not segment or "/" in segment or segment in (".", ".."):
            raise ValueError(f"shm endpoint must be a segment name, got {segment!r}")
        return _ShmSource(os.path.join(self.shm_dir, segment), manifest, self.chunk_bytes)
