"""Surviving a service that dies: the launcher restarts it, a repeatable call is sent
again to the new process, and the prompt ledger accounts for every prompt drawn.

The end-to-end rows of the recovery table (a service SIGKILLed mid-generate, mid-score,
mid-train, mid-publish, the sidecar mid-switch) run in tests/test_chaos.py."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from k1rl.balance import BalancedClients
from k1rl.launch import LocalCluster, free_tcp_address
from k1rl.master.ledger import LedgerEntry, PromptLedger, audit
from k1rl.metrics import prometheus
from k1rl.protocol import LogprobRequest, LogprobResult
from k1rl.rpc import RPCClient, wait_until_ready

# A service whose "logprobs" takes as many seconds as it is given prompts and answers with
# its pid: a reply tells which incarnation of the service gave it.
SERVICE = """
import os, sys, time
from k1rl.protocol import LogprobRequest, LogprobResult
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled

def slow(req):
    time.sleep(len(req.prompt_token_ids))
    return LogprobResult(logprobs=[[float(os.getpid())]], policy_version=0)

if os.environ.get("DIE_AT_ONCE"):
    sys.exit(3)
server = RPCServer(sys.argv[1], "slow")
server.register("logprobs", LogprobRequest, slow)
server.start_in_thread()
run_until_signalled(server)
"""


def _seconds(n: int) -> LogprobRequest:
    return LogprobRequest(prompt_token_ids=[[1]] * n, response_token_ids=[[1]] * n)


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "slowsvc.py").write_text(SERVICE)
    env = {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    with LocalCluster(tmp_path / "logs") as cluster:
        yield cluster, env


def _restarts(service: str) -> float:
    return sum(s.value for m in prometheus.SERVICE_RESTARTS.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels["service"] == service)


def test_a_killed_service_is_restarted_by_the_launcher(cluster):
    cluster, env = cluster
    address = free_tcp_address()
    svc = cluster.start("slow", "slowsvc", [address], address, env)
    cluster.wait_ready(60)
    cluster.supervise(max_restarts=2, poll_s=0.1)
    before = _restarts("slow")
    first = wait_until_ready(address, 10)
    assert (cluster.log_dir / "slow.pid").read_text().strip() == str(svc.proc.pid)

    os.killpg(svc.proc.pid, signal.SIGKILL)
    again = _wait_for_new_instance(address, first.instance)
    assert again.pid != first.pid
    assert cluster.restarts == {"slow": 1} and _restarts("slow") == before + 1
    assert (cluster.log_dir / "slow.pid").read_text().strip() == str(
        cluster.services["slow"].proc.pid)


def test_a_service_that_keeps_dying_is_restarted_only_max_restarts_times(cluster):
    cluster, env = cluster
    address = free_tcp_address()
    cluster.start("slow", "slowsvc", [address], address, env)
    cluster.wait_ready(60)
    cluster.services["slow"].env = {**env, "DIE_AT_ONCE": "1"}  # every restart exits at once
    cluster.supervise(max_restarts=2, poll_s=0.1)
    os.killpg(cluster.services["slow"].proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while cluster.restarts.get("slow", 0) < 2 or cluster.services["slow"].proc.poll() is None:
        assert time.monotonic() < deadline, cluster.restarts
        time.sleep(0.2)
    time.sleep(1.0)  # the supervisor would have restarted it again by now
    assert cluster.restarts == {"slow": 2}
    assert cluster.services["slow"].proc.returncode == 3


def test_a_score_lost_with_its_replica_is_sent_again_to_the_restarted_one(cluster):
    """The master's reward client: the only replica is killed mid-request, the launcher
    restarts it, and the request is answered by the new process (no iteration redone)."""
    cluster, env = cluster
    address = free_tcp_address()
    svc = cluster.start("slow", "slowsvc", [address], address, env)
    cluster.wait_ready(60)
    cluster.supervise(max_restarts=1, poll_s=0.1)
    first_pid = svc.proc.pid
    threading.Timer(1.0, os.killpg, (first_pid, signal.SIGKILL)).start()
    clients = BalancedClients([address], timeout_s=600, ping_every_s=0.5, misses=2,
                              restart_wait_s=60)
    started = time.monotonic()
    reply = clients.call("logprobs", _seconds(3), LogprobResult)
    assert reply.logprobs[0][0] == cluster.services["slow"].proc.pid != first_pid
    assert time.monotonic() - started < 60  # not the call's 600 s timeout
    clients.close()


def _wait_for_new_instance(address: str, instance: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    with RPCClient(address, timeout_s=1.0) as client:
        while time.monotonic() < deadline:
            try:
                pong = client.ping()
                if pong.ready and pong.instance != instance:
                    return pong
            except TimeoutError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} was not restarted within {timeout_s} s")


# ---------------------------------------------------------------------------- the ledger


def _entry(key: str, iteration: int, status: str, **kw) -> LedgerEntry:
    return LedgerEntry(key=key, problem=f"p{key}", iteration=iteration, status=status,
                       **{"trajectories": 4, **kw})


def test_the_ledger_rewinds_the_lines_of_an_iteration_that_did_not_complete(tmp_path):
    ledger = PromptLedger(tmp_path)
    ledger.append([_entry("0-0", 0, "parked"), _entry("0-1", 0, "trained", trained=4)])
    ledger.append([_entry("0-0", 1, "trained", trained=3, dropped={"empty response": 1}),
                   _entry("1-0", 1, "parked")])
    assert ledger.rewind(iterations_done=1) == 2  # iteration 1 died before its state
    assert {k: e.status for k, e in ledger.latest().items()} == {"0-0": "parked",
                                                                 "0-1": "trained"}
    assert ledger.rewind(iterations_done=1) == 0


def test_an_audit_finds_lost_groups_short_groups_and_double_records(tmp_path):
    ledger = PromptLedger(tmp_path)
    ledger.append([_entry("0-0", 0, "trained", trained=4),
                   _entry("0-1", 0, "trained", trained=2, dropped={"reward error": 1}),
                   _entry("0-2", 0, "parked"), _entry("0-3", 0, "parked"),
                   _entry("0-4", 0, "dropped", trajectories=0, reason="replay buffer full")])
    ledger.append([_entry("0-3", 0, "parked")])  # recorded again for the same iteration
    found = audit(ledger, parked_keys={"0-3"}, n=4)
    assert found["by_status"] == {"trained": 2, "parked": 2, "dropped": 1}
    assert found["lost_groups"] == ["0-2"]  # parked, but not in the replay buffer
    assert found["lost_trajectories"] == 1 + 4  # one of 0-1's, all of 0-2's
    assert found["recorded_twice"] == ["0-3"]
