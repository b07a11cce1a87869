"""Running one untrusted command under hard limits, and what came of it.

A :class:`Runner` executes an argv inside a per-worker :class:`Slot` (a work dir on the
host, a uid, optionally cgroups) and returns an :class:`Execution`: exit status, CPU
and wall time, peak memory, capped stdout/stderr and which limit (if any) stopped it.
Turning that into a verdict is the service's job (sandbox/judge.py), so runners stay
interchangeable behind :class:`Runner`: :class:`BwrapRunner` (namespaces + seccomp +
rlimits + cgroups, a few ms per run, the default) and, in sandbox/podman.py,
``PodmanRunner`` (a podman/runc container per run).

Layers of the bwrap runner, outermost first (each one alone would not be enough):
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

import abc
import errno
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox import cgroups
from sandbox.seccomp import filter_bytes

# What of the host a program sees, read-only: the toolchains and the shared libraries.
_RO_PATHS = ("/usr", "/etc/ld.so.cache", "/etc/alternatives")
_SYMLINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"),
             ("usr/lib64", "/lib64"), ("usr/lib32", "/lib32"))
CODE_DIR = "/code"     # the program's files: source, binary, input files
SCRATCH_DIR = "/tmp"   # the only writable place while a program runs
_PIPE_CHUNK = 1 << 16


@dataclass(frozen=True)
class Limits:
    cpu_s: float
    wall_s: float
    memory_mb: int
    output_bytes: int           # stdout cap; stderr is kept to stderr_bytes and never fatal
    processes: int = 64
    open_files: int = 64
    scratch_mb: int = 64
    stderr_bytes: int = 64 << 10


@dataclass
class Execution:
    exit_code: int | None = None    # None when killed by a signal
    signal: int | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    memory_kb: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_overflow: bool = False   # wrote past Limits.output_bytes (and was killed)
    wall_timeout: bool = False      # still running at Limits.wall_s (and was killed)
    oom_killed: bool = False        # the memory cgroup hit its limit
    start_error: str = ""           # the sandbox could not start the command at all


@dataclass
class Slot:
    """One worker's private resources, created once and reused for every request."""

    index: int
    uid: int
    root: Path                       # host dir holding code/
    cgroup: cgroups.CgroupSet | None = None

    @property
    def code(self) -> Path:
        return self.root / "code"

    def prepare(self) -> None:
        """(Re)create an empty code dir owned by the slot's uid."""
        if self.code.exists():
            shutil.rmtree(self.code, ignore_errors=True)
        self.code.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        os.chown(self.code, self.uid, self.uid)
        os.chmod(self.code, 0o700)

    def mkdir(self, name: str) -> Path:
        path = self.code / name
        path.mkdir()
        os.chown(path, self.uid, self.uid)
        return path

    def write(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.code / name
        path.write_bytes(data)
        os.chown(path, self.uid, self.uid)
        os.chmod(path, mode)
        return path


class Runner(abc.ABC):
    name: str

    @abc.abstractmethod
    def execute(self, slot: Slot, argv: list[str], *, stdin: bytes, limits: Limits,
                writable_code: bool = False, cwd: str = "") -> Execution:
        """Run ``argv`` in the slot's code dir (or its subdir ``cwd``); never raises
        because of what the program does. ``start_error`` is set when the sandbox itself
        could not start the command."""


# ---------------------------------------------------------------------------- bwrap


class BwrapRunner(Runner):
    name = "bwrap"

    def __init__(self, root: Path | None = None, bwrap: str | None = None,
                 netns_per_run: bool = True, launcher: Path | None = None) -> None:
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        # False when this process already sits in an empty network namespace of its own
        # (see enter_empty_netns); the programs then share it, one at a time
        self.netns_per_run = netns_per_run
        self.launcher = launcher  # see build_launcher
        if not os.access(self.bwrap, os.X_OK):
            raise RuntimeError("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
        self._seccomp = filter_bytes()
        self._ro = [p for p in _RO_PATHS if os.path.exists(p)]
        self.root = make_root(root or Path(tempfile.mkdtemp(prefix="k1rl-sandbox-root-")),
                              self._ro)

    def argv(self, slot: Slot, command: list[str], limits: Limits, writable_code: bool,
             seccomp_fd: int, status_fd: int, cwd: str = "") -> list[str]:
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
                 "--size", str(limits.scratch_mb << 20), "--tmpfs", SCRATCH_DIR,
                 "--bind" if writable_code else "--ro-bind", str(slot.code), CODE_DIR,
                 "--chdir", f"{CODE_DIR}/{cwd}" if cwd else CODE_DIR,
                 "--json-status-fd", str(status_fd),
                 "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
                 "--setenv", "HOME", SCRATCH_DIR, "--setenv", "TMPDIR", SCRATCH_DIR,
                 "--setenv", "LANG", "C.UTF-8",
                 "--seccomp", str(seccomp_fd), "--", *command]
        return args

    def execute(self, slot: Slot, argv: list[str], *, stdin: bytes, limits: Limits,
                writable_code: bool = False, cwd: str = "") -> Execution:
        filter_r, filter_w = os.pipe()
        try:
            os.write(filter_w, self._seccomp)  # < pipe buffer: the filter is ~1 KB
        finally:
            os.close(filter_w)
        status_r, status_w = os.pipe()
        try:
            command = self.argv(slot, argv, limits, writable_code, filter_r, status_w, cwd)
            # _supervise closes status_w once the child has its copy (or failed to start),
            # so reading status_r ends at the child's exit
            result = _supervise(command, slot, stdin, limits, pass_fds=(filter_r, status_w),
                                hand_over=(status_w,), launcher=self.launcher)
            status = _read_all(status_r)
        finally:
            os.close(filter_r)
            os.close(status_r)
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


def make_root(root: Path, ro_paths: list[str]) -> Path:
    """The sandbox's root directory: empty mount points for ``ro_paths``, the code dir,
    /tmp, /proc and /dev, and the usr-merge symlinks; owned by root, not writable."""
    root.mkdir(parents=True, exist_ok=True)
    for path in ro_paths:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(path):
            target.mkdir(exist_ok=True)
        elif not target.exists():
            target.touch()
    for name in (CODE_DIR, SCRATCH_DIR, "/proc", "/dev"):
        (root / name.lstrip("/")).mkdir(exist_ok=True)
    for target, link in _SYMLINKS:
        if os.path.exists("/" + target):
            try:
                (root / link.lstrip("/")).symlink_to(target)
            except FileExistsError:  # made by another worker sharing the work root
                pass
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    return root


PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNET = 0x40000000


def enter_empty_netns() -> bool:
    """Move this (single-purpose worker) process into a new, empty network namespace, so
    the programs it starts have no network without creating one per run. False when not
    permitted (then each run gets its own)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(CLONE_NEWNET) == 0


def become_subreaper() -> None:
    """Adopt orphaned descendants. bwrap's outer process can exit before reaping the
    sandbox's init, which is then re-parented to PID 1, and a container's PID 1 (often
    not a real init) may never reap it: the zombies count against the slot uid's
    RLIMIT_NPROC until forks fail. As a subreaper the worker gets and reaps them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans() -> None:
    """Reap every exited child of this (single-purpose worker) process."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _rlimits(limits: Limits) -> tuple[int, int, int, int, int]:
    """(cpu s, address space, file size, open files, processes) of a run."""
    return (
        int(limits.cpu_s) + 1,  # the kernel's backstop; the verdict uses measured time
        (limits.memory_mb + 64) << 20,  # address-space headroom for runtimes' mappings
        limits.scratch_mb << 20,
        limits.open_files,
        limits.processes + 4,  # bwrap's own two processes and some slack
    )


def _launch_argv(launcher: Path, slot: Slot, limits: Limits, argv: list[str]) -> list[str]:
    """``argv`` behind the C launcher (sandbox/launcher.c): same steps as :func:`_preexec`."""
    procs = ":".join(str(d / "cgroup.procs") for d in slot.cgroup.dirs.values()) \
        if slot.cgroup is not None else "-"
    return [str(launcher), *map(str, _rlimits(limits)), str(slot.uid), procs, "--", *argv]


def _preexec(slot: Slot, limits: Limits):
    """Runs in the forked child before exec (the worker is single-threaded, so this is
    safe); used when the C launcher could not be built."""
    cpu, memory, fsize, nofile, procs = _rlimits(limits)

    def setup() -> None:
        if slot.cgroup is not None:
            slot.cgroup.enter(os.getpid())
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setgroups([])
        os.setgid(slot.uid)
        os.setuid(slot.uid)

    return setup


LAUNCHER_SOURCE = Path(__file__).with_name("launcher.c")


def build_launcher(out_dir: Path) -> Path | None:
    """Compile sandbox/launcher.c into ``out_dir`` (once per source version); None when
    no C compiler works here (runs then fall back to a Python preexec_fn, ~1.6 ms slower)."""
    import hashlib
    import logging

    source = LAUNCHER_SOURCE.read_bytes()
    exe = out_dir / f"k1rl-launch-{hashlib.sha256(source).hexdigest()[:12]}"
    if os.access(exe, os.X_OK):
        return exe
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logging.getLogger(__name__).warning("no C compiler: the sandbox launcher falls back "
                                            "to Python (slower starts)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{exe.name}.{os.getpid()}"
    done = subprocess.run([cc, "-O2", "-o", str(tmp), str(LAUNCHER_SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        logging.getLogger(__name__).warning("cannot build the sandbox launcher: %s",
                                            done.stderr.strip())
        return None
    os.chmod(tmp, 0o755)
    os.replace(tmp, exe)  # atomic: workers building at once all end with a whole file
    return exe


def _supervise(argv: list[str], slot: Slot, stdin: bytes, limits: Limits,
               pass_fds: tuple[int, ...] = (), hand_over: tuple[int, ...] = (),
               as_program: bool = True, kill: Callable[[], None] | None = None,
               launcher: Path | None = None) -> Execution:
    """Start ``argv``, feed stdin, drain capped output, enforce the wall clock, reap.

    ``as_program``: ``argv`` is (bwrap around) the program: it starts with the program's
    rlimits and uid, in the slot's cgroup, set by ``launcher`` (or a Python preexec_fn
    without one). Otherwise it is a launcher that applies them itself (podman). ``kill``
    is called besides killing ``argv``'s process group when the run is stopped (for
    processes outside it: a container's)."""
    result = Execution()
    if slot.cgroup is not None:
        slot.cgroup.reset(limits.memory_mb << 20, limits.processes + 4)
    preexec = None
    if as_program and launcher is not None:
        argv = _launch_argv(launcher, slot, limits, argv)
    elif as_program:
        preexec = _preexec(slot, limits)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=slot.root, preexec_fn=preexec, start_new_session=True,
            pass_fds=pass_fds, close_fds=True, env={},
        )
    except OSError as e:
        result.start_error = f"cannot start the sandbox: {e}"
        return result
    finally:
        for fd in hand_over:  # the child holds its own copy
            os.close(fd)
    deadline = started + limits.wall_s
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    pending = memoryview(stdin)
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    killed = False
    while sel.get_map():
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            result.wall_timeout = True
            break
        for key, _ in sel.select(timeout):
            stream = key.fileobj
            if stream is proc.stdin:
                try:
                    pending = pending[os.write(stream.fileno(), pending[:_PIPE_CHUNK]):]
                except BrokenPipeError:
                    pending = pending[:0]  # the program stopped reading: its business
                if not pending:
                    sel.unregister(stream)
                    stream.close()
                continue
            try:
                chunk = os.read(stream.fileno(), _PIPE_CHUNK)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    continue
                chunk = b""
            if not chunk:
                sel.unregister(stream)
                continue
            if stream is proc.stdout:
                room = limits.output_bytes - len(out)
                out += chunk[: max(room, 0)]
                if len(chunk) > room:
                    result.stdout_overflow = True
            elif len(err) < limits.stderr_bytes:
                err += chunk[: limits.stderr_bytes - len(err)]
        if result.stdout_overflow:
            break
    if result.wall_timeout or result.stdout_overflow:
        _kill_tree(proc, slot, kill)
        killed = True
    # output closed, but the program may still run (it closed stdout, or a child holds on)
    status, usage, late = _reap(proc, deadline, slot, kill)
    result.wall_timeout |= late
    killed |= late
    result.wall_s = time.monotonic() - started
    sel.close()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream and not stream.closed:
            stream.close()
    if os.WIFSIGNALED(status):
        result.signal = os.WTERMSIG(status)
    else:
        result.exit_code = os.WEXITSTATUS(status)
    # only the outer bwrap's own time: the program's comes from its init (_account)
    result.cpu_s = usage.ru_utime + usage.ru_stime
    if slot.cgroup is not None:
        result.oom_killed = slot.cgroup.oom_killed()
        slot.cgroup.kill_all()  # nothing may outlive its run
    if killed and result.signal is None:
        result.signal = signal.SIGKILL
    result.stdout, result.stderr = bytes(out), bytes(err)
    return result


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
            if time.monotonic() > deadline:
                os.kill(inner, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.0002)
    reap_orphans()


def _kill_tree(proc: subprocess.Popen, slot: Slot, kill: Callable[[], None] | None) -> None:
    # bwrap's pid-namespace init dies with bwrap (--die-with-parent), and the kernel
    # then kills every process of the namespace; the cgroup sweep catches the rest.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if slot.cgroup is not None:
        slot.cgroup.kill_all()
    if kill is not None:
        kill()


def _reap(proc: subprocess.Popen, deadline: float, slot: Slot, kill: Callable[[], None] | None):
    """wait4 the child (its rusage covers the waited-for tree); past the wall deadline,
    kill it first. Returns (status, rusage, killed_at_deadline)."""
    late = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            _kill_tree(proc, slot, kill)
            late = True
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.0005)
    proc.returncode = status  # keep subprocess from waiting again
    return status, usage, late
