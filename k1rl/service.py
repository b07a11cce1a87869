"""Process plumbing shared by every service entry point."""

from __future__ import annotations

import logging
import signal
import time

from k1rl.rpc import RPCServer


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def run_until_signalled(server: RPCServer) -> None:
    """Block until SIGTERM/SIGINT, then stop the server so in-flight work can end cleanly.

    Kubernetes sends SIGTERM on pod termination; turning it into an orderly stop lets
    the service release its engine and transport memory instead of dying mid-write.
    """
    # The handler only flips a flag: it runs on the main thread between two bytecodes,
    # possibly inside the loop's own wait, so taking a lock there (threading.Event.set)
    # can deadlock against that same thread; seen as a rollout_svc that ignored SIGTERM.
    stopping = [False]

    def _on_signal(signum, _frame):
        stopping[0] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    while not stopping[0]:
        time.sleep(0.2)
    server.stop()
