"""The phase state machine of the hybrid deployment: TRAIN <-> ROLLOUT, in one class.

    TRAIN --to_rollout(v)--> ROLLOUT --to_train()--> TRAIN

to_rollout: the trainer has finished its step (its optimizer state is reset every
iteration anyway, so there is nothing to keep resident); the engines are brought up
(restart mode: fresh vLLMs with dummy weights), the trainer publishes policy v once and
every engine pulls it over the transfer engine, all at the same time (reads are
one-sided), and reloads. The trainer is told who pulls, and each engine is released as
it finishes, or declared dead when its start or update fails: the switch completes with
the engines that report exactly version v, and fails only when none does.
to_train: rollout is over; restart mode halts vLLM so the trainer gets the devices
back.

A master that died and came back (a retried Job, an iteration redone) asks for ROLLOUT
again while the machine is in it: that is the same switch again — the engines are made to
hold the trainer's current policy — not an error. An engine's version is asked from the
engine itself when this machine does not know it (it was restarted), so an engine that
already holds the policy is not sent it again (it would refuse it as stale). A sidecar's
first push declares the readers of its predecessor's last publish dead, or the trainer
would wait for releases nobody is left to send.

Every switch is timed and kept, so the loop can report both directions.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import Enum

from checkpoint_engine.lifecycle import EngineLifecycle, bring_up_all
from k1rl.protocol import (
    PushWeightsRequest,
    ReleaseWeights,
    WeightManifest,
    WeightReaders,
    WeightUpdateResult,
)
from k1rl.rpc import RPCClient, RPCTimeout
from k1rl.watch import WatchedClient, call_watched

log = logging.getLogger(__name__)

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
    # engines holding policy_version after the switch, and those that failed it
    engines: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class PhaseMachine:
    trainer: RPCClient | WatchedClient
    engines: list[EngineLifecycle]
    update_timeout_s: float = 600.0
    # an engine that misses this many pings in a row during its update is out (cfg.calls)
    ping_every_s: float = 2.0
    misses: int = 3
    phase: Phase = Phase.TRAIN
    policy_version: int = -1
    history: list[SwitchRecord] = field(default_factory=list)
    # the engines that hold policy_version (an engine that failed a switch is out until
    # it takes the full policy again)
    current: set[str] = field(default_factory=set)
    # the first push of this sidecar: readers an earlier one left are abandoned
    first_push: bool = True
    # the engines' update threads share the trainer client
    _trainer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_rollout(self) -> SwitchRecord:
        """Put the trainer's current policy into every engine that can take it (from
        TRAIN, or again from ROLLOUT: see the module docstring)."""
        started = time.perf_counter()
        ups = bring_up_all(self.engines)
        failed = {e.address: f"start: {up}" for e, up in ups.items() if isinstance(up, Exception)}
        live = [e for e in self.engines if e.address not in failed]
        if not live:
            raise PhaseError(f"no rollout engine came up: {failed}")
        # a fresh engine holds dummy weights whatever this machine knew of its address
        self.current -= {e.address for e, up in ups.items() if up is not False}
        engine_s = time.perf_counter() - started
        request = PushWeightsRequest(receivers=[e.address for e in live],
                                     abandon_readers=self.first_push)
        manifest = self.trainer.call("push_weights", request, WeightManifest)
        self.first_push = False
        pushed = time.perf_counter()
        failed |= self._update_all(live, manifest)
        updated = [e.address for e in live if e.address not in failed]
        if not updated:
            raise PhaseError(f"no engine took policy v{manifest.version}: {failed}")
        done = time.perf_counter()
        self.phase = Phase.ROLLOUT
        self.policy_version = manifest.version
        self.current = set(updated)
        fresh = any(up is True for up in ups.values())
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
                engines=updated,
                failed=failed,
            )
        )

    def _update_all(self, live: list[EngineLifecycle],
                    manifest: WeightManifest) -> dict[str, str]:
        """Every live engine pulls ``manifest`` at the same time; why each that did not
        end up holding it failed."""
        with ThreadPoolExecutor(max_workers=len(live)) as pool:
            results = list(pool.map(lambda e: self._update(e, manifest), live))
        failed = {}
        for engine, result in zip(live, results, strict=True):
            if isinstance(result, Exception):
                failed[engine.address] = f"update: {result}"
            elif result.version != manifest.version:
                failed[engine.address] = (f"reports policy v{result.version} after an update "
                                          f"to v{manifest.version}")
        for address, reason in failed.items():
            log.warning("engine %s is out of policy v%d: %s", address, manifest.version, reason)
        return failed

    def to_train(self) -> SwitchRecord:
        """Rollout is over: halt the engine (restart mode) and hand back to the trainer."""
        self._require(Phase.ROLLOUT, "to_train")
        started = time.perf_counter()
        for engine in self.engines:
            engine.halt()
        self.phase = Phase.TRAIN
        return self._record(
            SwitchRecord(
                direction="to_train",
                seconds=time.perf_counter() - started,
                policy_version=self.policy_version,
            )
        )

    def _update(self, engine: EngineLifecycle,
                manifest: WeightManifest) -> WeightUpdateResult | Exception:
        """Pull ``manifest`` into one engine, then release it at the trainer (declared dead
        when the update failed, so the trainer does not wait for it)."""
        result: WeightUpdateResult | Exception
        # An engine that already holds this version (no training step since the last
        # push; an external engine this sidecar restarted beside) needs no transfer;
        # anything else must go through the update.
        if self._holds(engine, manifest.version):
            result = WeightUpdateResult(version=manifest.version, bytes=0, transfer_s=0.0,
                                        load_s=0.0)
        else:
            try:
                result = call_watched(engine.address, "update_weights", manifest,
                                      WeightUpdateResult, self.update_timeout_s,
                                      ping_every_s=self.ping_every_s, misses=self.misses)
            except Exception as exc:  # noqa: BLE001 - one engine's failure is recorded
                result = exc
        release = ReleaseWeights(version=manifest.version, receiver=engine.address,
                                 dead=isinstance(result, Exception))
        with self._trainer_lock:
            self.trainer.call("release_weights", release, WeightReaders)
        return result

    def _holds(self, engine: EngineLifecycle, version: int) -> bool:
        if engine.address in self.current:
            return version == self.policy_version
        try:  # not known here (this sidecar was restarted): the engine says
            with RPCClient(engine.address, timeout_s=5.0) as client:
                pong = client.ping()
        except RPCTimeout:  # unknown: the update finds out
            return False
        return pong.ready and pong.detail.get("policy_version") == version

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
            "engine_starts": float(sum(e.starts for e in self.engines)),
        }

    def history_rows(self) -> list[dict]:
        return [asdict(r) for r in self.history]

