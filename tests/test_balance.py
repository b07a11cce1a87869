"""Requests spread over a service's replicas (k1rl/balance.py), with real RPC servers as
the replicas: least-busy first, at most ``max_in_flight`` each, a dead replica set aside,
headless-service names resolved."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from k1rl.balance import BalancedClients, NoReplicaError
from k1rl.launch import free_tcp_address
from k1rl.protocol import Ping, Pong
from k1rl.rpc import RPCServer


class Replica:
    """An RPC server whose ``work`` takes a while and counts the calls it runs at once."""

    def __init__(self, seconds: float = 0.3):
        self.server = RPCServer(free_tcp_address(), "replica", handler_threads=8)
        self.seconds, self.running, self.peak, self.calls = seconds, 0, 0, 0
        self._lock = threading.Lock()
        self.server.register("work", Ping, self.work)
        self.server.start_in_thread()

    @property
    def address(self) -> str:
        return self.server.address

    def work(self, _: Ping) -> Pong:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return Pong(service="replica", pid=0, uptime_s=0.0, ready=True)


@pytest.fixture
def replicas():
    made = [Replica() for _ in range(3)]
    yield made
    for r in made:
        r.server.stop()


def test_requests_go_to_the_least_busy_replica_and_never_above_the_bound(replicas):
    clients = BalancedClients([r.address for r in replicas], max_in_flight=1, timeout_s=10)
    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(lambda _: clients.call("work", Ping(), Pong), range(6)))
    clients.close()
    assert len(replies) == 6
    assert [r.calls for r in replicas] == [2, 2, 2]
    assert [r.peak for r in replicas] == [1, 1, 1]  # the 4th..6th request waited


def test_a_replica_that_does_not_answer_is_set_aside(replicas):
    gone = free_tcp_address()  # nobody listens there
    clients = BalancedClients([gone, replicas[0].address], max_in_flight=2, timeout_s=1.0)
    for _ in range(3):
        clients.call("work", Ping(), Pong)
    assert replicas[0].calls == 3
    assert gone not in clients.served
    clients.close()
    alone = BalancedClients([gone], timeout_s=0.5)
    with pytest.raises(NoReplicaError, match="no replica"):
        alone.call("work", Ping(), Pong)


def test_a_headless_service_name_stands_for_its_addresses(replicas):
    port = replicas[1].address.rsplit(":", 1)[1]
    clients = BalancedClients([f"dns://localhost:{port}"], timeout_s=5)
    assert clients.replicas == [f"tcp://127.0.0.1:{port}"]
    clients.call("work", Ping(), Pong)
    assert replicas[1].calls == 1
    with pytest.raises(ValueError, match="not dns://HOST:PORT"):
        BalancedClients(["dns://localhost"])
