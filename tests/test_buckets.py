"""Bucket planning, packing and checksums of the weight region (pure, CPU only)."""

from __future__ import annotations

import hashlib
import zlib

import pytest
import torch

from checkpoint_engine import (
    DTYPES,
    Checksum,
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
from k1rl.protocol import WEIGHT_ALIGNMENT, BucketMeta, TensorMeta

HAND_SPECS = [
    ("a", "float32", [10]),  # 40 B
    ("b", "bfloat16", [3, 5]),  # 30 B
    ("c", "int64", [64]),  # 512 B: ends exactly at the 1024-byte bucket limit
    ("d", "float32", [300]),  # 1200 B: larger than a bucket
    ("e", "uint8", [1]),
]


def _mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(37, 19, generator=g),
        "layers.0.attn.weight": torch.randn(64, 33, generator=g).to(torch.bfloat16),
        "layers.0.ids": torch.randint(-(2**62), 2**62, (101,), generator=g),
        "layers.0.half": torch.randn(5, 7, generator=g).to(torch.float16),
        "scale": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "mask": torch.randint(0, 256, (333,), dtype=torch.uint8, generator=g),
        "lm_head.weight": torch.randn(300, 19, generator=g),
    }


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_hand_computed_layout():
    metas, buckets = plan_buckets(HAND_SPECS, 1024)
    assert [(m.name, m.bucket, m.offset, m.nbytes) for m in metas] == [
        ("a", 0, 0, 40),
        ("b", 0, 256, 30),
        ("c", 0, 512, 512),
        ("d", 1, 0, 1200),
        ("e", 2, 0, 1),
    ]
    assert [(b.index, b.offset, b.nbytes) for b in buckets] == [
        (0, 0, 1024),
        (1, 1024, 1200),
        (2, 2304, 1),
    ]
    assert region_bytes(buckets) == 2560


def test_offsets_aligned_order_kept_and_buckets_respect_the_limit():
    specs = [(f"t{i}", "float32", [i * 37 % 500 + 1]) for i in range(200)]
    metas, buckets = plan_buckets(specs, 4096)
    assert [m.name for m in metas] == [s[0] for s in specs]
    assert all(m.offset % WEIGHT_ALIGNMENT == 0 for m in metas)
    assert all(b.offset % WEIGHT_ALIGNMENT == 0 for b in buckets)
    assert [m.bucket for m in metas] == sorted(m.bucket for m in metas)
    assert all(b.nbytes <= 4096 for b in buckets)
    # buckets back to back: each starts at the aligned end of the previous one
    for prev, nxt in zip(buckets, buckets[1:]):
        assert nxt.offset == -(-(prev.offset + prev.nbytes) // WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT
    validate_layout(buckets, metas)


def test_oversized_tensor_gets_a_bucket_of_its_own():
    specs = [("small0", "float32", [4]), ("huge", "float32", [10_000]), ("small1", "float32", [4])]
    metas, buckets = plan_buckets(specs, 1024)
    assert [m.bucket for m in metas] == [0, 1, 2]
    assert buckets[1].nbytes == 40_000
    assert metas[1].offset == 0


def test_bad_specs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="no tensors"):
        plan_buckets([], 1024)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(HAND_SPECS, 0)
    with pytest.raises(ValueError, match="'a' appears twice"):
        plan_buckets([("a", "float32", [1]), ("a", "float32", [1])], 1024)
    with pytest.raises(ValueError, match="unsupported weight dtype 'float64'"):
        plan_buckets([("a", "float64", [1])], 1024)
    with pytest.raises(ValueError, match="negative dimension"):
        plan_buckets([("a", "float32", [2, -1])], 1024)


def test_dtype_table_round_trips_and_rejects_unknown_dtypes():
    for name, dtype in DTYPES.items():
        assert torch_dtype(name) is dtype
        assert dtype_name(dtype) == name
    with pytest.raises(ValueError, match="float64"):
        dtype_name(torch.float64)


def test_pack_then_view_round_trip_is_byte_exact_and_zero_copy():
    tensors = _mixed_tensors()
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), 2048)
    assert len(buckets) > 2
    region = torch.zeros(region_bytes(buckets), dtype=torch.uint8)
    packed = pack_into(region, buckets, metas, iter(tensors.items()))
    assert packed == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = {}
    lo, hi = region.data_ptr(), region.data_ptr() + region.numel()
    for bucket in buckets:
        for name, view in views_of_bucket(region, bucket, metas):
            assert view.dtype == tensors[name].dtype and view.shape == tensors[name].shape
            assert view.numel() == 0 or lo <= view.data_ptr() < hi
            seen[name] = view
    assert seen.keys() == tensors.keys()
    for name, t in tensors.items():
        assert _as_bytes(seen[name]) == _as_bytes(t), name


def test_views_of_a_buffer_holding_only_one_bucket():
    tensors = _mixed_tensors()
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), 2048)
    region = torch.zeros(region_bytes(buckets), dtype=torch.uint8)
    pack_into(region, buckets, metas, tensors)
    last = buckets[-1]
    alone = region[last.offset : last.offset + last.nbytes].clone()
    views = dict(views_of_bucket(alone, last, metas, bucket_start=0))
    assert views and all(_as_bytes(v) == _as_bytes(tensors[n]) for n, v in views.items())


def test_pack_rejects_tensors_that_do_not_match_the_plan():
    tensors = _mixed_tensors()
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), 2048)
    region = torch.zeros(region_bytes(buckets), dtype=torch.uint8)
    with pytest.raises(ValueError, match="1 planned tensor.s. were not given: scale"):
        pack_into(region, buckets, metas, {k: v for k, v in tensors.items() if k != "scale"})
    with pytest.raises(ValueError, match="'extra' is not in the weight plan"):
        pack_into(region, buckets, metas, {**tensors, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="the plan says bfloat16"):
        pack_into(region, buckets, metas, {**tensors, "layers.0.attn.weight": torch.zeros(64, 33)})
    with pytest.raises(ValueError, match=r"the plan says float32\[37, 19\]"):
        pack_into(region, buckets, metas, {**tensors, "embed.weight": torch.zeros(19, 37)})
    with pytest.raises(ValueError, match="weight region has 16 bytes"):
        pack_into(region[:16], buckets, metas, tensors)


def test_validate_layout_names_the_broken_tensor():
    bucket = BucketMeta(index=0, nbytes=512, offset=0)
    fine = TensorMeta(name="w", dtype="float32", shape=[64], bucket=0, offset=256, nbytes=256)
    validate_layout([bucket], [fine])
    past_end = fine.model_copy(update={"shape": [128], "nbytes": 512})
    with pytest.raises(ValueError, match="'w' ends at byte 768, past the end of bucket 0"):
        validate_layout([bucket], [past_end])
    with pytest.raises(ValueError, match="'w' says 100 bytes"):
        validate_layout([bucket], [fine.model_copy(update={"nbytes": 100})])
    with pytest.raises(ValueError, match="bucket 3, which does not exist"):
        validate_layout([bucket], [fine.model_copy(update={"bucket": 3})])


@pytest.mark.parametrize("algorithm", ["crc32", "sha256"])
def test_checksum_covers_exactly_the_bucket_bytes(algorithm):
    tensors = _mixed_tensors()
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), 2048)
    region = torch.zeros(region_bytes(buckets), dtype=torch.uint8)
    pack_into(region, buckets, metas, tensors)
    data = b"".join(_as_bytes(region[b.offset : b.offset + b.nbytes]) for b in buckets)
    if algorithm == "crc32":
        expected = f"{zlib.crc32(data):08x}"
    else:
        expected = hashlib.sha256(data).hexdigest()
    digest = region_checksum(region, buckets, algorithm)
    assert digest == f"{algorithm}:{expected}"
    assert Checksum.for_digest(digest).algorithm == algorithm
    # bytes between buckets are padding: not covered; bytes inside a bucket are
    gap = buckets[0].offset + buckets[0].nbytes
    assert gap < buckets[1].offset
    region[gap] = 7
    assert region_checksum(region, buckets, algorithm) == digest
    region[buckets[-1].offset] ^= 1
    assert region_checksum(region, buckets, algorithm) != digest


def test_unknown_checksum_algorithm_is_rejected():
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md4'"):
        Checksum("md4")
    with pytest.raises(ValueError, match="not of the form"):
        Checksum.for_digest("deadbeef")


def test_xxh3_bucket_digests_cover_each_bucket_and_combine_per_update():
    import xxhash

    from checkpoint_engine import bucket_checksums, combine_checksums

    tensors = _mixed_tensors()
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), 2048)
    region = torch.zeros(region_bytes(buckets), dtype=torch.uint8)
    pack_into(region, buckets, metas, tensors)
    digested = bucket_checksums(region, buckets, "xxh3_128")
    for b in digested:
        data = _as_bytes(region[b.offset : b.offset + b.nbytes])
        assert b.checksum == f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}"
        assert b.model_copy(update={"checksum": None}) == buckets[b.index]
    combined = combine_checksums(b.checksum for b in digested)
    assert combined.startswith("xxh3_128:")
    region[buckets[-1].offset] ^= 1
    changed = bucket_checksums(region, buckets, "xxh3_128")
    assert [b.checksum for b in changed[:-1]] == [b.checksum for b in digested[:-1]]
    assert changed[-1].checksum != digested[-1].checksum
    assert combine_checksums(b.checksum for b in changed) != combined


def test_packer_reports_each_bucket_when_its_last_tensor_arrives():
    from checkpoint_engine import BucketPacker

    tensors = _mixed_tensors()
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), 2048)
    assert len(buckets) > 2
    region = torch.zeros(region_bytes(buckets), dtype=torch.uint8)
    first_of, last_of = {}, {}
    for m in metas:
        first_of.setdefault(m.bucket, m.name)
        last_of[m.bucket] = m.name

    in_order = BucketPacker(region, buckets, metas)
    assert in_order.empty_buckets() == []
    done = {name: in_order.add(name, t) for name, t in tensors.items()}
    assert {n: b for n, b in done.items() if b is not None} == {last_of[b]: b for b in last_of}
    assert in_order.finish() == sum(m.nbytes for m in metas)

    # in any order: a bucket completes with whichever of its tensors comes last
    reverse = BucketPacker(region, buckets, metas)
    done = {name: reverse.add(name, t) for name, t in reversed(list(tensors.items()))}
    assert {n: b for n, b in done.items() if b is not None} == {first_of[b]: b for b in first_of}

    incomplete = BucketPacker(region, buckets, metas)
    incomplete.add("embed.weight", tensors["embed.weight"])
    with pytest.raises(ValueError, match=r"7 planned tensor\(s\) were not given"):
        incomplete.finish()
