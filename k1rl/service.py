"""Process plumbing shared by every service entry point."""

from __future__ import annotations

import logging
import signal
import threading
import time

from k1rl.rpc import RPCServer


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


# Set by SIGTERM/SIGINT once _catch_signals() ran. The handler only flips a flag: it runs
# on the main thread between two bytecodes, possibly inside a wait, so taking a lock there
# (threading.Event.set) can deadlock against that same thread; seen as a rollout_svc
# that ignored SIGTERM.
_stopping = [False]


def _catch_signals() -> None:
    def _on_signal(signum, _frame):
        _stopping[0] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def run_until_signalled(server: RPCServer) -> None:
    """Block until SIGTERM/SIGINT, then stop the server so in-flight work can end cleanly.

    Kubernetes sends SIGTERM on pod termination; turning it into an orderly stop lets
    the service release its engine and transport memory instead of dying mid-write.
    """
    _catch_signals()
    while not _stopping[0]:
        time.sleep(0.2)
    server.stop()


def wait_unless_signalled(event: threading.Event) -> bool:
    """Block until ``event`` is set (True) or SIGTERM/SIGINT arrives (False); a signal
    that arrives after is still seen by :func:`run_until_signalled`."""
    _catch_signals()
    while not _stopping[0]:
        if event.wait(0.2):
            return True
    return False
