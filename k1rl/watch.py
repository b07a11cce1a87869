"""A call to a peer that may die in the middle of it.

A ZMQ request to a process that is gone just waits for its timeout, and a rollout's timeout
is many minutes. :func:`call_watched` runs the call on its own thread and pings the peer
meanwhile (every RPCServer answers pings while a handler runs): a peer that stops answering
is given up on after a few missed pings, and the caller gets :class:`PeerGone` at once.
:class:`WatchedClient` is the master's client of one service on that basis.
"""

from __future__ import annotations

import threading
from typing import TypeVar

from pydantic import BaseModel

from k1rl.metrics import prometheus
from k1rl.rpc import RPCClient, RPCTimeout, wait_until_ready

T = TypeVar("T", bound=BaseModel)


class PeerGone(RPCTimeout):
    """The peer stopped answering pings while a call to it was running."""


def call_watched(address: str, method: str, request: BaseModel, response_model: type[T],
                 timeout_s: float, *, ping_every_s: float = 2.0, misses: int = 3,
                 max_message_bytes: int | None = None) -> T:
    """``RPCClient(address).call(method, request, response_model)``, or :class:`PeerGone`
    once ``misses`` pings in a row went unanswered (each waits ``ping_every_s``), or once
    another instance of the service answers (restarted: the call died with the first)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            with RPCClient(address, timeout_s=timeout_s,
                           max_message_bytes=max_message_bytes) as client:
                outcome["reply"] = client.call(method, request, response_model)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    with RPCClient(address, timeout_s=ping_every_s) as pinger:
        try:
            called = pinger.ping().instance
        except RPCTimeout:
            called = None  # not up yet: the call itself waits for it
        # daemon: a call abandoned to a dead peer ends with its own timeout, not the process's
        worker = threading.Thread(target=run, name=f"call-{method}", daemon=True)
        worker.start()
        missed = 0
        while True:
            worker.join(ping_every_s)
            if not worker.is_alive():
                break
            try:
                instance = pinger.ping().instance
                missed = 0
            except RPCTimeout:
                missed += 1
            else:
                called = called or instance
                if instance != called:
                    raise PeerGone(f"{address} was restarted during {method!r}: the call "
                                   "was lost with the service that took it")
            if missed >= misses:
                raise PeerGone(f"{address} stopped answering during {method!r} "
                               f"({misses} pings of {ping_every_s:g} s missed)")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["reply"]  # type: ignore[return-value]


class WatchedClient:
    """An :class:`RPCClient` for the master's calls to one service: every call is watched
    (:func:`call_watched`), and a call to a method in ``idempotent`` that lost its service
    waits up to ``restart_wait_s`` for the service to answer again, then is sent again.
    Other methods raise :class:`PeerGone`: repeating them (a train step, a weight push)
    is the caller's recovery to decide."""

    def __init__(self, address: str, *, timeout_s: float, ping_every_s: float = 2.0,
                 misses: int = 3, restart_wait_s: float = 0.0,
                 idempotent: frozenset[str] = frozenset(),
                 max_message_bytes: int | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.ping_every_s, self.misses = ping_every_s, misses
        self.restart_wait_s = restart_wait_s
        self.idempotent = idempotent
        self.max_message_bytes = max_message_bytes
        self.resent = 0  # calls sent again after their service came back

    @classmethod
    def for_policy(cls, address: str, policy, **kwargs) -> WatchedClient:
        """From a :class:`k1rl.config.CallPolicy`."""
        return cls(address, timeout_s=policy.timeout_s, ping_every_s=policy.ping_every_s,
                   misses=policy.misses, restart_wait_s=policy.restart_wait_s, **kwargs)

    def call(self, method: str, request: BaseModel, response_model: type[T],
             timeout_s: float | None = None) -> T:
        while True:
            try:
                return call_watched(self.address, method, request, response_model,
                                    timeout_s or self.timeout_s,
                                    ping_every_s=self.ping_every_s, misses=self.misses,
                                    max_message_bytes=self.max_message_bytes)
            except PeerGone:
                prometheus.CALLS_LOST.labels(self.address, method).inc()
                if method not in self.idempotent or not self._answers_again():
                    raise
                self.resent += 1
                prometheus.CALLS_RESENT.labels(self.address, method).inc()

    def _answers_again(self) -> bool:
        """Whether the service is back and ready within ``restart_wait_s``."""
        try:
            wait_until_ready(self.address, self.restart_wait_s)
        except RPCTimeout:
            return False
        return True

    def ping(self, timeout_s: float | None = None):
        with RPCClient(self.address, timeout_s=timeout_s or self.ping_every_s) as client:
            return client.ping()

    def close(self) -> None:
        """Nothing held between calls (each call has its own sockets)."""
