"""vLLM worker extension: pull new policy weights over a transport and reload in place.

vLLM mixes this class into every worker (``worker_extension_cls``) and the engine
reaches it with ``collective_rpc``. Only JSON-able arguments cross that boundary:
in multi-process mode tensors passed through ``collective_rpc`` arrive as lists, so
the manifest travels and each worker pulls the bytes itself.

This is the only place, with ``rollout_svc/weight_transfer.py`` (the same receiver as a vLLM
weight-transfer engine, for workers that run one), that calls vLLM's weight-loading
internals. Calling ``model.load_weights`` directly breaks on CPU after the first load
(weights are repacked into kernel layout), so we go through ``reload_weights`` with
``is_checkpoint_format=True``, which re-runs the loader's post-processing.
"""

from __future__ import annotations

import time
from typing import Any


from checkpoint_engine import ReceiveStats, get_receiver
from k1rl.protocol import WeightManifest
from rollout_svc import weight_transfer  # noqa: F401 - registers backend "k1rl" in this worker


class WeightSyncExtension:
    """Methods here run inside a vLLM worker; ``self`` is the worker."""

    _k1rl_receiver = None
    _k1rl_receiver_key: tuple | None = None

    def _k1rl_get_receiver(self, transport: str, options: dict[str, Any]):
        key = (transport, tuple(sorted(options.items())))
        if self._k1rl_receiver is None or self._k1rl_receiver_key != key:
            if self._k1rl_receiver is not None:
                self._k1rl_receiver.close()
            self._k1rl_receiver = get_receiver(transport, **options)
            self._k1rl_receiver_key = key
        return self._k1rl_receiver

    def k1rl_update_weights(self, manifest: dict, options: dict[str, Any]) -> dict:
        """Receive policy ``manifest.version`` bucket by bucket and reload it in place."""
        m = WeightManifest.model_validate(manifest)
        receiver = self._k1rl_get_receiver(m.transport, options)
        start = time.perf_counter()
        # The receiver prefetches the next bucket while vLLM loads the current one,
        # so transfer and reload overlap; reload_weights consumes the iterator.
        self.reload_weights(weights_iterator=receiver.receive(m), is_checkpoint_format=True)
        return update_stats(receiver.stats, time.perf_counter() - start)

    def k1rl_native_stats(self) -> dict:
        """What the last update through vLLM's weight-transfer engine (backend "k1rl")
        received, in :func:`update_stats`' form."""
        engine = self.weight_transfer_engine
        if engine is None or engine.stats is None:
            raise RuntimeError("no update went through the k1rl weight-transfer engine")
        return update_stats(engine.stats, engine.stats.elapsed_s)

    def k1rl_close_transport(self) -> bool:
        if self._k1rl_receiver is not None:
            self._k1rl_receiver.close()
            self._k1rl_receiver = None
            self._k1rl_receiver_key = None
        return True


def update_stats(stats: ReceiveStats, total: float) -> dict:
    """One worker's update as the rollout engine reports it (``total``: its seconds)."""
    return {
        "version": stats.version,
        "bytes": stats.bytes,
        "transfer_s": stats.transfer_s,
        "wait_s": stats.wait_s,
        # part of the transfer thread's time spent waiting for a pipelined sender
        "ready_wait_s": stats.ready_wait_s,
        "load_s": max(0.0, total - stats.wait_s),
        "checksum_ok": stats.checksum_ok,
    }
