"""Pre-warmed sandboxes (k1.5's pre-created containers): the next run's bubblewrap sandbox
is set up while the current program runs, so a run does not pay namespace and mount
set-up on its critical path.

A warm sandbox is bwrap with every namespace and mount in place, whose command is the C
launcher (sandbox/launcher.c) in ``--from-fd`` mode: it waits on a pipe for the run's
rlimits and argv, sets the limits inside the sandbox and execs the program. Until then it
runs nothing of a user's.

Cgroups: a slot has two, and runs alternate between them. The warm sandbox is born in
the one the current run does not use (moving processes between cgroups at start would
cost an RCU grace period on the critical path, up to ~30 ms measured here), so the
current run's cgroup sweep leaves it alone; at :meth:`WarmSandbox.go` its cgroup gets the
run's limits and becomes the slot's current one.

A sandbox is warmed for a :class:`Shape` (code dir writable or not, working dir,
environment, scratch size: what bwrap fixes at set-up); a run of another shape discards
it and starts one on the spot, the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandbox.cgroups import CgroupSet
from sandbox.isolation import Limits, Slot, _launch_argv, _rlimits
from sandbox.seccomp import filter_pipe

# the launcher as a sandbox sees it: a copy in the root skeleton
INNER_LAUNCHER = "/.k1rl-launch"


@dataclass(frozen=True)
class Shape:
    writable_code: bool
    cwd: str
    env: tuple[tuple[str, str], ...]
    scratch_mb: int


class WarmSandbox:
    """One started bwrap sandbox waiting for its command."""

    def __init__(self, proc: subprocess.Popen, slot: Slot, shape: Shape, control: int,
                 status: int, cgroup: CgroupSet | None) -> None:
        self.proc = proc
        self.slot = slot
        self.shape = shape
        self.cgroup = cgroup
        self._control = control  # write end of the command pipe
        self.status_fd = status  # bwrap's --json-status-fd, read end

    @classmethod
    def start(cls, bwrap_argv, launcher: Path, slot: Slot, shape: Shape,
              cgroup: CgroupSet | None) -> WarmSandbox:
        """Start bwrap (``bwrap_argv(shape, seccomp_fd, status_fd)``: its argv up to the
        command) in ``cgroup``, running the launcher that waits on a pipe. Raises OSError."""
        filter_r = filter_pipe()
        status_r, status_w = os.pipe()
        control_r, control_w = os.pipe()
        try:
            argv = bwrap_argv(shape, filter_r, status_w) + \
                [INNER_LAUNCHER, "--from-fd", str(control_r)]
            # outside: the slot's uid and the cgroup; the rlimits are set inside
            argv = _launch_argv(launcher, slot, None, argv, cgroup)
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=slot.root, start_new_session=True, close_fds=True, env={},
                pass_fds=(filter_r, status_w, control_r))
        except BaseException:
            for fd in (status_r, control_w):
                os.close(fd)
            raise
        finally:  # the child holds its own copies
            for fd in (filter_r, status_w, control_r):
                os.close(fd)
        return cls(proc, slot, shape, control_w, status_r, cgroup)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def go(self, slot: Slot, limits: Limits, argv: list[str]) -> None:
        """Make the sandbox's cgroup the slot's current one, with this run's limits, and
        send the run's limits and command. What fails here shows in the run itself:
        bwrap's set-up error on its stderr, or a launcher that exits 126."""
        if self.cgroup is not None:
            if self.cgroup is slot.spare_cgroup:
                slot.cgroup, slot.spare_cgroup = self.cgroup, slot.cgroup
            # nothing else is in it: the last run there was swept at its end
            self.cgroup.reset(limits.memory_mb << 20, limits.processes + 4, sweep=False)
        message = [*_rlimits(limits), "-", "-", "--", *argv]
        try:
            os.write(self._control, b"".join(str(a).encode() + b"\0" for a in message))
        except BrokenPipeError:
            pass
        finally:
            os.close(self._control)
            self._control = -1

    def close_fds(self) -> None:
        for fd in (self._control, self.status_fd):
            if fd >= 0:
                os.close(fd)
        self._control = self.status_fd = -1

    def discard(self) -> None:
        """Kill an unused sandbox (its init and launcher die with bwrap: --die-with-parent
        and the end of the pid namespace)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
        self.close_fds()
