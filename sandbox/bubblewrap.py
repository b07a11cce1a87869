"""The bubblewrap runner (``sandbox.runner: bwrap``, the default): a few ms per run.

Layers, outermost first (each one alone would not be enough):
- a pids + memory cgroup per worker, when /sys/fs/cgroup is writable;
- rlimits set between fork and exec (by a small C launcher, sandbox/launcher.c, so the
  worker can vfork): CPU, address space, file size, open files, processes, core = 0;
- a non-root uid per worker (root ignores RLIMIT_NPROC, and one uid per worker keeps
  one program's processes from eating another's allowance);
- an empty network namespace, made once per worker (the worker moves into it at start,
  so each run is spared creating one, ~2 ms) or per run when the worker cannot;
- bubblewrap: new user/pid/ipc/uts/cgroup namespaces, a new session, /usr and a
  few linker files read-only and nothing else of the host, a fresh /proc showing only
  the sandbox's processes, the program's code dir read-only (writable while
  compiling) and a size-bounded tmpfs as its only writable place;
- a seccomp filter (sandbox/seccomp.py) against kernel attack surface;
- a wall-clock deadline that SIGKILLs the whole process tree, and a stdout cap that
  does the same the moment a program writes past it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from functools import partial
from pathlib import Path

from k1rl.config import SandboxConfig
from sandbox.isolation import (
    CODE_DIR,
    SCRATCH_DIR,
    Execution,
    Limits,
    Slot,
    _supervise,
    base_env,
    build_launcher,
    host_paths,
    make_root,
    reap_orphans,
    wait_exit,
    watch,
)
from sandbox.prewarm import INNER_LAUNCHER, Shape, WarmSandbox
from sandbox.runners import Runner, register
from sandbox.seccomp import filter_bytes, filter_pipe


@register("bwrap")
class BwrapRunner(Runner):
    shares_worker_netns = True
    pre_warms = True

    def __init__(self, root: Path | None = None, bwrap: str | None = None,
                 netns_per_run: bool = True, launcher: Path | None = None,
                 prewarm: bool = True, scratch_mb: int | None = None) -> None:
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        # False when this process already sits in an empty network namespace of its own
        # (see enter_empty_netns); the programs then share it, one at a time
        self.netns_per_run = netns_per_run
        self.launcher = launcher  # see build_launcher
        if not os.access(self.bwrap, os.X_OK):
            raise RuntimeError("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
        filter_bytes()  # built now: a libseccomp that cannot build it fails the start
        self._ro = host_paths()
        self.root = make_root(root or Path(tempfile.mkdtemp(prefix="k1rl-sandbox-root-")),
                              self._ro)
        if launcher is not None:  # the launcher inside: how a sandbox waits for its program
            _install(launcher, self.root / INNER_LAUNCHER.lstrip("/"))
        self.prewarm = prewarm and launcher is not None
        self._warm: WarmSandbox | None = None
        self._scratch_mb = scratch_mb  # programs' scratch size (compiles get more)

    @classmethod
    def from_config(cls, cfg: SandboxConfig, in_empty_netns: bool) -> BwrapRunner:
        work = Path(cfg.work_root)
        return cls(work / "rootfs", netns_per_run=not in_empty_netns,
                   launcher=build_launcher(work), prewarm=cfg.prewarm,
                   scratch_mb=cfg.scratch_mb)

    def argv(self, slot: Slot, shape: Shape, seccomp_fd: int, status_fd: int) -> list[str]:
        """bwrap's argv up to the command, for a run of ``shape`` in ``slot``."""
        # The root is a read-only bind of a skeleton that already holds every mount
        # point and symlink: nothing can be created beside the mounts, and it costs ~3 ms
        # less per run than a tmpfs root remounted read-only.
        # IPC (SysV shm, semaphores, message queues) could carry data from one program to
        # the next, so it is always fresh; the network namespace needs no such care: no
        # process outlives its run, and it holds nothing but a downed loopback
        unshare = ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts",
                   "--unshare-cgroup-try"] + (["--unshare-net"] if self.netns_per_run else [])
        args = [self.bwrap, *unshare, "--disable-userns",
                "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
                "--uid", str(slot.uid), "--gid", str(slot.uid),
                "--ro-bind", str(self.root), "/"]
        for path in self._ro:
            args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev",
                 "--size", str(shape.scratch_mb << 20), "--tmpfs", SCRATCH_DIR,
                 "--bind" if shape.writable_code else "--ro-bind", str(slot.code), CODE_DIR,
                 "--chdir", f"{CODE_DIR}/{shape.cwd}" if shape.cwd else CODE_DIR,
                 "--json-status-fd", str(status_fd)]
        for name, value in {**base_env(), **dict(shape.env)}.items():
            args += ["--setenv", name, value]
        return [*args, "--seccomp", str(seccomp_fd), "--"]

    def execute(self, slot: Slot, argv: list[str], *, stdin: bytes, limits: Limits,
                writable_code: bool = False, cwd: str = "",
                env: dict[str, str] | None = None) -> Execution:
        shape = Shape(writable_code, cwd, tuple(sorted((env or {}).items())), limits.scratch_mb)
        try:
            if self.launcher is None:
                result, status = self._execute_cold(slot, shape, argv, stdin, limits)
            else:
                result, status = self._execute_warm(slot, shape, argv, stdin, limits)
        except OSError as e:
            return Execution(start_error=f"cannot start the sandbox: {e}")
        _account(result, status)
        # Without {"child-pid": N} bwrap never cloned the sandbox; a set-up failure in
        # the clone (a mount, a namespace) ends it with exit 1 and "bwrap: ..." on
        # stderr before the command runs. (A program can print that too: it gains a
        # sandbox_error, which earns no reward either.)
        setup_failed = (result.exit_code == 1 and result.stderr.startswith(b"bwrap: ")) or \
            (result.exit_code == 126 and result.stderr.startswith(b"k1rl-launch: "))
        if not result.start_error and (b'"child-pid"' not in status or setup_failed):
            result.start_error = "sandbox set-up failed: " + result.stderr.decode(
                "utf-8", "replace").strip()
        return result

    def _execute_warm(self, slot: Slot, shape: Shape, argv: list[str], stdin: bytes,
                      limits: Limits) -> tuple[Execution, bytes]:
        sandbox = self._take(slot, shape)
        started = time.monotonic()
        sandbox.go(slot, limits, argv)
        if self.prewarm:  # the next run's sandbox sets up while this one runs
            self._warm_next(slot, shape)
        result = watch(sandbox.proc, slot, stdin, limits, started)
        status = _read_all(sandbox.status_fd)
        sandbox.close_fds()
        return result, status

    def _take(self, slot: Slot, shape: Shape) -> WarmSandbox:
        """The warm sandbox when it fits this run, else one started now."""
        warm, self._warm = self._warm, None
        if warm is not None and (warm.shape == shape and warm.slot is slot and warm.alive()):
            return warm
        if warm is not None:
            warm.discard()
        if slot.cgroup is not None:
            slot.cgroup.kill_all()  # what the last run there left, before this one joins
        return WarmSandbox.start(partial(self.argv, slot), self.launcher, slot, shape,
                                 slot.cgroup)

    def _warm_next(self, slot: Slot, shape: Shape) -> None:
        if slot.cgroup is not None and slot.spare_cgroup is None:
            return  # one cgroup: the running program's sweep would kill it
        # most runs follow a run of the same shape (a request's tests); after a
        # compile, the program's own run in the read-only code dir
        if shape.writable_code or shape.cwd:
            shape = Shape(False, "", shape.env, self._scratch_mb or shape.scratch_mb)
        try:
            self._warm = WarmSandbox.start(partial(self.argv, slot), self.launcher, slot,
                                           shape, slot.spare_cgroup)
        except OSError:
            self._warm = None  # started on the spot next time, which reports the error

    def _execute_cold(self, slot: Slot, shape: Shape, argv: list[str], stdin: bytes,
                      limits: Limits) -> tuple[Execution, bytes]:
        """Without the C launcher: bwrap started for this run, limits set by a Python
        preexec_fn (no pre-warming: nothing inside the sandbox could wait)."""
        filter_r = filter_pipe()
        status_r, status_w = os.pipe()
        try:
            command = self.argv(slot, shape, filter_r, status_w) + argv
            # _supervise closes status_w once the child has its copy (or failed to start),
            # so reading status_r ends at the child's exit
            result = _supervise(command, slot, stdin, limits, pass_fds=(filter_r, status_w),
                                hand_over=(status_w,))
            return result, _read_all(status_r)
        finally:
            os.close(filter_r)
            os.close(status_r)


def _install(launcher: Path, target: Path) -> None:
    """Copy the launcher into the root skeleton (atomically: workers share the skeleton)."""
    if target.exists() and target.stat().st_size == launcher.stat().st_size and \
            target.read_bytes() == launcher.read_bytes():
        return
    tmp = target.with_name(f"{target.name}.{os.getpid()}")
    shutil.copyfile(launcher, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _account(result: Execution, status: bytes) -> None:
    """CPU time and peak memory of the program, from the sandbox's init process.

    The outer bwrap exits without reaping its child, the pid-namespace init (which does
    reap the program), so wait4 on bwrap sees neither's usage. The worker is a child
    subreaper (:func:`become_subreaper`): the init, whose host pid bwrap reports on the
    status fd, becomes our child, and its rusage covers the program it reaped.
    """
    inner = None
    for line in status.splitlines():
        try:
            inner = json.loads(line).get("child-pid", inner)
        except (ValueError, AttributeError):
            continue
    if inner:
        deadline = time.monotonic() + 2.0
        while True:
            try:
                pid, _, usage = os.wait4(inner, os.WNOHANG)
            except ChildProcessError:  # not ours: the worker is not a subreaper
                break
            if pid:
                result.cpu_s = usage.ru_utime + usage.ru_stime
                result.memory_kb = usage.ru_maxrss
                break
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(inner, signal.SIGKILL)
                deadline = time.monotonic() + 60.0  # SIGKILLed: it exits
            else:
                wait_exit(inner, left)
    reap_orphans()
