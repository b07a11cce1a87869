"""Per-bucket ready stamps: how a pipelined publish tells receivers a bucket is packed.

With a pipelined publish the sender hands out the manifest before it has packed the
weights, so receivers must learn per bucket when its bytes are final. The sender keeps
one 64-byte stamp per bucket right after the buckets, inside the same registered region,
and receivers read the stamps with the transport they already use (a tiny one-sided
read): no side channel, no extra connection, and it works alike for Mooncake over TCP
or RDMA and for shared memory.

A stamp is ``int64 version | int64 state | int64 digest length | pad | digest bytes``.
The sender writes the digest and version first and the state last, so a reader that
sees READY for its version also sees that bucket's digest (x86 keeps store order; a
torn read would at worst fail the digest check, never pass wrong bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k1rl.protocol import BucketMeta

STAMP_BYTES = 64
_DIGEST_AT = 32
PENDING, READY, FAILED = 0, 1, 2


def stamps_bytes(buckets: Sequence[BucketMeta]) -> int:
    return STAMP_BYTES * len(buckets)


def _stamp(area: torch.Tensor, index: int) -> torch.Tensor:
    return area[index * STAMP_BYTES : (index + 1) * STAMP_BYTES]


def reset(area: torch.Tensor, version: int) -> None:
    """Mark every bucket pending for ``version`` (before the manifest leaves the sender)."""
    words = area.view(torch.int64).view(-1, STAMP_BYTES // 8)
    words[:, 1] = PENDING
    words[:, 0] = version


def mark(area: torch.Tensor, index: int, version: int, state: int, digest: str | None) -> None:
    """Publish bucket ``index``'s state for ``version``; ``digest`` as ``"<alg>:<hex>"``."""
    stamp = _stamp(area, index)
    words = stamp.view(torch.int64)
    raw = bytes.fromhex(digest.partition(":")[2]) if digest else b""
    if len(raw) > STAMP_BYTES - _DIGEST_AT:
        raise ValueError(f"a {len(raw)}-byte digest does not fit a ready stamp")
    if raw:
        digest_bytes = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        stamp[_DIGEST_AT : _DIGEST_AT + len(raw)] = digest_bytes
    words[2] = len(raw)
    words[0] = version
    words[1] = state  # last: readers trust the fields above once they see READY


def read(area: torch.Tensor, index: int, algorithm: str | None) -> tuple[int, int, str | None]:
    """``(version, state, digest)`` of bucket ``index`` in a copy of the stamp area."""
    stamp = _stamp(area, index)
    version, state, length = (int(w) for w in stamp.view(torch.int64)[:3])
    digest = None
    if algorithm is not None and 0 < length <= STAMP_BYTES - _DIGEST_AT:
        hexed = bytes(stamp[_DIGEST_AT : _DIGEST_AT + length].numpy()).hex()
        digest = f"{algorithm}:{hexed}"
    return version, state, digest
