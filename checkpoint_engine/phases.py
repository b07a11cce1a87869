"""The phase state machine of the hybrid deployment: TRAIN <-> ROLLOUT, in one class.

    TRAIN --to_rollout(v)--> ROLLOUT --to_train()--> TRAIN

to_rollout: the trainer has finished its step (its optimizer state is reset every
iteration anyway, so there is nothing to keep resident); the engine is brought up
(restart mode: a fresh vLLM with dummy weights), the trainer publishes policy v and
the engine pulls it over the transfer engine and reloads. The switch is complete
only when the engine reports exactly version v.
to_train: rollout is over; restart mode halts vLLM so the trainer gets the devices
back.

Every switch is timed and kept, so the loop can report both directions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import Enum

from k1rl.protocol import PushWeightsRequest, WeightManifest, WeightUpdateResult
from k1rl.rpc import RPCClient

from checkpoint_engine.lifecycle import EngineLifecycle


class Phase(str, Enum):
    TRAIN = "train"
    ROLLOUT = "rollout"


class PhaseError(RuntimeError):
    """A switch that is not allowed from the current phase, or that did not complete."""


@dataclass
class SwitchRecord:
    direction: str  # "to_rollout" | "to_train"
    seconds: float
    policy_version: int
    engine_started: bool = False
    engine_start_s: float = 0.0
    push_s: float = 0.0
    update_s: float = 0.0
    weight_bytes: int = 0


@dataclass
class PhaseMachine:
    trainer: RPCClient
    lifecycle: EngineLifecycle
    update_timeout_s: float = 600.0
    phase: Phase = Phase.TRAIN
    policy_version: int = -1
    history: list[SwitchRecord] = field(default_factory=list)

    def to_rollout(self) -> SwitchRecord:
        """Put the trainer's current policy into a ready rollout engine."""
        self._require(Phase.TRAIN, "to_rollout")
        started = time.perf_counter()
        fresh = self.lifecycle.bring_up()
        engine_s = time.perf_counter() - started
        manifest = self.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
        pushed = time.perf_counter()
        with RPCClient(self.lifecycle.address, timeout_s=self.update_timeout_s) as rollout:
            result = self._update(rollout, manifest, fresh)
        if result.version != manifest.version:
            raise PhaseError(
                f"engine reports policy v{result.version} after an update to v{manifest.version}"
            )
        done = time.perf_counter()
        self.phase = Phase.ROLLOUT
        self.policy_version = manifest.version
        return self._record(
            SwitchRecord(
                direction="to_rollout",
                seconds=done - started,
                policy_version=manifest.version,
                engine_started=fresh,
                engine_start_s=engine_s if fresh else 0.0,
                push_s=pushed - started - engine_s,
                update_s=done - pushed,
                weight_bytes=manifest.total_bytes,
            )
        )

    def to_train(self) -> SwitchRecord:
        """Rollout is over: halt the engine (restart mode) and hand back to the trainer."""
        self._require(Phase.ROLLOUT, "to_train")
        started = time.perf_counter()
        self.lifecycle.halt()
        self.phase = Phase.TRAIN
        return self._record(
            SwitchRecord(
                direction="to_train",
                seconds=time.perf_counter() - started,
                policy_version=self.policy_version,
            )
        )

    def _update(
        self, rollout: RPCClient, manifest: WeightManifest, fresh: bool
    ) -> WeightUpdateResult:
        # A persistent engine that already holds this version (no training step since the
        # last push) needs no transfer; anything else must go through the update.
        if not fresh and manifest.version == self.policy_version:
            return WeightUpdateResult(
                version=manifest.version, bytes=0, transfer_s=0.0, load_s=0.0
            )
        return rollout.call("update_weights", manifest, WeightUpdateResult)

    def _require(self, phase: Phase, action: str) -> None:
        if self.phase is not phase:
            raise PhaseError(f"{action} needs phase {phase.value}, but the phase is {self.phase.value}")

    def _record(self, record: SwitchRecord) -> SwitchRecord:
        self.history.append(record)
        return record

    def summary(self) -> dict[str, float]:
        def mean(direction: str) -> float:
            times = [r.seconds for r in self.history if r.direction == direction]
            return sum(times) / len(times) if times else 0.0

        return {
            "mean_switch_to_rollout_s": mean("to_rollout"),
            "mean_switch_to_train_s": mean("to_train"),
            "switches": float(len(self.history)),
            "engine_starts": float(self.lifecycle.starts),
        }

    def history_rows(self) -> list[dict]:
        return [asdict(r) for r in self.history]
