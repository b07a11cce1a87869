"""The checkpoint-engine phase state machine: TRAIN <-> ROLLOUT with a real trainer and vLLM."""

from __future__ import annotations

import time

import pytest

from checkpoint_engine.lifecycle import RestartLifecycle, make_lifecycle
from checkpoint_engine.phases import PhaseError, PhaseMachine
from k1rl.config import RunConfig
from k1rl.launch import LocalCluster, free_tcp_address
from k1rl.protocol import (
    GenerateRequest,
    GenerateResult,
    PhaseCommand,
    PhaseStatus,
    SamplingSpec,
    SFTBatch,
    SFTExample,
    TrainStats,
)
from k1rl.rpc import RPCClient, RPCTimeout


def _machine(tmp_path) -> PhaseMachine:
    lifecycle = RestartLifecycle(tmp_path / "run.yaml", free_tcp_address(), tmp_path, 1.0)
    return PhaseMachine(trainer=RPCClient(free_tcp_address(), timeout_s=1.0), engines=[lifecycle])


def test_switching_to_train_while_training_is_refused(tmp_path):
    machine = _machine(tmp_path)
    with pytest.raises(PhaseError, match="to_train needs phase rollout, but the phase is train"):
        machine.to_train()
    assert machine.history == []


def test_unknown_lifecycle_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="persistent, restart"):
        make_lifecycle("sleep", config_path=tmp_path, address="", log_dir=tmp_path,
                       ready_timeout_s=1.0)


def test_an_external_engine_is_waited_for_never_started_and_fresh_once_per_start(tmp_path):
    """In the Kubernetes RL pod the rollout container runs the engine: the sidecar finds
    it at its address; a restarted container is a fresh engine (dummy weights)."""
    from k1rl.rpc import RPCServer

    address = free_tcp_address()
    external = make_lifecycle("external", config_path=tmp_path / "run.yaml", address=address,
                              log_dir=tmp_path, ready_timeout_s=0.5)
    with pytest.raises(RPCTimeout):
        external.bring_up()  # nobody there: it does not start one
    assert not external.running and not (tmp_path / "rollout.log").exists()
    for restart in range(2):
        engine = RPCServer(address, "rollout")
        engine.start_in_thread()
        try:
            assert external.bring_up() is True
            external.halt()
            assert external.bring_up() is False and external.running
        finally:
            engine.stop()
        if restart == 0:
            import time

            time.sleep(2.5)  # the next engine starts measurably later
    assert external.starts == 2


@pytest.fixture
def sidecar(tmp_path, trainer_model_dir):
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.model.path = str(trainer_model_dir)
    cfg.trainer.address = free_tcp_address()
    cfg.rollout.address = free_tcp_address()
    cfg.checkpoint_engine.address = free_tcp_address()
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    with LocalCluster(tmp_path / "logs") as cluster:
        args = ["--config", str(config)]
        cluster.start("trainer", "trainer_svc", args, cfg.trainer.address)
        cluster.start("checkpoint_engine", "checkpoint_engine", args, cfg.checkpoint_engine.address)
        cluster.wait_ready(300)
        with RPCClient(cfg.checkpoint_engine.address, timeout_s=600) as ce, \
                RPCClient(cfg.trainer.address, timeout_s=600) as trainer:
            yield cfg, ce, trainer


def _sample(cfg) -> GenerateResult:
    req = GenerateRequest(prompts=["Q: 2 + 3\nA:"], sampling=SamplingSpec(n=2, max_tokens=8))
    with RPCClient(cfg.rollout.address, timeout_s=300) as rollout:
        return rollout.call("generate", req, GenerateResult)


def _rollout_pid(cfg) -> int:
    with RPCClient(cfg.rollout.address, timeout_s=5.0) as rollout:
        return rollout.ping().pid


def _rollout(cfg) -> str:
    """"down" (no process), "standby" (the next rollout's process: vLLM imported, no
    engine) or "ready" (an engine serves)."""
    with RPCClient(cfg.rollout.address, timeout_s=1.0) as rollout:
        try:
            pong = rollout.ping()
        except RPCTimeout:
            return "down"
    if pong.ready:
        return "ready"
    return "standby" if pong.detail.get("standby") else "starting"


def _standby_when_ready(cfg) -> str:
    """What the rollout address holds once its process has finished importing."""
    deadline = time.monotonic() + 120
    while (state := _rollout(cfg)) in ("down", "starting") and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


@pytest.mark.slow
def test_restart_mode_runs_vllm_only_during_rollout_and_serves_each_new_policy(sidecar):
    cfg, ce, trainer = sidecar
    assert _rollout(cfg) == "down"

    status = ce.call("phase", PhaseCommand(phase="rollout"), PhaseStatus)
    assert (status.phase, status.policy_version) == ("rollout", 0)
    assert _sample(cfg).policy_version == 0

    # a master that died and came back asks again: the same switch, the same engine and
    # policy (a retried Kubernetes Job used to be refused here)
    engine_pid = _rollout_pid(cfg)
    again = ce.call("phase", PhaseCommand(phase="rollout"), PhaseStatus)
    assert (again.phase, again.policy_version) == ("rollout", 0)
    assert again.breakdown["engine_start_s"] == 0 and _rollout_pid(cfg) == engine_pid
    assert _sample(cfg).policy_version == 0

    assert ce.call("phase", PhaseCommand(phase="train"), PhaseStatus).phase == "train"
    # the engine is gone (its memory with it); the next rollout's process waits, no engine
    assert _standby_when_ready(cfg) == "standby" and _rollout_pid(cfg) != engine_pid

    ex = SFTExample(prompt_token_ids=[5, 6, 7], response_token_ids=[8, 9])
    assert trainer.call("sft_step", SFTBatch(examples=[ex]), TrainStats).policy_version == 1

    standby_pid = _rollout_pid(cfg)
    status = ce.call("phase", PhaseCommand(phase="rollout"), PhaseStatus)
    assert status.policy_version == 1 and status.switch_s > 0
    assert _rollout_pid(cfg) == standby_pid  # the standby process made the engine
    assert _sample(cfg).policy_version == 1
    ce.call("phase", PhaseCommand(phase="train"), PhaseStatus)
    assert _standby_when_ready(cfg) == "standby"
