"""An iteration a service died in is redone from the last completed one.

The master's unit of durability is the iteration (loop.py: the trainer's checkpoint, the
replay buffer, the prompt ledger and the run state are written when one completes). When a
call fails because a service died mid-iteration (its process was killed, its pod
restarted), the master does what a resumed master does, without exiting:

1. waits, up to ``calls.restart_wait_s``, for the services to answer ready again (the
   local launcher or the kubelet restarts them);
2. goes back to the run state of the last completed iteration (random state, sampler,
   replay buffer; the ledger lines of the dead iteration are removed);
3. makes the trainer hold that state's policy: a trainer that holds another version (it
   trained before the failure, or it was restarted and holds the base model's v0) loads
   the run's checkpoint; with no checkpoint to load, that is an error, never a fresh start;
4. redoes the iteration. It draws the same prompts and sends the same seeded requests;
   the sidecar's switch to ROLLOUT is valid from either phase and gives every engine
   (a restarted one included) the trainer's policy.

Every iteration starts with step 3 too (a ping when nothing is amiss): a trainer container
restarted between two iterations would otherwise publish the base model to the engines
and train the next batch from it.

Three steps are retried on their own first (:func:`retried`), keeping what the iteration
has made so far: a rollout whose engine died is sent again, with the same seed, once the
sidecar has given a restarted engine the policy again; a train step whose trainer died is
sent again, with the same batch, once the trainer holds the run state's policy again; a
checkpoint whose trainer died is saved again after that train step is redone the same way
(and the final HF export, once the trainer holds the run's last policy again). A
call that is safe to repeat as it is (a score, log-probs) is re-sent by its client once
the service is back (k1rl/watch.py, k1rl/balance.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from k1rl.config import RunConfig
from k1rl.master.engines import NoEngineError
from k1rl.master.state import RunState
from k1rl.metrics import prometheus
from k1rl.protocol import CheckpointRequest, CheckpointResult
from k1rl.rpc import RPCError, wait_until_ready
from k1rl.watch import WatchedClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# what a service dying mid-call looks like to the master: no answer (PeerGone, timeouts),
# an error it relayed (the sidecar's push lost its trainer), no engine left
class PolicyMismatch(RuntimeError):
    """The engines were given another policy than the run state's (the trainer was
    restarted after the iteration began)."""


RECOVERABLE: tuple[type[BaseException], ...] = (RPCError, NoEngineError, PolicyMismatch)


class RecoveryError(RuntimeError):
    """The run cannot go back to its last completed iteration."""


def wait_for_services(cfg: RunConfig, timeout_s: float) -> None:
    """Until the services the master calls answer ready (the engines are the sidecar's)."""
    for address in (cfg.trainer.address, *(cfg.reward.addresses or [cfg.reward.address]),
                    cfg.checkpoint_engine.address):
        if not address.startswith("dns://"):
            wait_until_ready(address, timeout_s)


def retried(cfg: RunConfig, step: str, call: Callable[[], T],
            prepare: Callable[[], object]) -> T:
    """``call()``; when a service died under it, wait for the services, ``prepare()`` (put
    back what the call needs) and call again, up to calls.max_recoveries times. What
    ``prepare`` raises, and the last failure, go to the caller (the iteration is redone)."""
    for attempt in range(cfg.calls.max_recoveries + 1):
        try:
            return call()
        except RECOVERABLE as exc:
            if attempt == cfg.calls.max_recoveries:
                raise
            log.warning("%s failed (%s: %s): sending it again once its service is back",
                        step, type(exc).__name__, exc)
            prometheus.STEPS_RETRIED.labels(step).inc()
            wait_for_services(cfg, cfg.calls.restart_wait_s)
            prepare()
    raise AssertionError("unreachable")


def align_trainer(trainer: WatchedClient, state: RunState) -> str | None:
    """Make the trainer hold ``state``'s policy; what was done (None: nothing, it did)."""
    held = trainer.ping().detail.get("policy_version")
    if held == state.policy_version:
        return None
    if state.trainer_checkpoint is None:
        raise RecoveryError(
            f"the trainer holds policy v{held} but the run's last completed iteration left "
            f"v{state.policy_version} and no checkpoint to load it from")
    req = CheckpointRequest(action="load", path=state.trainer_checkpoint)
    loaded = trainer.call("checkpoint", req, CheckpointResult)
    if loaded.policy_version != state.policy_version:
        raise RecoveryError(
            f"{state.trainer_checkpoint} holds policy v{loaded.policy_version}, the run "
            f"state says v{state.policy_version}")
    return f"trainer held v{held}: loaded v{loaded.policy_version} from {loaded.path}"
