"""The runners the sandbox service tests run with, and the Docker Engine API the docker
runner reaches: podman's Docker-compatible socket (`podman system service`), started once
per test session and stopped at its end."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_needs_podman = pytest.mark.skipif(shutil.which("podman") is None,
                                   reason="needs podman and runc (make test installs them)")
RUNNERS = ["bwrap", pytest.param("podman", marks=_needs_podman),
           pytest.param("docker", marks=_needs_podman)]
_service: list[str] = []


def runner_options(runner: str) -> dict:
    """The SandboxConfig fields a runner needs beyond its name."""
    return {"docker_url": docker_url()} if runner == "docker" else {}


def docker_url() -> str:
    if not _service:
        sock = Path(f"/tmp/k1rl-podman-api-{os.getpid()}.sock")
        sock.unlink(missing_ok=True)
        # in a dir of its own: conmon leaves an "oom" file in its working dir when a
        # container is OOM-killed
        work = tempfile.mkdtemp(prefix="k1rl-podman-api-")
        proc = subprocess.Popen(
            ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "system",
             "service", "--time=0", f"unix://{sock}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
        atexit.register(_stop, proc, sock, work)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("podman system service did not start")
            time.sleep(0.05)
        _service.append(f"unix://{sock}")
    return _service[0]


def _stop(proc: subprocess.Popen, sock: Path, work: str) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    sock.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def serve(runner: str, uid_base: int, name: str, http_port: int | None = None):
    """A two-worker sandbox service with ``runner`` (programs as uids ``uid_base`` and
    ``uid_base + 1``): yields (an RPC client, the servers), stops it afterwards. For a
    module fixture: ``yield from serve(...)``."""
    from k1rl.config import SandboxConfig
    from k1rl.launch import free_tcp_address
    from k1rl.rpc import RPCClient
    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=http_port, workers=2,
                        runner=runner, uid_base=uid_base, **runner_options(runner),
                        work_root=f"/tmp/k1rl-sandbox-{name}-{os.getpid()}-{runner}")
    servers = Servers(cfg).start()
    client = RPCClient(servers.rpc.address, timeout_s=120)
    try:
        yield client, servers
    finally:
        client.close()
        servers.stop()
