"""Hostile programs, in Python and C++, against a real sandbox service, with each runner
(bwrap, and podman/runc when podman is installed: `make test` installs it).

Each attack must be contained with the right verdict, leave the host untouched, and
the service must answer the next request normally.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from k1rl.protocol import RunCodeRequest, RunCodeResult, TestCase
from tests.sandbox_engines import RUNNERS, serve

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")

PROJECT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module", params=RUNNERS)
def sandbox(request):
    uid_base = {"bwrap": 62000, "podman": 62400, "docker": 62460}[request.param]
    yield from serve(request.param, uid_base, "attacks")


def run(sandbox, language: str, source: str, **kw) -> RunCodeResult:
    client, _ = sandbox
    req = RunCodeRequest(language=language, source=source, **kw)
    return client.call("run_code", req, RunCodeResult, timeout_s=300)


def over_paths(language: str, python: str, cpp: str, paths: list[str]) -> str:
    """The attack program in ``language`` with ``paths`` filled in."""
    if language == "python":
        return python.format(paths=paths)
    return cpp.replace("PATHS", ", ".join(f'"{p}"' for p in paths))


def still_serves(sandbox) -> None:
    r = run(sandbox, "python", "print(int(input()) + 1)",
            tests=[TestCase(stdin="41", expected="42")])
    assert r.verdict == "accepted", r


# ----------------------------------------------------------------- the attacks

HOST_LISTENER_PY = """
import socket, sys
try:
    s = socket.socket()
    s.settimeout(2)
    s.connect(("127.0.0.1", {port}))
    s.sendall(b"escaped")
    print("CONNECTED")
except OSError as e:
    print("blocked:", e); sys.exit(3)
"""
HOST_LISTENER_CPP = r"""
#include <arpa/inet.h>
#include <cstdio>
#include <sys/socket.h>
#include <unistd.h>
int main() {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) { perror("socket"); return 3; }
  sockaddr_in a{}; a.sin_family = AF_INET; a.sin_port = htons(PORT);
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(s, (sockaddr*)&a, sizeof a) != 0) { perror("connect"); return 3; }
  write(s, "escaped", 7); puts("CONNECTED"); return 0;
}
"""


def against_a_host_listener(send) -> tuple[RunCodeResult, bool]:
    """``send(port)``'s result while a host loopback listener waits on ``port``, and
    whether the listener got a connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    accepted = []

    def accept():
        try:
            accepted.append(listener.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        r = send(listener.getsockname()[1])
    finally:
        t.join()
        listener.close()
    return r, bool(accepted)


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_no_network_to_a_host_loopback_listener(sandbox, language):
    def send(port: int) -> RunCodeResult:
        src = HOST_LISTENER_PY.format(port=port) if language == "python" else \
            HOST_LISTENER_CPP.replace("PORT", str(port))
        return run(sandbox, language, src)

    r, connected = against_a_host_listener(send)
    assert not connected
    assert r.verdict == "runtime_error" and "CONNECTED" not in r.tests[0].stdout
    # refused by the seccomp filter (no inet sockets) or the empty network namespace
    said = r.tests[0].stdout + r.tests[0].stderr
    assert "blocked" in said or "socket:" in said or "connect:" in said, said
    still_serves(sandbox)


SECRETS = [str(PROJECT / "pyproject.toml"), "/root", "/etc/shadow", "/etc/passwd",
           str(Path.home())]
READ_PY = """
import os
for p in {paths!r}:
    try:
        if os.path.isdir(p):
            print("LISTED", p, os.listdir(p))
        else:
            print("READ", p, open(p).read()[:50])
    except OSError as e:
        print("denied", p, type(e).__name__)
"""
READ_CPP = r"""
#include <cstdio>
#include <dirent.h>
int main() {
  const char* paths[] = {PATHS};
  for (const char* p : paths) {
    if (DIR* d = opendir(p)) { printf("LISTED %s\n", p); closedir(d); continue; }
    if (FILE* f = fopen(p, "r")) { printf("READ %s\n", p); fclose(f); continue; }
    printf("denied %s\n", p);
  }
}
"""


def host_secrets(sandbox) -> list[str]:
    """SECRETS, but /etc/passwd for the docker runner: podman serving the Docker API writes
    the container user's own passwd line there (checked by the next test)."""
    _, servers = sandbox
    return [p for p in SECRETS
            if not (p == "/etc/passwd" and servers.service.cfg.runner == "docker")]


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_host_files_are_invisible(sandbox, language):
    secrets = host_secrets(sandbox)
    r = run(sandbox, language, over_paths(language, READ_PY, READ_CPP, secrets))
    out = r.tests[0].stdout
    assert r.verdict == "accepted", r
    assert out.count("denied") == len(secrets), out
    assert "READ" not in out and "LISTED" not in out
    still_serves(sandbox)


def test_a_passwd_file_in_the_sandbox_holds_nothing_of_the_host(sandbox):
    r = run(sandbox, "python", "try:\n    print(open('/etc/passwd').read())\n"
                               "except OSError:\n    print('none')")
    lines = r.tests[0].stdout.strip().splitlines()
    assert r.verdict == "accepted" and lines, r
    if lines != ["none"]:  # bwrap and podman: none; podman's Docker API: the program's uid
        cfg = sandbox[1].service.cfg
        uids = {str(cfg.uid_base + i) for i in range(cfg.workers)}
        assert len(lines) == 1 and lines[0].split(":")[2] in uids, lines
        assert lines[0].split(":")[2] == lines[0].split(":")[3], lines


WRITE_PY = """
import os
for p in {paths!r}:
    try:
        with open(p, "w") as f:
            f.write("pwned")
        print("WROTE", p)
    except OSError as e:
        print("denied", p, type(e).__name__)
"""
WRITE_CPP = r"""
#include <cstdio>
int main() {
  const char* paths[] = {PATHS};
  for (const char* p : paths) {
    if (FILE* f = fopen(p, "w")) { fputs("pwned", f); fclose(f); printf("WROTE %s\n", p); }
    else printf("denied %s\n", p);
  }
}
"""


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_no_writes_outside_the_scratch_dir(sandbox, language, tmp_path):
    targets = [str(PROJECT / f"pwned-{language}"), f"/root/pwned-{language}",
               f"/usr/pwned-{language}", f"/code/pwned-{language}", f"/etc/pwned-{language}",
               str(tmp_path / "pwned")]
    r = run(sandbox, language, over_paths(language, WRITE_PY, WRITE_CPP, targets))
    assert "WROTE" not in r.tests[0].stdout, r.tests[0].stdout
    for t in targets:
        assert not os.path.exists(t), t
    # the scratch dir is writable (programs may need temp files) and private to the run
    r = run(sandbox, "python", "open('/tmp/x', 'w').write('ok'); print(open('/tmp/x').read())")
    assert r.verdict == "accepted" and r.tests[0].stdout == "ok\n"
    still_serves(sandbox)


FORK_BOMB_PY = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
FORK_BOMB_CPP = r"""
#include <unistd.h>
int main() { while (true) fork(); }
"""


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_fork_bomb(sandbox, language):
    src = FORK_BOMB_PY if language == "python" else FORK_BOMB_CPP
    r = run(sandbox, language, src, time_limit_s=1.0, wall_limit_s=3.0)
    assert r.verdict == "time_limit", r
    assert r.tests[0].wall_s < 10
    still_serves(sandbox)
    _no_process_left(sandbox)


MEMORY_BOMB_PY = "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n"
MEMORY_BOMB_CPP = r"""
#include <cstring>
#include <cstdlib>
int main() { while (true) { char* p = (char*)malloc(1 << 24); if (p) memset(p, 1, 1 << 24); } }
"""


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_memory_bomb(sandbox, language):
    src = MEMORY_BOMB_PY if language == "python" else MEMORY_BOMB_CPP
    r = run(sandbox, language, src, memory_limit_mb=128)
    assert r.verdict == "memory_limit", r
    assert r.tests[0].memory_kb <= 200 * 1024
    still_serves(sandbox)


@pytest.mark.parametrize("language,src", [
    ("python", "while True:\n    pass\n"),
    ("cpp", "int main() { volatile unsigned long x = 0; while (true) x++; }"),
])
def test_infinite_loop(sandbox, language, src):
    r = run(sandbox, language, src, time_limit_s=1.0)
    assert r.verdict == "time_limit", r
    assert r.tests[0].cpu_s >= 0.9
    still_serves(sandbox)


@pytest.mark.parametrize("language,src", [
    ("python", "import time\ntime.sleep(30)\n"),
    ("cpp", "#include <unistd.h>\nint main() { sleep(30); }"),
])
def test_sleeping_past_the_wall_limit(sandbox, language, src):
    r = run(sandbox, language, src, time_limit_s=1.0, wall_limit_s=2.0)
    assert r.verdict == "time_limit" and "wall" in r.tests[0].detail, r
    assert 2.0 <= r.tests[0].wall_s < 5.0
    still_serves(sandbox)


@pytest.mark.parametrize("language,src", [
    ("python", "import sys\nb = 'x' * (1 << 20)\nwhile True:\n    sys.stdout.write(b)\n"),
    ("cpp", "#include <cstdio>\n#include <string>\n"
            "int main() { std::string b(1 << 20, 'x'); while (true) fputs(b.c_str(), stdout); }"),
])
def test_gigabytes_of_output(sandbox, language, src):
    r = run(sandbox, language, src, output_limit_kb=1024, time_limit_s=5)
    assert r.verdict == "output_limit", r
    assert len(r.tests[0].stdout) <= 4096  # what the response carries back
    still_serves(sandbox)


@pytest.mark.parametrize("language,src", [
    ("python", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
               "os.kill(-1, signal.SIGKILL)\nprint('survived')\n"),
    ("cpp", "#include <csignal>\n#include <unistd.h>\n#include <cstdio>\n"
            "int main() { kill(getppid(), SIGKILL); kill(-1, SIGKILL); puts(\"survived\"); }"),
])
def test_killing_its_parent_kills_only_the_sandbox(sandbox, language, src):
    _, servers = sandbox
    workers = [w.proc.pid for w in servers.service.pool.workers]
    r = run(sandbox, language, src)
    assert r.verdict in ("runtime_error", "accepted"), r
    assert [w.proc.pid for w in servers.service.pool.workers] == workers  # none restarted
    assert all(w.proc.is_alive() for w in servers.service.pool.workers)
    still_serves(sandbox)


PROC_PY = """
import os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print(len(pids), sorted(pids, key=int))
for p in pids:
    try:
        print(p, open(f"/proc/{p}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except OSError as e:
        print(p, "denied")
try:
    print("HOST", open("/proc/HOST/cmdline").read())
except OSError:
    print("no host pid")
"""
PROC_CPP = r"""
#include <cstdio>
#include <dirent.h>
#include <cctype>
int main() {
  DIR* d = opendir("/proc"); int n = 0;
  while (dirent* e = readdir(d)) if (isdigit(e->d_name[0])) { printf("%s\n", e->d_name); n++; }
  printf("count %d\n", n);
  if (FILE* f = fopen("/proc/HOST/cmdline", "r")) { puts("HOST visible"); fclose(f); }
  else puts("no host pid");
}
"""


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_host_processes_are_invisible(sandbox, language):
    host = os.getpid()
    src = (PROC_PY if language == "python" else PROC_CPP).replace("HOST", str(host))
    r = run(sandbox, language, src)
    out = r.tests[0].stdout
    assert r.verdict == "accepted", r
    assert "no host pid" in out and "pytest" not in out
    # the sandbox's init (bwrap's, or catatonit in a container) and the program
    pids = [int(line) for line in out.split() if line.isdigit()] if language == "cpp" \
        else eval(out.splitlines()[0].split(" ", 1)[1])
    assert len(pids) <= 3 and max(map(int, pids)) < 100
    still_serves(sandbox)


def test_a_crashed_worker_is_replaced_and_only_its_request_fails(sandbox):
    _, servers = sandbox
    pool = servers.service.pool
    results = []

    def slow():
        results.append(run(sandbox, "python", "import time\ntime.sleep(20)",
                           time_limit_s=30, wall_limit_s=30))

    t = threading.Thread(target=slow)
    t.start()
    busy = None
    for _ in range(200):  # wait for a worker to pick the request up
        idle = {id(w) for w in list(pool._idle.queue)}
        busy = [w for w in pool.workers if id(w) not in idle]
        if busy:
            break
        threading.Event().wait(0.02)
    assert busy
    threading.Event().wait(0.5)
    busy[0].proc.kill()
    t.join(60)
    assert results and results[0].verdict == "sandbox_error"
    assert "worker failed" in results[0].error
    assert pool.restarts >= 1
    still_serves(sandbox)
    still_serves(sandbox)


def _no_process_left(sandbox) -> None:
    """No live process of a sandbox uid (killed ones may take a moment to exit) but each
    worker's pre-warmed sandbox: bwrap, its init and the launcher waiting for the next
    program (sandbox/prewarm.py), three per worker at most."""
    _, servers = sandbox
    workers = servers.service.cfg.workers
    uids = {servers.service.cfg.uid_base + i for i in range(workers)}
    for _ in range(50):
        live = [(pid, cmd) for pid, uid, state, cmd in _processes()
                if uid in uids and state != "Z"]
        warm = [(pid, cmd) for pid, cmd in live if _waiting_sandbox(cmd)]
        left = [(pid, cmd) for pid, cmd in live if not _waiting_sandbox(cmd)]
        if not left and len(warm) <= 3 * workers:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"processes of sandbox uids still running: {left} (warm: {warm})")


def _waiting_sandbox(cmd: list[str]) -> bool:
    return bool(cmd) and (cmd[0].endswith("/bwrap") or cmd[:2] == ["/.k1rl-launch",
                                                                   "--from-fd"])


def _processes():
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in
                              (p / "status").read_text().splitlines() if ":" in line)
                cmd = (p / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
            except OSError:
                continue
            yield p.name, int(fields["Uid"].split()[1]), fields["State"].split()[0], cmd[:-1]
