"""The checkpoint-engine sidecar: owns the rollout engine's lifecycle and the phase
state machine, commanded over ZMQ with PhaseCommand (verb ``phase``)."""

from __future__ import annotations

import logging
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.protocol import PhaseCommand, PhaseStatus
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled
from k1rl.watch import WatchedClient

from checkpoint_engine.lifecycle import make_lifecycle
from checkpoint_engine.phases import Phase, PhaseMachine

log = logging.getLogger(__name__)


def build_machine(cfg: RunConfig, config_path: Path) -> PhaseMachine:
    """One lifecycle per rollout engine (rollout.addresses), one trainer to publish."""
    engines = [
        make_lifecycle(
            cfg.checkpoint_engine.engine_lifecycle,
            config_path=config_path,
            address=address,
            log_dir=Path(cfg.run_dir) / "logs" / f"engine{k}",
            ready_timeout_s=600.0,
        )
        for k, address in enumerate(cfg.rollout.engine_addresses())
    ]
    # watched: a trainer that dies mid-publish is noticed in seconds (cfg.calls); a release
    # is safe to repeat (the sender ignores a stale one), a push is not
    trainer = WatchedClient.for_policy(cfg.trainer.address, cfg.calls,
                                       idempotent=frozenset({"release_weights"}))
    return PhaseMachine(trainer=trainer, engines=engines, ping_every_s=cfg.calls.ping_every_s,
                        misses=cfg.calls.misses)


def handle_phase(machine: PhaseMachine, cmd: PhaseCommand) -> PhaseStatus:
    if cmd.phase == Phase.ROLLOUT.value:
        record = machine.to_rollout()
    else:
        record = machine.to_train()
    log.info("%s: v%d in %.2f s", record.direction, record.policy_version, record.seconds)
    breakdown = {
        "engine_start_s": record.engine_start_s,
        "push_s": record.push_s,
        "update_s": record.update_s,
        "weight_bytes": float(record.weight_bytes),
    }
    return PhaseStatus(
        phase=machine.phase.value,
        policy_version=machine.policy_version,
        switch_s=record.seconds,
        breakdown=breakdown if record.direction == "to_rollout" else {},
        engines=record.engines if record.direction == "to_rollout" else [],
    )


def serve(cfg: RunConfig, config_path: Path, address: str | None = None) -> None:
    machine = build_machine(cfg, config_path)
    server = RPCServer(address or cfg.checkpoint_engine.address, service="checkpoint_engine",
                       max_message_bytes=cfg.checkpoint_engine.max_message_bytes,
                       metrics_port=cfg.checkpoint_engine.metrics_port)
    server.register("phase", PhaseCommand, lambda cmd: handle_phase(machine, cmd))
    server.start_in_thread()
    try:
        run_until_signalled(server)
    finally:
        for engine in machine.engines:
            engine.close()
        machine.trainer.close()
