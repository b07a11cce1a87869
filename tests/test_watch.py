"""The master's watched calls: a service that dies during a call is noticed in seconds, and
a call that is safe to repeat waits for the restarted service and is sent again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import REGISTRY

from k1rl.launch import free_tcp_address
from k1rl.protocol import LogprobRequest, LogprobResult
from k1rl.rpc import wait_until_ready
from k1rl.watch import PeerGone, WatchedClient

# A service whose "logprobs" takes as many seconds as it is given prompts, and answers
# with its own pid, so that a reply tells which incarnation of the service gave it.
SERVICE = """
import os, sys, time
from k1rl.protocol import LogprobRequest, LogprobResult
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled

def slow(req):
    time.sleep(len(req.prompt_token_ids))
    return LogprobResult(logprobs=[[float(os.getpid())]], policy_version=0)

server = RPCServer(sys.argv[1], "slow")
server.register("logprobs", LogprobRequest, slow)
server.register("train", LogprobRequest, slow)
server.start_in_thread()
run_until_signalled(server)
"""


def _start(address: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SERVICE, address], start_new_session=True)
    wait_until_ready(address, 60)
    return proc


def _seconds(n: int) -> LogprobRequest:
    return LogprobRequest(prompt_token_ids=[[1]] * n, response_token_ids=[[1]] * n)


@pytest.fixture
def service():
    address = free_tcp_address()
    procs = [_start(address)]
    yield address, procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_after(proc: subprocess.Popen, seconds: float) -> None:
    threading.Timer(seconds, lambda: os.killpg(proc.pid, signal.SIGKILL)).start()


def _kill_and_restart(address: str, procs: list, kill_at: float, restart_at: float) -> None:
    """SIGKILL the service after ``kill_at`` s; start another on its address at ``restart_at``."""
    _kill_after(procs[0], kill_at)
    threading.Timer(restart_at, lambda: procs.append(_start(address))).start()


def _client(address: str, restart_wait_s: float = 0.0) -> WatchedClient:
    return WatchedClient(address, timeout_s=600, ping_every_s=0.5, misses=2,
                         restart_wait_s=restart_wait_s, idempotent=frozenset({"logprobs"}))


def test_a_service_killed_during_a_call_is_noticed_in_seconds_not_at_the_timeout(service):
    address, procs = service
    client = _client(address)
    assert client.call("logprobs", _seconds(0), LogprobResult).logprobs == [[procs[0].pid]]
    _kill_after(procs[0], 1.0)
    started = time.monotonic()
    with pytest.raises(PeerGone, match="stopped answering during 'train'"):
        client.call("train", _seconds(30), LogprobResult)
    assert time.monotonic() - started < 5  # 1 s of work, then two missed pings


def test_a_repeatable_call_waits_for_the_restarted_service_and_is_sent_again(service):
    address, procs = service
    client = _client(address, restart_wait_s=60)
    _kill_and_restart(address, procs, kill_at=1.0, restart_at=3.0)
    reply = client.call("logprobs", _seconds(3), LogprobResult)
    assert reply.logprobs == [[procs[1].pid]]  # the restarted service's answer
    assert client.resent == 1
    # what Prometheus reads of it (the master's /metrics)
    labels = {"address": address, "method": "logprobs"}
    assert REGISTRY.get_sample_value("k1rl_calls_peer_gone_total", labels) == 1
    assert REGISTRY.get_sample_value("k1rl_calls_resent_total", labels) == 1


def test_a_call_that_changes_state_is_not_sent_again_to_a_restarted_service(service):
    address, procs = service
    client = _client(address, restart_wait_s=60)
    _kill_and_restart(address, procs, kill_at=1.0, restart_at=2.0)
    with pytest.raises(PeerGone):
        client.call("train", _seconds(3), LogprobResult)
    assert client.resent == 0
