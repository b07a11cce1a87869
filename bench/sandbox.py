"""Sandbox speed: start overhead, sustained throughput, tests per second.

    python bench/sandbox.py [--workers 2] [--seconds 10]

Last line, one JSON object:
  bare_ms      median wall time of a Python hello-world via plain subprocess
  isolated_ms  median round trip of the same program through the sandbox service
               (ZMQ request -> worker -> bubblewrap + cgroups + seccomp -> verdict)
  overhead_ms  isolated_ms - bare_ms                       (target <= 15)
  runs_per_s   sustained hello-world runs through the service, `workers` workers and
               twice as many concurrent clients               (target >= 60 on 2 cores)
  tests_per_s  one compiled C++ program over 100 test cases, compile time excluded
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k1rl.config import SandboxConfig  # noqa: E402
from k1rl.launch import free_tcp_address  # noqa: E402
from k1rl.protocol import RunCodeRequest, RunCodeResult, TestCase  # noqa: E402
from k1rl.rpc import RPCClient  # noqa: E402

HELLO = "print('hello')\n"
SQUARE_CPP = ("#include <cstdio>\nint main(){long long a;if(scanf(\"%lld\",&a)!=1)return 1;"
              "printf(\"%lld\\n\",a*a);}\n")


def bare_ms(samples: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "main.py"
        path.write_text(HELLO)
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            subprocess.run(["/usr/bin/python3", "-S", "-B", str(path)], capture_output=True,
                           check=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=50)
    args = ap.parse_args()

    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=None, workers=args.workers,
                        uid_base=63000, work_root=f"/tmp/k1rl-sandbox-bench-{os.getpid()}")
    servers = Servers(cfg).start()
    hello = RunCodeRequest(language="python", source=HELLO, tests=[TestCase(expected="hello")])
    try:
        client = RPCClient(servers.rpc.address, timeout_s=60)

        def call(req: RunCodeRequest, c: RPCClient = client) -> RunCodeResult:
            r = c.call("run_code", req, RunCodeResult, timeout_s=120)
            if r.verdict != "accepted":
                raise RuntimeError(f"benchmark program not accepted: {r}")
            return r

        for _ in range(5):  # warm the page cache and the workers
            call(hello)
        bare = bare_ms(args.samples)
        times = []
        for _ in range(args.samples):
            t = time.perf_counter()
            call(hello)
            times.append(time.perf_counter() - t)
        isolated = statistics.median(times) * 1000

        done, stop = [0], time.perf_counter() + args.seconds
        lock = threading.Lock()

        def hammer() -> None:
            c = RPCClient(servers.rpc.address, timeout_s=60)
            try:
                while time.perf_counter() < stop:
                    call(hello, c)
                    with lock:
                        done[0] += 1
            finally:
                c.close()

        started = time.perf_counter()
        threads = [threading.Thread(target=hammer) for _ in range(2 * args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runs_per_s = done[0] / (time.perf_counter() - started)

        tests = [TestCase(stdin=str(i), expected=str(i * i)) for i in range(100)]
        t = time.perf_counter()
        r = call(RunCodeRequest(language="cpp", source=SQUARE_CPP, tests=tests))
        total = time.perf_counter() - t
        tests_per_s = 100 / (total - r.compile.time_s)
        client.close()
    finally:
        servers.stop()
    print(f"sandbox: {args.workers} workers, cgroups {servers.service.pool.cgroups}, "
          f"{os.cpu_count()} CPUs", file=sys.stderr)
    print(json.dumps({
        "bare_ms": round(bare, 2), "isolated_ms": round(isolated, 2),
        "overhead_ms": round(isolated - bare, 2), "runs_per_s": round(runs_per_s, 1),
        "tests_per_s": round(tests_per_s, 1),
    }))


if __name__ == "__main__":
    main()
