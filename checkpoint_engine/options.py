"""Map the run's WeightSyncConfig onto transport constructor options, in one place."""

from __future__ import annotations

from typing import Any, Literal

from k1rl.config import WeightSyncConfig


def transport_options(cfg: WeightSyncConfig, role: Literal["sender", "receiver"]) -> dict[str, Any]:
    """Keyword arguments for ``get_sender``/``get_receiver(cfg.transport, **options)``."""
    verify = cfg.verify == "checksum"
    opts: dict[str, Any] = {}
    if cfg.transport == "mooncake":
        opts.update(host=cfg.host, protocol=cfg.mooncake_protocol, device_name=cfg.rdma_device)
    if role == "sender":
        # xxh3 hashes ~5x faster than crc32 here, with the same purpose (see buckets.py)
        opts["checksum"] = "xxh3_128" if verify else None
    else:
        opts["require_checksum"] = verify
    return opts
