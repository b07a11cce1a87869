"""Weight transports: registry, receive semantics, and real two-process transfers.

The two-process tests run the sender in a spawned process (as the trainer would) and
pass the manifest over a pipe as ``model_dump()``, exactly what crosses the wire.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
import uuid
from pathlib import Path

import pytest
import torch

from checkpoint_engine import (
    ReadersPendingError,
    TransportError,
    TransportUnavailableError,
    WeightIntegrityError,
    get_receiver,
    get_sender,
    known_transports,
    plan_buckets,
    tensor_specs,
)
from checkpoint_engine.transports.shm import ShmReceiver, ShmSender
from k1rl.protocol import WeightManifest

SHM_DIR = "/dev/shm"
MiB = 1 << 20


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*flat)


def _big_tensors(seed: int) -> dict[str, torch.Tensor]:
    """~105 MB of mixed-dtype weights whose values depend on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(4096, 4096, generator=g),
        "model.layers.0.mlp.weight": torch.randn(4096, 2048, generator=g).to(torch.bfloat16),
        "model.layers.0.attn.weight": torch.randn(2048, 2560, generator=g),
        "model.layers.0.positions": torch.randint(-(2**62), 2**62, (1000,), generator=g),
        "model.norm.weight": torch.randn(4096, generator=g),
    }


def _small_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(300, 70, generator=g),
        "b": torch.randn(129, 31, generator=g).to(torch.bfloat16),
        "c": torch.randint(0, 2**40, (77,), generator=g),
        "d": torch.randn(1000, generator=g),
        "e": torch.randn(3, 3, generator=g),
    }


SMALL_BUCKET = 8 * 1024
TENSOR_SETS = {"big": (_big_tensors, 32 * MiB), "small": (_small_tensors, SMALL_BUCKET)}


# ----------------------------------------------------------------- sender process


def _sender_main(conn, transport: str, opts: dict, tensor_set: str) -> None:
    """A trainer-like process: plans once, publishes versions, obeys test commands."""
    make, bucket_bytes = TENSOR_SETS[tensor_set]
    sender = get_sender(transport, **opts)
    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "publish":
                version, seed = arg
                tensors = make(seed)
                sender.prepare(*plan_buckets(tensor_specs(tensors.items()), bucket_bytes))
                manifest = sender.publish(version, tensors)
                conn.send(("ok", (manifest.model_dump(), sender.region.data_ptr())))
            elif cmd == "corrupt":
                sender.region[arg] ^= 0xFF
                conn.send(("ok", None))
            elif cmd == "close":
                sender.close()
                conn.send(("ok", None))
            elif cmd == "exit":  # leave without close(): exit-time cleanup must still run
                conn.send(("ok", None))
                return
        except Exception:
            conn.send(("error", traceback.format_exc()))


class RemoteSender:
    def __init__(self, transport: str, opts: dict, tensor_set: str = "big") -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_sender_main, args=(child, transport, opts, tensor_set), daemon=True
        )
        self.process.start()

    def call(self, cmd: str, arg=None):
        self._conn.send((cmd, arg))
        if not self._conn.poll(180):
            raise TimeoutError(f"sender process did not answer {cmd!r}")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"sender process failed on {cmd!r}:\n{value}")
        return value

    def publish(self, version: int, seed: int) -> tuple[dict, int]:
        return self.call("publish", (version, seed))

    def stop(self) -> None:
        if self.process.is_alive():
            self.call("exit")
        self.process.join(30)


def _options(transport: str, prefix: str) -> tuple[dict, dict]:
    if transport == "shm":
        return {"prefix": prefix}, {}
    return {"host": "127.0.0.1"}, {"host": "127.0.0.1"}


def _segments(prefix: str) -> list[str]:
    return [p.name for p in Path(SHM_DIR).iterdir() if p.name.startswith(prefix)]


@pytest.fixture(scope="module", params=["shm", "mooncake"])
def remote(request):
    prefix = f"k1rl-test-{uuid.uuid4().hex[:8]}"
    sender_opts, receiver_opts = _options(request.param, prefix)
    sender = RemoteSender(request.param, sender_opts)
    receiver = get_receiver(request.param, **receiver_opts)
    yield sender, receiver
    receiver.close()
    sender.call("close")
    sender.stop()
    assert _segments(prefix) == []


def _receive_and_compare(receiver, manifest: dict, expected: dict[str, torch.Tensor]) -> None:
    names = []
    for name, tensor in receiver.receive(manifest):
        assert _bytes_equal(tensor, expected[name]), name
        names.append(name)
    assert names == list(expected)


# --------------------------------------------------------------- two-process tests


@pytest.mark.slow
def test_moves_100mb_between_processes_byte_exact(remote):
    sender, receiver = remote
    manifest, _ = sender.publish(1, seed=1)
    assert WeightManifest.model_validate(manifest).total_bytes >= 100_000_000
    _receive_and_compare(receiver, manifest, _big_tensors(1))
    stats = receiver.stats
    assert stats.checksum_ok is True and stats.bytes == WeightManifest(**manifest).total_bytes
    print(
        f"\n{receiver.name}: {stats.bytes / 1e6:.0f} MB in {stats.transfer_s:.3f} s transfer "
        f"= {stats.gbps:.2f} GB/s; checksum {stats.checksum_s:.3f} s; "
        f"wall {stats.elapsed_s:.3f} s"
    )


@pytest.mark.slow
def test_second_version_reuses_both_regions(remote):
    sender, receiver = remote
    manifest1, sender_ptr1 = sender.publish(1, seed=1)
    views1 = dict(receiver.receive(manifest1))
    receiver_ptr = receiver.region.data_ptr()
    # views of version 1 stay valid until the next receive
    assert _bytes_equal(views1["model.norm.weight"], _big_tensors(1)["model.norm.weight"])
    manifest2, sender_ptr2 = sender.publish(2, seed=2)
    assert sender_ptr2 == sender_ptr1
    assert manifest2["endpoint"] == manifest1["endpoint"]
    assert manifest2["base_addr"] == manifest1["base_addr"]
    assert manifest2["checksum"] != manifest1["checksum"]
    _receive_and_compare(receiver, manifest2, _big_tensors(2))
    assert receiver.region.data_ptr() == receiver_ptr
    assert receiver.stats.version == 2


@pytest.mark.slow
def test_corrupted_sender_region_raises_integrity_error(remote):
    sender, receiver = remote
    manifest, _ = sender.publish(3, seed=3)
    first = manifest["tensors"][0]
    sender.call("corrupt", manifest["buckets"][first["bucket"]]["offset"] + first["offset"] + 999)
    last_bucket = len(manifest["buckets"]) - 1
    last_names = {t["name"] for t in manifest["tensors"] if t["bucket"] == last_bucket}
    yielded = []
    with pytest.raises(WeightIntegrityError, match="version 3 .* corrupt"):
        for name, _ in receiver.receive(manifest):
            yielded.append(name)
    assert not last_names & set(yielded), "a tensor of the last bucket got out unverified"
    assert receiver.stats.checksum_ok is False


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "mooncake"])
def test_closed_sender_cleans_up_and_stale_manifest_fails(transport):
    prefix = f"k1rl-test-{uuid.uuid4().hex[:8]}"
    sender_opts, receiver_opts = _options(transport, prefix)
    sender = RemoteSender(transport, sender_opts, tensor_set="small")
    try:
        with get_receiver(transport, **receiver_opts) as receiver:
            manifest, _ = sender.publish(1, seed=5)
            _receive_and_compare(receiver, manifest, _small_tensors(5))
            sender.call("close")
            assert _segments(prefix) == []
            with pytest.raises(TransportError, match="does not|stale"):
                list(receiver.receive(manifest))
    finally:
        sender.stop()


@pytest.mark.slow
def test_shm_segment_removed_when_sender_exits_without_close():
    prefix = f"k1rl-test-{uuid.uuid4().hex[:8]}"
    sender = RemoteSender("shm", {"prefix": prefix}, tensor_set="small")
    manifest, _ = sender.publish(1, seed=6)
    assert _segments(prefix) == [manifest["endpoint"]]
    sender.stop()
    assert sender.process.exitcode == 0
    assert _segments(prefix) == []


# --------------------------------------------------------------- in-process tests


@pytest.fixture
def shm_pair():
    prefix = f"k1rl-test-{uuid.uuid4().hex[:8]}"
    sender = ShmSender(prefix=prefix)
    receiver = ShmReceiver()
    yield sender, receiver
    receiver.close()
    sender.close()
    assert _segments(prefix) == []


def _publish_small(sender, version: int, seed: int):
    tensors = _small_tensors(seed)
    sender.prepare(*plan_buckets(tensor_specs(tensors.items()), SMALL_BUCKET))
    return sender.publish(version, tensors), tensors


def test_registry_builds_transports_by_name_and_lists_known_ones():
    assert {"mooncake", "shm"} <= set(known_transports())
    with get_sender("shm") as sender, get_receiver("shm") as receiver:
        assert isinstance(sender, ShmSender) and isinstance(receiver, ShmReceiver)
    with pytest.raises(ValueError, match="unknown weight transport 'nccl'; known: .*mooncake.*shm"):
        get_sender("nccl")
    with pytest.raises(TypeError, match="bad options for the 'shm' weight receiver.*chunk_bytes"):
        get_receiver("shm", chunk_size=4)


def test_topology_parsing_finds_hcas_only_when_listed():
    from checkpoint_engine.transports.mooncake import rdma_devices

    assert rdma_devices('{"cpu:0": [[], []]}') == []
    listed = '{"cpu:0": [["mlx5_1"], ["mlx5_0"]], "cuda:0": [["mlx5_0"], []]}'
    assert rdma_devices(listed) == ["mlx5_0", "mlx5_1"]
    with pytest.raises(TransportError, match="unreadable Mooncake topology"):
        rdma_devices("not json")


def test_rdma_is_refused_without_an_hca():
    if Path("/sys/class/infiniband").is_dir() and any(Path("/sys/class/infiniband").iterdir()):
        pytest.skip("this host has RDMA devices")
    with pytest.raises(TransportUnavailableError, match="no RDMA HCA"):
        get_sender("mooncake", protocol="rdma")
    with pytest.raises(TransportUnavailableError, match="no RDMA HCA"):
        get_receiver("mooncake", protocol="rdma")
    with pytest.raises(ValueError, match="unknown Mooncake protocol 'efa'"):
        get_sender("mooncake", protocol="efa")


def test_plan_change_reallocates_and_same_plan_reuses(shm_pair):
    sender, receiver = shm_pair
    manifest1, tensors = _publish_small(sender, 1, seed=0)
    assert not sender.prepare(*plan_buckets(tensor_specs(tensors.items()), SMALL_BUCKET))
    grown = {**tensors, "f": torch.zeros(4096)}
    assert sender.prepare(*plan_buckets(tensor_specs(grown.items()), SMALL_BUCKET))
    manifest2 = sender.publish(2, grown)
    assert manifest2.endpoint != manifest1.endpoint
    # a different plan of the same size still gets a fresh segment: old manifests must fail
    reordered = dict(reversed(list(grown.items())))
    assert sender.prepare(*plan_buckets(tensor_specs(reordered.items()), SMALL_BUCKET))
    assert sender.publish(3, reordered).endpoint != manifest2.endpoint
    with pytest.raises(TransportError, match="does not exist"):
        receiver.receive(manifest2)


def test_verify_before_load_yields_nothing_from_a_corrupt_update(shm_pair):
    sender, _ = shm_pair
    manifest, _ = _publish_small(sender, 1, seed=0)
    assert len(manifest.buckets) > 2
    sender.region[manifest.buckets[0].offset] ^= 0x01
    receiver = ShmReceiver(verify_before_load=True)
    yielded = []
    with pytest.raises(WeightIntegrityError):
        for item in receiver.receive(manifest):
            yielded.append(item)
    assert yielded == []
    receiver.close()


def test_manifest_without_checksum_is_refused_unless_allowed(shm_pair):
    _, receiver = shm_pair
    with ShmSender(checksum=None) as sender, ShmReceiver(require_checksum=False) as lenient:
        manifest, tensors = _publish_small(sender, 1, seed=0)
        assert manifest.checksum is None
        with pytest.raises(WeightIntegrityError, match="has no checksum"):
            receiver.receive(manifest)
        _receive_and_compare(lenient, manifest.model_dump(), tensors)
        assert lenient.stats.checksum_ok is None


def test_manifest_for_another_transport_is_refused(shm_pair):
    sender, receiver = shm_pair
    manifest, _ = _publish_small(sender, 1, seed=0)
    manifest.transport = "mooncake"
    with pytest.raises(ValueError, match="transport 'mooncake', this receiver is 'shm'"):
        receiver.receive(manifest)


def test_abandoned_receive_is_cancelled_by_the_next_one(shm_pair):
    sender, receiver = shm_pair
    manifest1, _ = _publish_small(sender, 1, seed=0)
    stale = receiver.receive(manifest1)
    next(stale)
    manifest2, tensors2 = _publish_small(sender, 2, seed=1)
    _receive_and_compare(receiver, manifest2, tensors2)
    with pytest.raises(TransportError, match="cancelled"):
        list(stale)
    assert receiver.stats.version == 2 and receiver.stats.checksum_ok


def test_stats_account_every_bucket(shm_pair):
    sender, receiver = shm_pair
    manifest, tensors = _publish_small(sender, 4, seed=2)
    _receive_and_compare(receiver, manifest, tensors)
    stats = receiver.stats
    assert stats.buckets == len(manifest.buckets)
    assert stats.bytes == manifest.total_bytes
    assert stats.transfer_s > 0 and stats.elapsed_s >= stats.transfer_s
    assert sender.stats.version == 4
    assert sender.stats.bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_mooncake_receiver_refuses_an_unreachable_sender():
    with get_receiver("mooncake") as receiver:
        with ShmSender() as shm:
            manifest, _ = _publish_small(shm, 1, seed=0)
        bogus = manifest.model_copy(
            update={"transport": "mooncake", "endpoint": "127.0.0.1:1", "base_addr": 4096}
        )
        with pytest.raises(TransportError, match="127.0.0.1:1 does not answer"):
            receiver.receive(bogus)


# ------------------------------------------------- per-bucket digests, pipelined publish


def test_each_bucket_is_verified_before_any_of_its_tensors_is_yielded(shm_pair):
    sender, receiver = shm_pair
    manifest, tensors = _publish_small(sender, 1, seed=3)
    assert all(b.checksum for b in manifest.buckets) and len(manifest.buckets) > 2
    corrupt = manifest.buckets[1]
    sender.region[corrupt.offset + 5] ^= 0x10
    yielded = []
    with pytest.raises(WeightIntegrityError, match="version 1 .* corrupt: bucket 1 checksum"):
        for name, tensor in receiver.receive(manifest):
            yielded.append(name)
            assert _bytes_equal(tensor, tensors[name])
    # bucket 0 is sound, but the load stops as soon as the thread has found bucket 1 bad
    assert set(yielded) <= {m.name for m in manifest.tensors if m.bucket == 0}
    assert receiver.stats.checksum_ok is False


def _gated(tensors: dict, release_after: int, gate: threading.Event, fail: bool = False):
    """Yield ``tensors``; after ``release_after`` of them wait for ``gate`` (an export
    that is still running), then go on or fail."""
    for i, item in enumerate(tensors.items()):
        if i == release_after:
            assert gate.wait(60), "test gate never opened"
            if fail:
                raise RuntimeError("export blew up")
        yield item


def _pipelined_small(sender, version, seed, gate, *, fail=False):
    tensors = _small_tensors(seed)
    metas, buckets = plan_buckets(tensor_specs(tensors.items()), SMALL_BUCKET)
    sender.prepare(metas, buckets)
    # the export stalls right after bucket 0's tensors: bucket 0 is complete, no other
    release_after = sum(1 for m in metas if m.bucket == 0)
    manifest = sender.publish(
        version, _gated(tensors, release_after, gate, fail), pipelined=True
    )
    return manifest, tensors, metas


def test_pipelined_publish_serves_packed_buckets_while_the_export_runs(shm_pair):
    sender, receiver = shm_pair
    gate = threading.Event()
    manifest, tensors, metas = _pipelined_small(sender, 1, seed=4, gate=gate)
    assert manifest.checksum is None and manifest.bucket_checksum == "xxh3_128"
    assert manifest.ready_offset is not None and len(manifest.buckets) > 2
    items = receiver.receive(manifest)
    first_bucket = [m.name for m in metas if m.bucket == 0]
    got = [next(items) for _ in first_bucket]  # served while the export is held back
    assert [n for n, _ in got] == first_bucket and sender.packing
    gate.set()
    got += list(items)
    assert [n for n, _ in got] == list(tensors)
    assert all(_bytes_equal(t, tensors[n]) for n, t in got)
    assert receiver.stats.checksum_ok is True and receiver.stats.ready_wait_s > 0
    stats = sender.wait_published(timeout=10)
    assert not sender.packing and stats.version == 1
    assert stats.bytes == sum(m.nbytes for m in metas)


def test_pipelined_export_failure_reaches_receiver_and_sender(shm_pair):
    sender, receiver = shm_pair
    gate = threading.Event()
    manifest, _, metas = _pipelined_small(sender, 2, seed=5, gate=gate, fail=True)
    items = receiver.receive(manifest)
    yielded = [next(items)[0]]
    gate.set()
    with pytest.raises(TransportError, match="failed while packing version 2"):
        for name, _ in items:
            yielded.append(name)
    assert set(yielded) <= {m.name for m in metas if m.bucket == 0}
    with pytest.raises(TransportError, match="pipelined weight publish failed: export blew up"):
        sender.wait_published(timeout=10)
    sender.wait_published(timeout=10)  # reported once; the sender is usable again
    manifest, tensors = _publish_small(sender, 3, seed=6)
    _receive_and_compare(receiver, manifest, tensors)


def test_receiver_times_out_on_a_sender_that_never_packs(shm_pair):
    sender, _ = shm_pair
    gate = threading.Event()
    manifest, _, _ = _pipelined_small(sender, 1, seed=7, gate=gate)
    with ShmReceiver(ready_timeout_s=0.3) as impatient:
        with pytest.raises(TransportError, match="bucket 1 of version 1 .* not packed within"):
            list(impatient.receive(manifest))
    gate.set()
    sender.wait_published(timeout=10)


def test_a_pipelined_manifest_goes_stale_once_the_sender_republishes(shm_pair):
    sender, receiver = shm_pair
    gate = threading.Event()
    gate.set()
    old, _, _ = _pipelined_small(sender, 1, seed=8, gate=gate)
    new, tensors, _ = _pipelined_small(sender, 2, seed=9, gate=gate)  # waits for v1's pack
    assert sender.stats.version in (1, 2)
    with pytest.raises(TransportError, match="moved on to version 2"):
        list(receiver.receive(old))
    _receive_and_compare(receiver, new, tensors)
    assert sender.wait_published(timeout=10).version == 2


def test_ready_stamps_overlapping_the_buckets_are_refused(shm_pair):
    sender, receiver = shm_pair
    gate = threading.Event()
    gate.set()
    manifest, _, _ = _pipelined_small(sender, 1, seed=10, gate=gate)
    sender.wait_published(timeout=10)
    bad = manifest.model_copy(update={"ready_offset": manifest.buckets[-1].offset})
    with pytest.raises(ValueError, match="ready_offset .* inside the buckets"):
        receiver.receive(bad)


def test_two_receivers_pull_one_publish_and_the_region_waits_for_both(shm_pair):
    """The publisher knows who pulls: it writes the region again only once every receiver
    has released it, done or declared dead."""
    sender, receiver = shm_pair
    tensors = _small_tensors(0)
    sender.prepare(*plan_buckets(tensor_specs(tensors.items()), SMALL_BUCKET))
    manifest = sender.publish(1, tensors, receivers=["engine-a", "engine-b"])
    with ShmReceiver() as other:
        for each in (receiver, other):
            got = dict(each.receive(manifest))
            assert all(_bytes_equal(got[n], t) for n, t in tensors.items())
    sender.release(1, "engine-a")
    assert sender.readers == ["engine-b"]
    with pytest.raises(ReadersPendingError, match="v1 while engine-b may still read it"):
        sender.publish(2, _small_tensors(1))
    grown = {**tensors, "f": torch.zeros(4096)}
    with pytest.raises(ReadersPendingError, match="allocating a new region"):
        sender.prepare(*plan_buckets(tensor_specs(grown.items()), SMALL_BUCKET))
    sender.release(0, "engine-b")  # a stale release (another version) changes nothing
    assert sender.readers == ["engine-b"]
    sender.release(1, "engine-b", dead=True)
    assert sender.readers == [] and sender.dead_receivers == {"engine-b"}
    assert sender.publish(2, _small_tensors(1)).version == 2
