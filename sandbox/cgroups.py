"""Per-worker cgroups: a pids limit and a memory limit whose OOM kills are detected.

Created once per worker slot and reused (creating a cgroup per run costs more than
the run). Works with cgroup v1 (one hierarchy per controller, as on this project's
build machines: pids, memory) and the unified v2 hierarchy. When no
hierarchy is writable (an unprivileged pod), :func:`create` returns None and the
sandbox relies on rlimits alone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path("/sys/fs/cgroup")


class CgroupSet:
    """The cgroup dirs of one slot; v1 has one per controller, v2 one in all."""

    def __init__(self, dirs: dict[str, Path], v2: bool) -> None:
        self.dirs = dirs
        self.v2 = v2
        self._oom_before = 0

    # -------------------------------------------------------------- per run
    def reset(self, memory_bytes: int, pids: int, sweep: bool = True) -> None:
        """Limits for the next run, after killing what is left (``sweep``)."""
        if sweep:
            self.kill_all()
        if self.v2:
            d = self.dirs["unified"]
            write(d / "memory.max", memory_bytes)
            write(d / "memory.swap.max", 0, missing_ok=True)
            write(d / "pids.max", pids)
            self._oom_before = self._oom_kills()
        else:
            m = self.dirs["memory"]
            # memsw (memory + swap) may never be below the memory limit: raise it first
            # when growing, lower it last when shrinking
            memsw = m / "memory.memsw.limit_in_bytes"
            growing = memory_bytes > (read_int(m / "memory.limit_in_bytes") or 0)
            order = (memsw, m / "memory.limit_in_bytes")
            for path in order if growing else order[::-1]:
                write(path, memory_bytes, missing_ok=path == memsw)
            self._oom_before = self._oom_kills()
            write(self.dirs["pids"] / "pids.max", pids)

    def enter(self, pid: int) -> None:
        """Move ``pid`` (the forked child, before it execs) into every controller."""
        for d in self.dirs.values():
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(pid))

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of the slot since the last reset."""
        return self._oom_kills() > self._oom_before

    def kill_all(self) -> None:
        """SIGKILL whatever is left in the slot's cgroups (a run must leave nothing behind)."""
        kill_cgroup(self.dirs.get("unified") or self.dirs["pids"], self.v2)

    def _oom_kills(self) -> int:
        """OOM kills so far (the counter never resets, so runs compare before/after)."""
        if self.v2:
            return read_stat(self.dirs["unified"] / "memory.events").get("oom_kill", 0)
        return read_stat(self.dirs["memory"] / "memory.oom_control").get("oom_kill", 0)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs.values():
            remove_tree(d)


def _hierarchies() -> list[Path]:
    """The k1rl-sandbox dir of every mounted hierarchy (v2: the unified one; v1: one per
    controller, and the podman runner's containers add dirs to all of them)."""
    found = [ROOT / "k1rl-sandbox"] if is_v2() else []
    if not is_v2() and ROOT.is_dir():
        found += [d / "k1rl-sandbox" for d in ROOT.iterdir() if d.is_dir() and not d.is_symlink()]
    return [d for d in found if d.is_dir()]


def remove_stale(instance: str = "") -> None:
    """Remove the cgroups of sandbox services that are gone (named svc<pid>-w<i>...), and
    those of ``instance`` (a service shutting down)."""
    for parent in _hierarchies():
        for d in parent.glob("svc*-w*"):
            pid = d.name[3:].split("-", 1)[0]
            gone = pid.isdigit() and not Path(f"/proc/{pid}").exists()
            if gone or (instance and d.name.startswith(f"{instance}-")):
                kill_cgroup(d, v2=is_v2())
                remove_tree(d)


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def writable() -> bool:
    """Whether this process can create cgroups (the memory and pids controllers)."""
    try:
        if is_v2():
            return os.access(ROOT, os.W_OK)
        return all(os.access(ROOT / c, os.W_OK) for c in ("pids", "memory"))
    except OSError:
        return False


def procs(d: Path) -> list[int]:
    try:
        return [int(p) for p in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_cgroup(d: Path, v2: bool) -> None:
    """SIGKILL every process in cgroup ``d`` and its descendants."""
    if v2 and (d / "cgroup.kill").exists():
        write(d / "cgroup.kill", 1, missing_ok=True)
        return
    # a forking program adds pids between reads, and killed ones stay listed until
    # they have exited: sweep until the tree is empty (bounded: ~2 s). Most sweeps find
    # a process or two in the middle of exiting, gone within a millisecond: the pauses
    # start short.
    pause, deadline = 0.0001, time.monotonic() + 2.0
    while time.monotonic() < deadline:
        pids = [p for sub, _, _ in os.walk(d) for p in procs(Path(sub))]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)
        pause = min(2 * pause, 0.005)
    log.error("processes of %s survived 2 s of SIGKILL sweeps", d)


def remove_tree(d: Path) -> None:
    """rmdir ``d`` and its (empty) descendant cgroups, deepest first."""
    for sub, _, _ in sorted(os.walk(d), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(sub)
        except OSError:
            pass


class PeakReader:
    """Peak memory of a v2 cgroup since this object was made (memory.peak, reset per open
    file on kernels >= 6.12; older kernels report the peak since the cgroup's creation)."""

    def __init__(self, d: Path) -> None:
        self._fd = None
        try:
            self._fd = os.open(d / "memory.peak", os.O_RDWR)
            os.write(self._fd, b"reset\n")
        except OSError:
            pass

    def read(self) -> int:
        if self._fd is None:
            return 0
        try:
            return int(os.pread(self._fd, 64, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return 0
        finally:
            os.close(self._fd)
            self._fd = None


def create(name: str) -> CgroupSet | None:
    """Cgroups ``k1rl-sandbox/<name>``, or None when none can be created here."""
    try:
        if (ROOT / "cgroup.controllers").exists():  # v2 unified
            base = ROOT / "k1rl-sandbox"
            base.mkdir(exist_ok=True)
            write(base / "cgroup.subtree_control", "+memory +pids", missing_ok=True)
            d = base / name
            d.mkdir(exist_ok=True)
            return CgroupSet({"unified": d}, v2=True)
        dirs = {}
        for controller in ("pids", "memory"):
            if not (ROOT / controller).is_dir():
                return None
            d = ROOT / controller / "k1rl-sandbox" / name
            d.mkdir(parents=True, exist_ok=True)
            dirs[controller] = d
        cg = CgroupSet(dirs, v2=False)
        cg.reset(64 << 20, 64)  # proves the files are writable, not just the dirs
        return cg
    except OSError as e:
        log.warning("no writable cgroup for %s (%s): limits come from rlimits only", name, e)
        return None


def write(path: Path, value, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError:
        if not missing_ok:
            raise


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


class SlotParent:
    """The per-slot parent cgroup the containers of one slot run under (the container
    runners: sandbox/podman.py, sandbox/docker_api.py): its counters cover every run of
    the slot, and its sweep reaches processes of containers the engine lost track of."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.v2 = is_v2()

    def _dir(self, controller: str) -> Path:
        return ROOT / self.path if self.v2 else ROOT / controller / self.path

    def settle(self, timeout_s: float = 10.0) -> None:
        """Create the parent where it is read, and wait for the last run's conmon (and
        the clean-up it starts) to leave."""
        for controller in ("cpuacct", "memory", "pids"):
            self._dir(controller).mkdir(parents=True, exist_ok=True)
        conmon = self._dir("pids") / "conmon"
        deadline = time.monotonic() + timeout_s
        while conmon.is_dir() and procs(conmon) and time.monotonic() < deadline:
            time.sleep(0.002)

    def begin_run(self) -> None:
        """A run's CPU time and peak memory count from here (see :meth:`run_usage`)."""
        self._cpu_before = self.cpu_ns()
        self.reset_peak()

    def run_usage(self, setup_cpu_ns: int) -> tuple[float, int]:
        """(CPU seconds, less the runtime's own set-up; peak KB) since :meth:`begin_run`."""
        return max(self.cpu_ns() - self._cpu_before - setup_cpu_ns, 0) / 1e9, \
            self.peak_bytes() >> 10

    def cpu_ns(self) -> int:
        if self.v2:
            stat = read_stat(self._dir("cpu") / "cpu.stat")
            return stat.get("usage_usec", 0) * 1000
        return read_int(self._dir("cpuacct") / "cpuacct.usage") or 0

    def reset_peak(self) -> None:
        if self.v2:
            self._peak = PeakReader(self._dir("memory"))
        else:
            write(self._dir("memory") / "memory.max_usage_in_bytes", 0)

    def peak_bytes(self) -> int:
        if self.v2:
            return self._peak.read()
        return read_int(self._dir("memory") / "memory.max_usage_in_bytes") or 0

    def kill_containers(self) -> None:
        """SIGKILL every process of this slot's containers (podman's conmon, in its own
        sub-group, is left to clean up)."""
        base = self._dir("pids")
        for child in base.iterdir() if base.is_dir() else ():
            if child.is_dir() and child.name != "conmon":
                kill_cgroup(child, v2=self.v2)
