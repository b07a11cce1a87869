"""Serve one RolloutEngine over ZMQ: generate, score, update_weights, info, ping."""

from __future__ import annotations

import logging
import threading

from k1rl.config import RunConfig
from k1rl.protocol import (
    Ack,
    EngineInfoRequest,
    GenerateRequest,
    LogprobRequest,
    StartEngine,
    WeightManifest,
)
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled, wait_unless_signalled

from rollout_svc.engine import EngineSpec, RolloutEngine

log = logging.getLogger(__name__)


def engine_spec(cfg: RunConfig, *, dummy_weights: bool = False,
                judge: bool = False) -> EngineSpec:
    """The policy's engine, or with ``judge`` the CoT reward model's (reward.judge: its
    own checkpoint and context length; the rest of the engine settings are rollout's)."""
    r = cfg.rollout
    if judge and not cfg.reward.judge.model:
        raise ValueError("rollout_svc --judge needs reward.judge.model (the judge's checkpoint)")
    return EngineSpec(
        model_path=cfg.reward.judge.model if judge else cfg.model.path,
        device=r.device,
        dtype=cfg.model.dtype,
        max_model_len=cfg.reward.judge.max_model_len if judge else r.max_model_len,
        kv_cache_gib=r.kv_cache_gib,
        max_num_seqs=r.max_num_seqs,
        gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager,
        in_process=r.in_process,
        tp=r.tp,
        load_format="dummy" if dummy_weights else "auto",
        seed=cfg.seed,
        repetition=r.repetition,
        weight_transfer=r.weight_transfer,
    )


def register_engine(server: RPCServer, engine: RolloutEngine, judge: bool = False) -> None:
    server.register("generate", GenerateRequest, engine.generate)
    server.register("score", LogprobRequest, engine.score)
    if not judge:  # a judge serves its own fixed checkpoint: nothing pushes weights to it
        server.register("update_weights", WeightManifest,
                        lambda manifest: _update_weights(server, engine, manifest))
    server.register("info", EngineInfoRequest, engine.info)


def _update_weights(server: RPCServer, engine: RolloutEngine, manifest: WeightManifest):
    """Update, then report the version held in ping: a restarted sidecar reads it there
    rather than pushing a version the engine already holds (refused as stale)."""
    try:
        return engine.update_weights(manifest)
    finally:
        server.set_detail(policy_version=engine.policy_version)


def _stand_by(server: RPCServer) -> bool:
    """Import vLLM, then wait for ``start_engine`` (True) or a stop signal (False). The
    restart lifecycle starts the next rollout's process this way while the trainer trains
    (no engine, so no device memory), and the switch to ROLLOUT pays only the engine's
    own start, not the seconds of interpreter start and imports."""
    go = threading.Event()
    server.register("start_engine", StartEngine, lambda _: (go.set(), Ack())[1])
    server.set_detail(standby=True)
    import vllm  # noqa: F401 - what this process was started early for

    log.info("standing by on %s (vLLM imported)", server.address)
    started = wait_unless_signalled(go)
    server.set_detail(standby=False)
    return started


def serve(cfg: RunConfig, *, dummy_weights: bool = False, address: str | None = None,
          standby: bool = False, judge: bool = False) -> None:
    """Serve the policy's engine; with ``judge`` the CoT reward model's instead (at
    reward.judge.address unless ``address``)."""
    from checkpoint_engine.options import transport_options

    spec = engine_spec(cfg, dummy_weights=dummy_weights, judge=judge)
    default = cfg.reward.judge.address if judge else cfg.rollout.address
    # Answer pings while vLLM starts (seconds to tens of seconds), reporting not-ready,
    # so a probe can tell "starting" from "dead".
    server = RPCServer(address or default, service="judge" if judge else "rollout", ready=False,
                       max_message_bytes=cfg.rollout.max_message_bytes,
                       metrics_port=cfg.rollout.metrics_port)
    server.start_in_thread()
    engine = None
    try:
        if standby and not _stand_by(server):
            return
        engine = RolloutEngine(
            spec, transport_options=transport_options(cfg.weights, role="receiver"))
        register_engine(server, engine, judge=judge)
        server.set_ready(True, policy_version=engine.policy_version, start_s=engine.start_s)
        log.info("rollout engine ready in %.1f s on %s", engine.start_s, server.address)
        run_until_signalled(server)
    finally:
        server.stop()
        if engine is not None:
            engine.shutdown()
