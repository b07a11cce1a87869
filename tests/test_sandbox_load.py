"""Load: 1,000 mixed requests from 16 clients at once against a two-worker sandbox
service. Every one is answered, none times out, and each result is the one the same
request gets when sent alone."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from k1rl.config import SandboxConfig
from k1rl.protocol import RunCodeRequest, RunCodeResult, TestCase
from k1rl.rpc import RPCClient, ThreadLocalClients

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"),
                                                   reason="needs bubblewrap")]

CLIENTS = 16
REQUESTS = 1000
ADD_CPP = "#include <cstdio>\nint main() { long long x; scanf(\"%lld\", &x); " \
          "printf(\"%lld\\n\", x + 1); }\n"
# (language, source, expected(i) or None, request options); the test's stdin is str(i)
KINDS = [
    ("python", "print(int(input()) + 1)", lambda i: str(i + 1), {}),
    ("python", "print(int(input()) + 2)", lambda i: str(i + 1), {}),  # wrong answer
    ("python", "raise SystemExit(int(input()) % 7)", None, {}),       # exit codes 0..6
    ("python", "import sys\nsys.stdout.write('y' * 5000)", None, {"output_limit_kb": 4}),
    ("cpp", ADD_CPP, lambda i: str(i + 1), {}),                       # compiled once, cached
    ("c", "int main(void) { return }", None, {}),                     # compile error
    ("bash", "read x\necho $((x * 2))", lambda i: str(2 * i), {}),
]
SLOW = ("python", "while True:\n    pass", None, {"time_limit_s": 0.2})  # every 100th


def request(i: int) -> RunCodeRequest:
    language, source, expected, options = SLOW if i % 100 == 99 else KINDS[i % len(KINDS)]
    return RunCodeRequest(language=language, source=source, tests=[
        TestCase(stdin=str(i), expected=expected(i) if expected else None)], **options)


def outcome(r: RunCodeResult) -> tuple:
    """What must not depend on load: verdicts, output and the exit status of programs
    that ended by themselves (not timings; not whether a program the sandbox stopped had
    exited before the kill arrived)."""
    return (r.verdict, r.error, r.compile.ok if r.compile else None, r.skipped,
            [(t.verdict, t.stdout) + ((t.exit_code, t.signal) if t.verdict in (
                "accepted", "wrong_answer", "runtime_error") else ()) for t in r.tests])


@pytest.fixture(scope="module")
def address():
    from k1rl.launch import free_tcp_address
    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=None, workers=2,
                        uid_base=62800, work_root=f"/tmp/k1rl-sandbox-load-{os.getpid()}")
    servers = Servers(cfg).start()
    yield servers.rpc.address
    servers.stop()


def test_a_thousand_mixed_requests_from_sixteen_clients_match_running_them_alone(address):
    requests = [request(i) for i in range(REQUESTS)]
    clients = ThreadLocalClients(address, timeout_s=120)
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            loaded = list(pool.map(
                lambda req: clients.call("run_code", req, RunCodeResult, timeout_s=120),
                requests))
    finally:
        clients.close()
    alone_client = RPCClient(address, timeout_s=120)
    try:
        alone = [alone_client.call("run_code", req, RunCodeResult) for req in requests]
    finally:
        alone_client.close()
    assert len(loaded) == REQUESTS and not any(r.verdict == "sandbox_error" for r in loaded)
    mismatched = [i for i in range(REQUESTS) if outcome(loaded[i]) != outcome(alone[i])]
    assert not mismatched, [(i, outcome(loaded[i]), outcome(alone[i])) for i in mismatched[:3]]
    verdicts = {r.verdict for r in alone}
    assert verdicts == {"accepted", "wrong_answer", "runtime_error", "output_limit",
                        "compile_error", "time_limit"}
