"""reward_svc scores a batch: reward = task (0/1) + weight * k1.5 length reward per group, the
weight switching on after the warm-up iterations; served over ZMQ as method "score"."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from k1rl.config import RewardConfig
from k1rl.protocol import RewardItem, RewardRequest, RewardResult, RunRef
from k1rl.rpc import RemoteError, RemoteValidationError, RPCClient, RPCServer, wait_until_ready
from reward_svc.server import register_service
from reward_svc.service import RewardService

REPO = Path(__file__).resolve().parents[1]


def item(group: int, text: str, tokens: int, gold: str = "85", **kw) -> RewardItem:
    return RewardItem(
        group_id=group, response=f"Work. The answer is {text}.", answer=gold,
        response_tokens=tokens, **kw,
    )


# Group 0: lengths 10..40 (span 30); group 1: equal lengths; group 2: a single response.
BATCH = [
    item(0, "85", 10),  # correct, lam 0.5
    item(1, "85", 7),
    item(0, "84", 20),  # wrong, lam 1/6 -> 0
    item(0, "85.0", 40),  # correct, lam -0.5
    item(1, "3", 7),
    item(0, "1", 30),  # wrong, lam -1/6
    item(2, "\\boxed{85}", 99),
]
CORRECT = [True, True, False, True, False, False, True]
LENGTH = [0.5, 0.0, 0.0, -0.5, 0.0, -1 / 6, 0.0]


@pytest.fixture(scope="module")
def service():
    with RewardService(RewardConfig(length_penalty_weight=0.2, length_penalty_warmup_iters=3)) as s:
        s.start()
        yield s


def request(iteration: int, items=BATCH) -> RewardRequest:
    return RewardRequest(ref=RunRef(run_id="t", iteration=iteration), items=items)


def test_components_and_total_after_warmup(service):
    result = service.score(request(iteration=3))
    assert result.correct == CORRECT
    assert result.task_rewards == [float(c) for c in CORRECT]
    assert result.length_rewards == pytest.approx(LENGTH)
    assert result.length_penalty_weight == 0.2
    expected = [float(c) + 0.2 * n for c, n in zip(CORRECT, LENGTH)]
    assert result.rewards == pytest.approx(expected)


def test_no_length_penalty_during_warmup(service):
    result = service.score(request(iteration=2))
    assert result.length_penalty_weight == 0.0
    assert result.rewards == [float(c) for c in CORRECT]
    # the length rewards are still reported, so warm-up runs can log them
    assert result.length_rewards == pytest.approx(LENGTH)


def test_a_request_may_set_its_own_weight(service):
    """The master's rl.schedule decides the weight per iteration, warm-up or not."""
    during_warmup = request(iteration=1).model_copy(update={"length_penalty_weight": 0.5})
    result = service.score(during_warmup)
    assert result.length_penalty_weight == 0.5
    assert result.rewards == pytest.approx([float(c) + 0.5 * n for c, n in zip(CORRECT, LENGTH)])
    off = request(iteration=9).model_copy(update={"length_penalty_weight": 0.0})
    assert service.score(off).rewards == [float(c) for c in CORRECT]


def test_group_order_does_not_matter(service):
    reordered = [BATCH[i] for i in (6, 5, 4, 3, 2, 1, 0)]
    result = service.score(request(iteration=5, items=reordered))
    assert result.length_rewards == pytest.approx([LENGTH[i] for i in (6, 5, 4, 3, 2, 1, 0)])


def test_empty_batch(service):
    assert service.score(request(iteration=0, items=[])).rewards == []


def test_unknown_verifier_fails_before_scoring(service):
    bad = [item(0, "85", 3), item(0, "85", 4, verifier="chess")]
    with pytest.raises(ValueError, match="unknown verifier 'chess'"):
        service.score(request(0, bad))


def test_bad_gold_answer_names_the_item(service):
    bad = [item(0, "85", 3), item(4, "85", 4, gold="")]
    with pytest.raises(ValueError, match=r"items\[1\] \(group 4\).*gold answer is empty"):
        service.score(request(0, bad))


def test_result_components_must_align():
    with pytest.raises(ValueError, match="1 task_rewards for 2 rewards"):
        RewardResult(rewards=[1.0, 0.0], correct=[True, False], task_rewards=[1.0])


# ----------------------------------------------------------------------------- RPC


class NotARewardRequest(BaseModel):
    kind: str = "reward_request"
    items: list[dict]


@pytest.fixture(scope="module")
def server(service):
    srv = RPCServer("tcp://127.0.0.1:0", service="reward")
    register_service(srv, service)
    srv.start_in_thread()
    yield srv
    srv.stop()


def test_score_over_rpc(server):
    with RPCClient(server.address, timeout_s=30) as client:
        result = client.call("score", request(iteration=3), RewardResult)
    assert result.correct == CORRECT
    assert result.rewards == pytest.approx([float(c) + 0.2 * n for c, n in zip(CORRECT, LENGTH)])


def test_malformed_requests_get_typed_errors_and_serving_goes_on(server):
    with RPCClient(server.address, timeout_s=30) as client:
        bad = NotARewardRequest(items=[{"group_id": "zero", "response": 5}])
        with pytest.raises(RemoteValidationError, match="items.0.group_id"):
            client.call("score", bad, RewardResult)
        with pytest.raises(RemoteError, match="unknown verifier 'nope'") as err:
            client.call("score", request(0, [item(0, "85", 1, verifier="nope")]), RewardResult)
        assert err.value.error_type == "UnknownVerifierError"
        result = client.call("score", request(0, [item(0, "85", 1)]), RewardResult)
        assert result.correct == [True]
        assert client.ping().ready


def test_several_requests_are_scored_at_once_each_correctly(service):
    """reward_svc serves reward.handler_threads requests at the same time; the master and
    evaluation reach it through BalancedClients (several replicas, bounded in flight)."""
    from concurrent.futures import ThreadPoolExecutor

    from k1rl.balance import BalancedClients

    srv = RPCServer("tcp://127.0.0.1:0", service="reward", handler_threads=4)
    register_service(srv, service)
    srv.start_in_thread()
    clients = BalancedClients([srv.address], max_in_flight=4, timeout_s=60)
    seen_busy = []

    def score(i: int) -> RewardResult:
        return clients.call("score", request(iteration=3 + i % 2), RewardResult)

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(score, i) for i in range(8)]
            with RPCClient(srv.address, timeout_s=5) as probe:
                while not all(f.done() for f in futures):
                    seen_busy.append(probe.ping().detail.get("busy", ""))
            results = [f.result() for f in futures]
    finally:
        clients.close()
        srv.stop()
    assert all(r.correct == CORRECT for r in results)
    assert clients.served == {srv.address: 8}
    assert any("score" in b for b in seen_busy)


def test_cli_serves_until_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    config = tmp_path / "run.yaml"
    config.write_text(f"reward:\n  address: {address}\n  length_penalty_weight: 0.5\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward_svc", "--config", str(config)], cwd=tmp_path, env=env
    )
    try:
        wait_until_ready(address, timeout_s=60, proc=proc)
        with RPCClient(address, timeout_s=30) as client:
            result = client.call("score", request(0, [item(0, "85", 1), item(0, "9", 3)]),
                                 RewardResult)
        assert result.rewards == pytest.approx([1.0 + 0.5 * 0.5, 0.5 * -0.5])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_repeated_trajectory_is_wrong_and_penalised_without_being_checked():
    config = RewardConfig(length_penalty_weight=0.0, repetition_penalty=0.5)
    items = [item(0, "85", 10), item(0, "85", 10, repeated=True),
             # even an unknown answer format is never parsed once the trajectory looped
             RewardItem(group_id=0, response="x", answer="85", response_tokens=3,
                        verifier="code", repeated=True)]
    with RewardService(config) as s:
        result = s.score(request(iteration=0, items=items))
    assert result.correct == [True, False, False]
    assert result.task_rewards == [1.0, -0.5, -0.5]
    assert result.rewards == [1.0, -0.5, -0.5]
