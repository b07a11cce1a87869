"""A call to a peer that may die in the middle of it.

A ZMQ request to a process that is gone just waits for its timeout, and a rollout's timeout
is many minutes. :func:`call_watched` runs the call on its own thread and pings the peer
meanwhile (every RPCServer answers pings while a handler runs): a peer that stops answering
is given up on after a few missed pings, and the caller gets :class:`PeerGone` at once.
"""

from __future__ import annotations

import threading
from typing import TypeVar

from pydantic import BaseModel

from k1rl.rpc import RPCClient, RPCTimeout

T = TypeVar("T", bound=BaseModel)


class PeerGone(RPCTimeout):
    """The peer stopped answering pings while a call to it was running."""


def call_watched(address: str, method: str, request: BaseModel, response_model: type[T],
                 timeout_s: float, *, ping_every_s: float = 2.0, misses: int = 3) -> T:
    """``RPCClient(address).call(method, request, response_model)``, or :class:`PeerGone`
    once ``misses`` pings in a row went unanswered (each waits ``ping_every_s``)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            with RPCClient(address, timeout_s=timeout_s) as client:
                outcome["reply"] = client.call(method, request, response_model)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    # daemon: a call abandoned to a dead peer ends with its own timeout, not the process's
    worker = threading.Thread(target=run, name=f"call-{method}", daemon=True)
    worker.start()
    missed = 0
    with RPCClient(address, timeout_s=ping_every_s) as pinger:
        while True:
            worker.join(ping_every_s)
            if not worker.is_alive():
                break
            try:
                pinger.ping()
                missed = 0
            except RPCTimeout:
                missed += 1
            if missed >= misses:
                raise PeerGone(f"{address} stopped answering during {method!r} "
                               f"({misses} pings of {ping_every_s:g} s missed)")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["reply"]  # type: ignore[return-value]
