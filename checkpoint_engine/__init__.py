"""checkpoint_engine: moves policy weights from the trainer into rollout engines.

This package's exports are the weight-sync library that trainer_svc (sender side) and
rollout_svc (receiver side, inside a vLLM worker) import:

- planning: ``plan_buckets``, ``tensor_specs``, ``region_bytes``, ``validate_layout``
- packing / unpacking: ``pack_into``, ``BucketPacker``, ``views_of_bucket``
- integrity: ``Checksum``, ``region_checksum``, ``bucket_checksums``, ``combine_checksums``
- transports: ``get_sender`` / ``get_receiver`` by name ("mooncake", "shm"), the
  ``WeightSender`` / ``WeightReceiver`` lifecycle, and their errors and stats.
"""

from checkpoint_engine.buckets import (
    DTYPES,
    BucketPacker,
    Checksum,
    bucket_checksums,
    combine_checksums,
    dtype_name,
    pack_into,
    plan_buckets,
    region_bytes,
    region_checksum,
    tensor_specs,
    torch_dtype,
    validate_layout,
    views_of_bucket,
)
from checkpoint_engine.transports import (
    get_receiver,
    get_sender,
    known_transports,
    register_transport,
)
from checkpoint_engine.transports.base import (
    PublishStats,
    ReadersPendingError,
    ReceiveStats,
    TransportError,
    TransportUnavailableError,
    WeightIntegrityError,
    WeightReceiver,
    WeightSender,
)

__all__ = [
    "DTYPES",
    "BucketPacker",
    "Checksum",
    "PublishStats",
    "ReadersPendingError",
    "ReceiveStats",
    "TransportError",
    "TransportUnavailableError",
    "WeightIntegrityError",
    "WeightReceiver",
    "WeightSender",
    "bucket_checksums",
    "combine_checksums",
    "dtype_name",
    "get_receiver",
    "get_sender",
    "known_transports",
    "pack_into",
    "plan_buckets",
    "region_bytes",
    "region_checksum",
    "register_transport",
    "tensor_specs",
    "torch_dtype",
    "validate_layout",
    "views_of_bucket",
]
