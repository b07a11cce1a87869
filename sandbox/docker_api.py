"""The Docker Engine API runner (``sandbox.runner: docker``): every program in a container
of its own, created, fed and collected through the Engine API with the ``docker`` Python
SDK. ``sandbox.docker_url`` names the engine: a Docker daemon's socket, or podman's
Docker-compatible one (``podman system service``, which is what the tests use here).

The rules are the podman runner's (sandbox/podman.py): no network, a read-only root that
holds only the root skeleton (mount points and the usr-merge symlinks, imported once as
the image ``k1rl-sandbox-root:<hash>``) with /usr and the linker files bind-mounted
read-only, a size-bounded tmpfs /tmp, the code dir read-only (writable while compiling),
the slot's non-root uid, no capabilities, no-new-privileges, the bwrap runner's seccomp
rules, explicit rlimits (CPU, data, file size, open files, processes, core = 0), memory
(+swap) and pids limits, an init as PID 1, and a wall clock and stdout cap that kill the
container. The engine must run on the sandbox's own host: the bind mounts are host paths.

I/O: one attach socket per run, opened before the start; the container's stdin closes
when we close our side (StdinOnce), and its stdout/stderr arrive multiplexed in 8-byte
framed chunks, demultiplexed and capped here. Logging is off: gigabytes of output are
never stored by the engine.

Accounting: each run's container goes under the slot's parent cgroup (``cgroup_parent``,
:class:`~sandbox.cgroups.SlotParent`) when this host's /sys/fs/cgroup is writable and the
engine uses the cgroupfs driver: exact CPU time (less the runtime's set-up, measured on
empty runs), peak memory, kill sweeps. Without it, CPU time and peak memory read 0 and the
CPU limit is the kernel's (RLIMIT_CPU: a program past it dies of SIGXCPU/SIGKILL).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import selectors
import signal
import socket
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import docker

from k1rl.config import SandboxConfig
from sandbox import cgroups
from sandbox.cgroups import SlotParent
from sandbox.isolation import (
    CODE_DIR,
    SCRATCH_DIR,
    Execution,
    Limits,
    Slot,
    base_env,
    container_exit,
    container_ulimits,
    host_paths,
    make_root,
)
from sandbox.runners import Runner, register, runtime_setup_cpu_ns
from sandbox.seccomp import oci_profile

IMAGE = "k1rl-sandbox-root"
_CHUNK = 1 << 16
_FRAME_HEADER = 8  # stream type (1 stdin, 1 stdout, 2 stderr), 3 zero bytes, size (BE u32)


@register("docker")
class DockerRunner(Runner):
    own_cgroups = True  # each run's container, under a per-slot parent

    def __init__(self, root: Path, url: str, instance: str = "") -> None:
        try:
            self.api = docker.APIClient(base_url=url, timeout=120)
            version = self.api.version()
        except Exception as e:  # noqa: BLE001 - whatever the SDK raises: no engine there
            raise RuntimeError(f"no Docker Engine API answers at {url}: {e}") from None
        self.podman = any("podman" in c.get("Name", "").lower()
                          for c in version.get("Components") or [])
        self._ro = host_paths()
        self.root = make_root(root, self._ro)
        self.image = self._image()
        profile = oci_profile()
        if self.podman:  # podman reads the profile from a path, Docker takes its content
            path = root.parent / f"{root.name}-seccomp.json"
            path.write_text(profile)
            profile = str(path)
        self._seccomp = f"seccomp={profile}"
        self.accounting = cgroups.writable()
        self._setup_cpu_ns: int | None = None
        self._serial = itertools.count()
        self._instance = instance or f"p{os.getpid()}"

    @classmethod
    def from_config(cls, cfg: SandboxConfig, in_empty_netns: bool) -> DockerRunner:
        return cls(Path(cfg.work_root) / "rootfs-docker", cfg.docker_url)

    def _image(self) -> str:
        """The root skeleton as an image, imported once per skeleton (tagged by its hash)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(self.root, arcname=".", filter=_reproducible)
        tag = hashlib.sha256(buf.getvalue()).hexdigest()[:16]
        name = f"{IMAGE}:{tag}"
        try:
            self.api.inspect_image(name)
            return name
        except Exception:  # noqa: BLE001 - not there yet
            pass
        reply = self.api.import_image_from_data(buf.getvalue())
        image_id = json.loads(reply.strip().splitlines()[-1])["id"]
        self.api.tag(image_id, IMAGE, tag)
        return name

    def execute(self, slot: Slot, argv: list[str], *, stdin: bytes, limits: Limits,
                writable_code: bool = False, cwd: str = "",
                env: dict[str, str] | None = None) -> Execution:
        if self._setup_cpu_ns is None and self.accounting:
            self._setup_cpu_ns = 0  # while the empty runs measure it
            self._setup_cpu_ns = runtime_setup_cpu_ns(
                lambda: self._run(slot, ["/usr/bin/true"], b"", limits, False, "", None))
        return self._run(slot, argv, stdin, limits, writable_code, cwd, env)

    def _run(self, slot: Slot, argv: list[str], stdin: bytes, limits: Limits,
             writable_code: bool, cwd: str, env: dict[str, str] | None) -> Execution:
        parent = None
        if self.accounting:
            parent = SlotParent(f"k1rl-sandbox/{slot.root.parent.name}-w{slot.index}-docker")
            parent.kill_containers()  # a container of a worker that died mid-run
            parent.settle()
            parent.begin_run()
        result = Execution()
        cid = None
        try:
            cid = self._create(slot, parent, argv, limits, writable_code, cwd, env)
            sock = self.api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1,
                                                       "stream": 1})
            sock = getattr(sock, "_sock", sock)  # the SDK wraps the raw socket
            self.api.start(cid)
            started = time.monotonic()
            result = _stream(sock, stdin, limits, started,
                             kill=lambda: self._kill(cid, parent))
            sock.close()
            left = started + limits.wall_s - time.monotonic()
            status = self.api.wait(cid, timeout=max(left, 0) + 30)
            state = self.api.inspect_container(cid)["State"]
            result.wall_s = time.monotonic() - started
        except (docker.errors.APIError, docker.errors.DockerException, OSError) as e:
            result.start_error = f"container set-up failed: {getattr(e, 'explanation', e)}"
            return result
        finally:
            if cid is not None:
                self._remove(cid)
        if result.signal is None:  # else we killed it
            result.exit_code = status.get("StatusCode")
        if parent is not None:
            result.cpu_s, result.memory_kb = parent.run_usage(self._setup_cpu_ns or 0)
        container_exit(result, limits)
        result.oom_killed |= bool(state.get("OOMKilled"))
        return result

    def _create(self, slot: Slot, parent: SlotParent | None, argv: list[str], limits: Limits,
                writable_code: bool, cwd: str, env: dict[str, str] | None) -> str:
        memory = limits.memory_mb << 20
        scratch = limits.scratch_mb << 20
        ulimits = [docker.types.Ulimit(name=name, soft=soft, hard=hard)
                   for name, soft, hard in container_ulimits(limits)]
        # owned by the program's uid: podman's "U" option; Docker honours the mode
        tmpfs_opts = f"rw,exec,nosuid,nodev,size={scratch}," + ("U" if self.podman else
                                                                 "mode=1777")
        host = self.api.create_host_config(
            binds=[f"{p}:{p}:ro" for p in self._ro] +
                  [f"{slot.code}:{CODE_DIR}:{'rw' if writable_code else 'ro'}"],
            network_mode="none", read_only=True, tmpfs={SCRATCH_DIR: tmpfs_opts},
            cap_drop=["ALL"], security_opt=["no-new-privileges", self._seccomp],
            mem_limit=memory, memswap_limit=memory, pids_limit=limits.processes,
            ulimits=ulimits, init=True, log_config={"type": "none", "config": {}},
            cgroup_parent="/" + parent.path if parent is not None else None)
        config = self.api.create_container_config(
            self.image, argv, user=f"{slot.uid}:{slot.uid}", hostname="sandbox",
            working_dir=f"{CODE_DIR}/{cwd}" if cwd else CODE_DIR,
            environment={**base_env(), **(env or {})}, stdin_open=True, host_config=host,
            network_disabled=True)
        config["StdinOnce"] = True  # our closing the attach stream is the program's EOF
        name = f"k1rl-{slot.root.parent.name}-w{slot.index}-{self._instance}-{next(self._serial)}"
        return self.api.create_container_from_config(config, name=name)["Id"]

    def _kill(self, cid: str, parent: SlotParent | None) -> None:
        try:
            self.api.kill(cid)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if parent is not None:
            parent.kill_containers()

    def _remove(self, cid: str) -> None:
        try:
            self.api.remove_container(cid, force=True)
        except Exception:  # noqa: BLE001 - removed already, or the engine went away
            pass


def _stream(sock: socket.socket, stdin: bytes, limits: Limits, started: float,
            kill: Callable[[], None]) -> Execution:
    """Feed stdin and collect the demultiplexed, capped output until the container's
    stream ends, the wall clock runs out or stdout passes its cap (then ``kill``)."""
    result = Execution()
    out, err, frames = bytearray(), bytearray(), bytearray()
    pending = memoryview(stdin)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))
    if not pending:
        sock.shutdown(socket.SHUT_WR)
    deadline = started + limits.wall_s
    while True:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            result.wall_timeout = True
            break
        events = sel.select(timeout)
        if any(mask & selectors.EVENT_WRITE for _, mask in events):
            try:
                pending = pending[sock.send(pending[:_CHUNK]):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pending = pending[:0]  # the program stopped reading: its business
            if not pending:
                sel.modify(sock, selectors.EVENT_READ)
                sock.shutdown(socket.SHUT_WR)
        if not any(mask & selectors.EVENT_READ for _, mask in events):
            continue
        try:
            chunk = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        frames += chunk
        if _demux(frames, out, err, limits, result):
            break
    sel.close()
    if result.wall_timeout or result.stdout_overflow:
        # hang up first: the engine's side of the stream (podman's conmon) blocks on a
        # full socket, and cannot see the container die while it does
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        kill()
        result.signal = signal.SIGKILL
    result.stdout, result.stderr = bytes(out), bytes(err)
    return result


def _demux(frames: bytearray, out: bytearray, err: bytearray, limits: Limits,
           result: Execution) -> bool:
    """Move the whole frames of ``frames`` to stdout/stderr; True when stdout passed
    its cap."""
    while len(frames) >= _FRAME_HEADER:
        size = int.from_bytes(frames[4:8], "big")
        if len(frames) < _FRAME_HEADER + size:
            break
        kind, payload = frames[0], bytes(frames[_FRAME_HEADER:_FRAME_HEADER + size])
        del frames[:_FRAME_HEADER + size]
        if kind == 1:
            room = limits.output_bytes - len(out)
            out += payload[:max(room, 0)]
            if len(payload) > room:
                result.stdout_overflow = True
                return True
        elif kind == 2 and len(err) < limits.stderr_bytes:
            err += payload[:limits.stderr_bytes - len(err)]
    return False


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """The same skeleton gives the same tar (and image tag) on every start."""
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
