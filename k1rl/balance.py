"""Requests spread over the replicas of a service (reward_svc, the sandbox).

A replica takes at most ``max_in_flight`` requests at once; a request goes to the replica
with the fewest in flight, and waits when every replica is full. ``dns://HOST:PORT``
entries are resolved again every ``refresh_s``, so replicas an autoscaler adds behind a
headless service receive work as soon as they resolve. A replica that does not answer is
set aside for ``cooldown_s`` and the request is sent to another (requests to these
services are idempotent). With ``ping_every_s`` a request is watched (k1rl/watch.py): a
replica that dies under it is noticed in seconds, not at the timeout; with
``restart_wait_s``, when no replica is left the request waits that long for one to answer
again (restarted) and is sent to it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel

from k1rl.metrics import prometheus
from k1rl.rpc import RPCClient, RPCTimeout, wait_until_ready
from k1rl.watch import PeerGone, call_watched

T = TypeVar("T", bound=BaseModel)


def resolve_addresses(entries: Sequence[str]) -> list[str]:
    """``tcp://`` addresses as given; ``dns://HOST:PORT`` as ``tcp://IP:PORT`` for every
    IPv4 address HOST resolves to (sorted; e.g. the pods behind a headless service).
    Duplicates are dropped, the order kept."""
    out: list[str] = []
    for entry in entries:
        if not entry.startswith("dns://"):
            out.append(entry)
            continue
        host, _, port = entry.removeprefix("dns://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{entry!r} is not dns://HOST:PORT")
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"{entry}: {host} does not resolve ({exc})") from exc
        out += [f"tcp://{ip}:{port}" for ip in sorted({info[4][0] for info in infos})]
    return list(dict.fromkeys(out))


class NoReplicaError(RPCTimeout):
    """No replica of the service answered."""


class BalancedClients:
    """Thread-safe: each thread gets its own connection to each replica."""

    def __init__(self, entries: Sequence[str], *, max_in_flight: int = 4,
                 timeout_s: float = 30.0, refresh_s: float = 10.0, cooldown_s: float = 30.0,
                 ping_every_s: float | None = None, misses: int = 3,
                 restart_wait_s: float = 0.0):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.entries = list(entries)
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.cooldown_s = cooldown_s
        self.ping_every_s, self.misses = ping_every_s, misses
        self.restart_wait_s = restart_wait_s
        self._cond = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._resolved_at = -float("inf")
        self._local = threading.local()
        self._clients: list[RPCClient] = []
        self.served: dict[str, int] = {}  # requests answered, per replica
        self._refresh()

    @property
    def replicas(self) -> list[str]:
        with self._cond:
            return list(self._in_flight)

    def call(self, method: str, request: BaseModel, response_model: type[T],
             timeout_s: float | None = None) -> T:
        tried: set[str] = set()
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            try:
                address = self._acquire(tried)
            except NoReplicaError:
                if not self._one_answers(deadline):
                    raise
                tried.clear()
                prometheus.CALLS_RESENT.labels(",".join(self.entries), method).inc()
                continue
            try:
                reply = self._send(address, method, request, response_model, timeout_s)
            except PeerGone:
                prometheus.CALLS_LOST.labels(address, method).inc()
                self._release(address, failed=True)
                tried.add(address)
                continue
            except RPCTimeout:
                self._release(address, failed=True)
                tried.add(address)
                continue
            self._release(address, failed=False)
            return reply

    def _send(self, address: str, method: str, request: BaseModel, response_model: type[T],
              timeout_s: float | None) -> T:
        if self.ping_every_s is None:
            return self._client(address).call(method, request, response_model, timeout_s)
        return call_watched(address, method, request, response_model,
                            timeout_s or self.timeout_s, ping_every_s=self.ping_every_s,
                            misses=self.misses)

    def _one_answers(self, deadline: float) -> bool:
        """Wait until ``deadline`` for a replica to answer ready; it is usable again."""
        while time.monotonic() < deadline:
            for address in self.replicas:
                try:
                    wait_until_ready(address, timeout_s=1.0)
                except RPCTimeout:
                    continue
                with self._cond:
                    self._down_until.pop(address, None)
                return True
        return False

    def _acquire(self, tried: set[str]) -> str:
        with self._cond:
            while True:
                if time.monotonic() - self._resolved_at > self.refresh_s:
                    self._refresh()
                now = time.monotonic()
                usable = [a for a in self._in_flight
                          if a not in tried and self._down_until.get(a, 0.0) <= now]
                if not usable:
                    raise NoReplicaError(f"no replica of {self.entries} answered "
                                         f"(tried {sorted(tried) or 'none'})")
                free = [a for a in usable if self._in_flight[a] < self.max_in_flight]
                if free:
                    address = min(free, key=lambda a: (self._in_flight[a], a))
                    self._in_flight[address] += 1
                    return address
                self._cond.wait(timeout=self.refresh_s)

    def _release(self, address: str, failed: bool) -> None:
        with self._cond:
            if address in self._in_flight:
                self._in_flight[address] -= 1
            if failed:
                self._down_until[address] = time.monotonic() + self.cooldown_s
            else:
                self.served[address] = self.served.get(address, 0) + 1
            self._cond.notify_all()

    def _refresh(self) -> None:
        """Re-resolve the entries (under the lock): new replicas join, gone ones leave
        once their requests are done."""
        try:
            current = resolve_addresses(self.entries)
        except ValueError:
            if self._in_flight:  # a DNS hiccup: keep the replicas known so far
                self._resolved_at = time.monotonic()
                return
            raise
        for address in current:
            self._in_flight.setdefault(address, 0)
        for address in [a for a in self._in_flight if a not in current]:
            if self._in_flight[address] == 0:
                del self._in_flight[address]
        self._resolved_at = time.monotonic()

    def _client(self, address: str) -> RPCClient:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if address not in clients:
            clients[address] = RPCClient(address, timeout_s=self.timeout_s)
            with self._cond:
                self._clients.append(clients[address])
        return clients[address]

    def ping(self, timeout_s: float | None = None):
        from k1rl.protocol import Ping, Pong

        return self.call("ping", Ping(), Pong, timeout_s)

    def close(self) -> None:
        with self._cond:
            for client in self._clients:
                client.close()
            self._clients.clear()
