"""What every sandbox runner shares: running one untrusted command under hard limits,
and what came of it.

A runner (sandbox/runners.py) executes an argv inside a per-worker :class:`Slot` (a work
dir on the host, a uid, optionally cgroups) under :class:`Limits` and returns an
:class:`Execution`: exit status, CPU and wall time, peak memory, capped stdout/stderr and
which limit (if any) stopped it. Turning that into a verdict is the service's job
(sandbox/judge.py). Here: the slot, the supervision of one run (:func:`_supervise`:
stdin, capped output, the wall-clock deadline, the kill sweep, reaping), the rlimits
set between fork and exec (by a small C launcher, sandbox/launcher.c), the skeleton root
filesystem, and a pool worker's own set-up (an empty network namespace, child subreaper).
"""

from __future__ import annotations

import errno
import os
import resource
import select
import selectors
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox import cgroups

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
    address_space_mb: int = 64  # RLIMIT_AS beyond memory_mb (sandbox/languages.py)


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
    # the other of the two cgroups runs alternate between (sandbox/prewarm.py)
    spare_cgroup: cgroups.CgroupSet | None = None

    @property
    def code(self) -> Path:
        return self.root / "code"

    def prepare(self) -> None:
        """An empty code dir owned by the slot's uid. Emptied, not recreated: a pre-warmed
        sandbox (sandbox/prewarm.py) already has this very directory mounted."""
        if self.code.is_dir() and not self.code.is_symlink():
            for child in self.code.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        else:
            self.code.unlink(missing_ok=True)
            self.code.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        os.chown(self.code, self.uid, self.uid)
        os.chmod(self.code, 0o700)

    def mkdir(self, name: str) -> Path:
        path = self.code / name
        path.mkdir()
        os.chown(path, self.uid, self.uid)
        return path

    def write_path(self, rel: str, data: bytes) -> None:
        """Write ``rel`` (a checked relative path) under the code dir before anything of
        the program's runs there, making its parent dirs."""
        path = self.code
        for part in rel.split("/")[:-1]:
            path = path / part
            if not path.is_dir():
                path.mkdir()
                os.chown(path, self.uid, self.uid)
        self.write(rel, data)

    def read_path(self, rel: str, max_bytes: int) -> bytes | None:
        """The regular file ``rel`` under the code dir, or None when it is missing, not a
        regular file, larger than ``max_bytes`` or reached through a symlink: the program
        made what is there, and the worker reading it is root."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        parts = rel.split("/")
        fd = os.open(self.code, flags | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            leaf = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        with os.fdopen(leaf, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                return None
            return f.read(max_bytes + 1)[:max_bytes]

    def write(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.code / name
        path.write_bytes(data)
        os.chown(path, self.uid, self.uid)
        os.chmod(path, mode)
        return path


def host_paths() -> list[str]:
    """The host paths every sandbox sees read-only: :data:`_RO_PATHS` and the languages'
    own (sandbox/languages.py), those that exist here."""
    from sandbox import languages

    return [p for p in (*_RO_PATHS, *languages.host_paths()) if os.path.exists(p)]


def base_env() -> dict[str, str]:
    """Every run's environment, before its language's own variables."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": SCRATCH_DIR,
            "TMPDIR": SCRATCH_DIR, "LANG": "C.UTF-8"}


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
        (limits.memory_mb + limits.address_space_mb) << 20,
        limits.scratch_mb << 20,
        limits.open_files,
        limits.processes + 4,  # bwrap's own two processes and some slack
    )


def container_ulimits(limits: Limits) -> list[tuple[str, int, int]]:
    """A run's rlimits as (name, soft, hard) for a container engine (the podman and docker
    runners). Engines have no address-space ulimit: RLIMIT_DATA (heap and private mappings
    since Linux 4.7) takes that bound, beside the container's memory cgroup limit; the
    process count needs no slack for bwrap's own processes."""
    cpu, memory, fsize, nofile, _ = _rlimits(limits)
    return [("cpu", cpu, cpu + 1), ("data", memory, memory), ("fsize", fsize, fsize),
            ("nofile", nofile, nofile), ("nproc", limits.processes, limits.processes),
            ("core", 0, 0)]


def container_exit(result: Execution, limits: Limits) -> None:
    """A container run's outcome as its program's: the container's init exits 128+N when
    the program died of signal N, and a SIGKILL the sandbox did not send, with the peak
    memory at the limit, is the memory cgroup's OOM kill (engines do not always say so:
    podman's OOMKilled stays false on cgroup v1)."""
    if result.signal is None and result.exit_code is not None and \
            128 < result.exit_code < 128 + 65:
        result.exit_code, result.signal = None, result.exit_code - 128
    ours = result.wall_timeout or result.stdout_overflow
    if result.signal == signal.SIGKILL and not ours and \
            result.memory_kb << 10 >= limits.memory_mb << 20:
        result.oom_killed = True


def _launch_argv(launcher: Path, slot: Slot, limits: Limits | None, argv: list[str],
                 cgroup: cgroups.CgroupSet | None) -> list[str]:
    """``argv`` behind the C launcher (sandbox/launcher.c): same steps as :func:`_preexec`;
    ``limits`` None leaves the rlimits as they are."""
    procs = ":".join(str(d / "cgroup.procs") for d in cgroup.dirs.values()) \
        if cgroup is not None else "-"
    rlimits = map(str, _rlimits(limits)) if limits is not None else ["-"] * 5
    return [str(launcher), *rlimits, str(slot.uid), procs, "--", *argv]


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
    if slot.cgroup is not None:
        slot.cgroup.reset(limits.memory_mb << 20, limits.processes + 4)
    preexec = None
    if as_program and launcher is not None:
        argv = _launch_argv(launcher, slot, limits, argv, slot.cgroup)
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
        return Execution(start_error=f"cannot start the sandbox: {e}")
    finally:
        for fd in hand_over:  # the child holds its own copy
            os.close(fd)
    return watch(proc, slot, stdin, limits, started, kill)


def watch(proc: subprocess.Popen, slot: Slot, stdin: bytes, limits: Limits, started: float,
          kill: Callable[[], None] | None = None) -> Execution:
    """Feed a started program its stdin, drain its capped output, enforce the wall clock
    from ``started``, reap it and sweep the slot's cgroup (see :func:`_supervise`)."""
    result = Execution()
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
    # only the outer bwrap's own time: the program's comes from its init
    # (sandbox/bubblewrap.py:_account)
    result.cpu_s = usage.ru_utime + usage.ru_stime
    if slot.cgroup is not None:
        result.oom_killed = slot.cgroup.oom_killed()
        slot.cgroup.kill_all()  # nothing may outlive its run
    if killed and result.signal is None:
        result.signal = signal.SIGKILL
    result.stdout, result.stderr = bytes(out), bytes(err)
    return result


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
        left = deadline - time.monotonic()
        if left <= 0:
            _kill_tree(proc, slot, kill)
            late = True
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        wait_exit(proc.pid, left)
    proc.returncode = status  # keep subprocess from waiting again
    return status, usage, late


def wait_exit(pid: int, timeout: float) -> None:
    """Sleep until process ``pid`` exits (a zombie, for wait4 to collect) or ``timeout``
    passes. A pidfd wakes us at the exit itself rather than at the next poll; without
    pidfds (Linux < 5.3) this is a short sleep and the caller polls."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        time.sleep(min(timeout, 0.0005))
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
