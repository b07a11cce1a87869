"""Sandbox speed: start overhead, sustained throughput, tests per second.

    python bench/sandbox.py [--workers 2] [--seconds 10]

Last line, one JSON object:
  bare_ms      median wall time of a Python hello-world via plain subprocess
  isolated_ms  median round trip of the same program through the sandbox service
               (ZMQ request -> worker -> bubblewrap + cgroups + seccomp -> verdict)
  overhead_ms  isolated_ms - bare_ms                       (target <= 5)
  runs_per_s   sustained hello-world runs through the service, `workers` workers and
               twice as many concurrent clients               (target >= 100 on 2 cores)
  tests_per_s  one compiled C++ program over 100 test cases, compile time excluded
  concurrent_clients_p99_ms
               p99 round trip of hello-world runs from 16 clients at once
               (`failed` counts requests not accepted or not answered in time: target 0)
  languages    per language: `compile_s` (first compile), `cached_compile_ms` (the same
               source again: the compile cache), `run_ms` (median in-sandbox wall time of
               a hello-world over 20 tests); a language whose toolchain is missing is left out
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
HELLO_IN = {
    "python": HELLO,
    "c": "#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n",
    "cpp": "#include <cstdio>\nint main() { std::puts(\"hello\"); }\n",
    "java": "public class Main { public static void main(String[] a) { "
            "System.out.println(\"hello\"); } }\n",
    "go": "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello\") }\n",
    "rust": "fn main() { println!(\"hello\"); }\n",
    "javascript": "console.log(\"hello\");\n",
    "bash": "echo hello\n",
    "ruby": "puts \"hello\"\n",
}
CLIENTS = 16
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


def load(address: str, req: RunCodeRequest, clients: int, seconds: float
         ) -> tuple[list[float], int, float]:
    """``req`` sent by ``clients`` clients at once for ``seconds``: the sorted round trips
    (s), how many were not accepted or not answered within 30 s, and the elapsed time."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client_loop() -> None:
        c = RPCClient(address, timeout_s=30)
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    ok = c.call("run_code", req, RunCodeResult, timeout_s=30).verdict == \
                        "accepted"
                except Exception:  # noqa: BLE001 - a timeout or a refused call is a failure
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - t)
                    failed[0] += not ok
        finally:
            c.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(latencies), failed[0], time.perf_counter() - started


def language_starts(call) -> dict[str, dict[str, float]]:
    """Compile and start cost of a hello-world in each language whose toolchain is here."""
    from sandbox import languages

    table = {}
    for name, source in HELLO_IN.items():
        lang = languages.get(name)
        if not os.path.exists((lang.compile or lang.run)[0]):
            continue
        tests = [TestCase(expected="hello") for _ in range(20)]
        source += f"{'#' if name in ('python', 'bash', 'ruby') else '//'} {os.urandom(6).hex()}\n"
        first = call(RunCodeRequest(language=name, source=source, tests=tests,
                                    time_limit_s=10))
        again = call(RunCodeRequest(language=name, source=source, tests=tests[:1],
                                    time_limit_s=10))
        row = {"run_ms": round(statistics.median(t.wall_s for t in first.tests) * 1000, 1)}
        if first.compile is not None:
            row["compile_s"] = round(first.compile.time_s, 2)
            row["cached_compile_ms"] = round(again.compile.time_s * 1000, 1)
        table[name] = row
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--no-prewarm", action="store_true",
                    help="start every sandbox on the spot (sandbox.prewarm: false)")
    args = ap.parse_args()

    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=None, workers=args.workers,
                        uid_base=63000, work_root=f"/tmp/k1rl-sandbox-bench-{os.getpid()}",
                        prewarm=not args.no_prewarm)
    servers = Servers(cfg).start()
    hello = RunCodeRequest(language="python", source=HELLO, tests=[TestCase(expected="hello")])
    try:
        client = RPCClient(servers.rpc.address, timeout_s=60)

        def call(req: RunCodeRequest) -> RunCodeResult:
            r = client.call("run_code", req, RunCodeResult, timeout_s=120)
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

        runs, failed, elapsed = load(servers.rpc.address, hello, 2 * args.workers,
                                     args.seconds)
        if failed:
            raise RuntimeError(f"{failed} benchmark runs were not accepted")
        runs_per_s = len(runs) / elapsed
        latencies, failed, _ = load(servers.rpc.address, hello, CLIENTS, args.seconds)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
        per_language = language_starts(call)
        tests = [TestCase(stdin=str(i), expected=str(i * i)) for i in range(100)]
        t = time.perf_counter()
        r = call(RunCodeRequest(language="cpp", source=SQUARE_CPP, tests=tests))
        total = time.perf_counter() - t
        tests_per_s = 100 / (total - r.compile.time_s)
        client.close()
    finally:
        servers.stop()
    print(f"sandbox: {args.workers} workers, cgroups {servers.service.pool.cgroups}, "
          f"prewarm {cfg.prewarm}, {os.cpu_count()} CPUs", file=sys.stderr)
    print(json.dumps({
        "bare_ms": round(bare, 2), "isolated_ms": round(isolated, 2),
        "overhead_ms": round(isolated - bare, 2), "runs_per_s": round(runs_per_s, 1),
        "tests_per_s": round(tests_per_s, 1), "concurrent_clients_p99_ms": round(p99, 1),
        "concurrent_clients_failed": failed, "languages": per_language,
    }))


if __name__ == "__main__":
    main()
