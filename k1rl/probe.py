"""Health probe of a k1rl service, for Kubernetes exec probes.

    python -m k1rl.probe tcp://127.0.0.1:5701 [--ready] [--timeout 2]

Sends the ZMQ ``ping`` every service answers (on its loop thread, even while a long
call runs on a handler thread) and exits 0 when it answers; with ``--ready`` the
service must also report ready (a rollout engine holding a policy's weights, say, or
a trainer that has loaded its model). Exit 1 otherwise, with the reason on stderr.
Imports only k1rl's rpc layer, so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys

from k1rl.rpc import RPCClient, RPCError


def probe(address: str, ready: bool = False, timeout_s: float = 2.0) -> str | None:
    """None when the service at ``address`` is healthy (and ready, if asked), else why not."""
    try:
        with RPCClient(address, timeout_s=timeout_s) as client:
            pong = client.ping(timeout_s=timeout_s)
    except RPCError as e:
        return f"{address}: {e}"
    if ready and not pong.ready:
        return f"{pong.service} at {address} answers but is not ready: {pong.detail}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m k1rl.probe", description=__doc__.split("\n")[0])
    ap.add_argument("address", help="the service's RPC address, e.g. tcp://127.0.0.1:5701")
    ap.add_argument("--ready", action="store_true", help="require the service to be ready")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = ap.parse_args(argv)
    problem = probe(args.address, args.ready, args.timeout)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
