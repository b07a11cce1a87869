"""k1rl's weight receiver as a vLLM weight-transfer engine (``vllm.distributed.weight_transfer``).

Where vLLM's worker runs a weight-transfer engine (its GPU worker), the rollout engine
selects this one by name (``WeightTransferConfig(backend="k1rl")``) and drives vLLM's own
update lifecycle: ``init_weight_transfer_engine`` (open the transport's receiver),
``start_weight_update`` (vLLM's layerwise reload set-up), ``update_weights`` (pull a
manifest bucket by bucket and load each tensor as it lands), ``finish_weight_update``
(process the loaded layers). The bytes move exactly as on the worker-extension path
(``rollout_svc/worker_ext.py``, kept for vLLM's CPU worker, which has no such engine):
through a ``checkpoint_engine`` receiver, one-sided, every bucket's digest checked before
its tensors reach vLLM.

The engine registers itself when this module is imported: the worker extension imports
it, so every vLLM worker process knows the name before it builds its engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from checkpoint_engine import ReceiveStats, get_receiver
from k1rl.protocol import WeightManifest

BACKEND = "k1rl"


@dataclass
class K1rlInitInfo(WeightTransferInitInfo):
    """Which checkpoint_engine transport the worker pulls with, and its receiver options."""

    transport: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class K1rlUpdateInfo(WeightTransferUpdateInfo):
    """One published policy: a WeightManifest as a dict."""

    manifest: dict[str, Any]


class K1rlTransferEngine(WeightTransferEngine[K1rlInitInfo, K1rlUpdateInfo]):
    init_info_cls = K1rlInitInfo
    update_info_cls = K1rlUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receiver = None
        self.stats: ReceiveStats | None = None

    def init_transfer_engine(self, init_info: K1rlInitInfo) -> None:
        if self.receiver is not None:
            self.receiver.close()
        self.receiver = get_receiver(init_info.transport, **init_info.options)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: K1rlUpdateInfo) -> None:
        if self.receiver is None:
            raise RuntimeError("the k1rl weight transfer is not initialised: call "
                               "init_weight_transfer_engine first")
        manifest = WeightManifest.model_validate(update_info.manifest)
        for name, tensor in self.receiver.receive(manifest):
            self.model.load_weights([(name, tensor)])
        self.stats = self.receiver.stats

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


def register() -> None:
    """Make ``backend="k1rl"`` known to vLLM's factory (idempotent)."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, K1rlTransferEngine)
    except ValueError:  # already registered in this process
        pass


register()
