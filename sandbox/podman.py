"""The container runner: every program in its own podman container (runtime runc).

The alternative to the bubblewrap runner (``sandbox.runner: podman``) for clusters
whose policy wants real OCI containers. Each run is ``podman run --rm`` of an exploded
root filesystem (``--rootfs``: a root-owned skeleton with /usr and the linker files
bind-mounted read-only, so no image has to be pulled), with:
- no network (``--network none``), read-only root, a size-bounded tmpfs /tmp, the code
  dir bound read-only (writable while compiling), no /etc/hosts or /etc/passwd;
- the slot's non-root uid, every capability dropped, no-new-privileges, and the same
  seccomp rules as the bwrap runner (an OCI profile from :mod:`sandbox.seccomp`);
- rlimits as ``--ulimit`` (CPU, data size, file size, open files, processes,
  core = 0) and the container's own memory (+swap) and pids cgroup limits;
- a wall-clock deadline and a stdout cap that SIGKILL every process of the container.

Accounting: the container's cgroup goes away with the container, so every run of a slot
is placed under one per-slot parent cgroup (``--cgroup-parent``) whose counters cover
it: CPU time from cpuacct (less runc's container set-up, measured once per worker on
empty runs: ~0.1 s of CPU here), peak memory
from the memory controller (it includes conmon's ~1 MB), an OOM kill from the container
reaching its memory limit and dying of SIGKILL that the sandbox did not send (podman's
own OOMKilled flag is not set on cgroup v1 here). conmon lives in the ``conmon``
sub-group of that parent; each run waits until the previous run's conmon and its
clean-up process have left, so their time and memory never count for the next program.

Measured on the development machine (cgroup v1, podman 4.3.1, runc 1.1.5): ~0.25 s per
container, against ~6 ms over a bare run for a pre-warmed bwrap one. podman's default
rlimits (open files, processes) exceed the hard limits there and runc then refuses to
start ("error setting rlimit"), so every rlimit is always passed explicitly. crun fails
on hybrid cgroups: runc only.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

from k1rl.config import SandboxConfig
from sandbox import cgroups
from sandbox.cgroups import SlotParent
from sandbox.isolation import (
    CODE_DIR,
    SCRATCH_DIR,
    Execution,
    Limits,
    Slot,
    _supervise,
    base_env,
    container_exit,
    container_ulimits,
    host_paths,
    make_root,
)
from sandbox.runners import Runner, register, runtime_setup_cpu_ns
from sandbox.seccomp import oci_profile


@register("podman")
class PodmanRunner(Runner):
    own_cgroups = True  # each run's container, under a per-slot parent

    def __init__(self, root: Path, podman: str | None = None, runtime: str = "runc") -> None:
        self.podman = podman or shutil.which("podman") or "/usr/bin/podman"
        if not os.access(self.podman, os.X_OK):
            raise RuntimeError("podman is not installed: apt-get install podman runc")
        self.runtime = shutil.which(runtime) or runtime
        if not os.access(self.runtime, os.X_OK):
            raise RuntimeError(f"container runtime {runtime!r} is not installed")
        if os.geteuid() != 0:
            raise RuntimeError("the podman runner needs root (rootful podman sets the "
                               "programs' uids and cgroups)")
        if not cgroups.writable():
            raise RuntimeError("the podman runner needs a writable /sys/fs/cgroup "
                               "(per-run accounting and kill sweeps)")
        self._ro = host_paths()
        # podman adds mount points (/etc/hostname, /run/.containerenv...) to the rootfs:
        # a skeleton of its own, not the bwrap runner's
        self.root = make_root(root, self._ro)
        self.profile = root.parent / f"{root.name}-seccomp.json"
        self.profile.write_text(oci_profile())
        self._serial = itertools.count()
        self._setup_cpu_ns: int | None = None

    @classmethod
    def from_config(cls, cfg: SandboxConfig, in_empty_netns: bool) -> PodmanRunner:
        return cls(Path(cfg.work_root) / "rootfs-podman")

    def argv(self, slot: Slot, parent: str, name: str, command: list[str], limits: Limits,
             writable_code: bool, cwd: str = "", env: dict[str, str] | None = None
             ) -> list[str]:
        memory = limits.memory_mb << 20
        scratch = limits.scratch_mb << 20
        args = [self.podman, "--runtime", self.runtime, "--cgroup-manager", "cgroupfs",
                "--log-level", "error", "run", "--rm", "--interactive", "--name", name,
                # catatonit as PID 1, as bwrap has its own init: the program is not the
                # namespace's init (which ignores signals it has no handler for)
                "--init",
                "--log-driver", "passthrough", "--cgroup-parent", parent,
                "--network", "none", "--hostname", "sandbox", "--no-hosts", "--passwd=false",
                "--read-only", "--read-only-tmpfs=false",
                "--user", f"{slot.uid}:{slot.uid}", "--cap-drop", "all",
                "--security-opt", "no-new-privileges",
                "--security-opt", f"seccomp={self.profile}",
                "--memory", str(memory), "--memory-swap", str(memory),
                "--pids-limit", str(limits.processes),
                *(arg for name, soft, hard in container_ulimits(limits)
                  for arg in ("--ulimit", f"{name}={soft}:{hard}")),
                # a second wall clock, kept by conmon, should this worker die mid-run
                "--timeout", str(math.ceil(limits.wall_s) + 5),
                # owned by the program's uid (U): podman ignores a tmpfs mode here
                "--tmpfs", f"{SCRATCH_DIR}:rw,exec,nosuid,nodev,size={scratch},U"]
        for path in self._ro:
            args += ["--volume", f"{path}:{path}:ro"]
        args += ["--volume", f"{slot.code}:{CODE_DIR}:{'rw' if writable_code else 'ro'}",
                 "--workdir", f"{CODE_DIR}/{cwd}" if cwd else CODE_DIR]
        for key, value in {**base_env(), **(env or {})}.items():
            args += ["--env", f"{key}={value}"]
        return [*args, "--rootfs", str(self.root), *command]

    def execute(self, slot: Slot, argv: list[str], *, stdin: bytes, limits: Limits,
                writable_code: bool = False, cwd: str = "",
                env: dict[str, str] | None = None) -> Execution:
        if self._setup_cpu_ns is None:
            self._setup_cpu_ns = 0  # while the empty runs measure it
            self._setup_cpu_ns = runtime_setup_cpu_ns(
                lambda: self._run(slot, ["/usr/bin/true"], b"", limits, False, ""))
        return self._run(slot, argv, stdin, limits, writable_code, cwd, env)

    def _run(self, slot: Slot, argv: list[str], stdin: bytes, limits: Limits,
             writable_code: bool, cwd: str, env: dict[str, str] | None = None) -> Execution:
        parent = SlotParent(f"k1rl-sandbox/{slot.root.parent.name}-w{slot.index}")
        # runs of a slot never overlap: a container still here outlived a worker that
        # died mid-run (its replacement serves the slot now)
        parent.kill_containers()
        parent.settle()
        name = f"k1rl-{slot.root.parent.name}-w{slot.index}-{next(self._serial)}"
        command = self.argv(slot, "/" + parent.path, name, argv, limits, writable_code, cwd,
                            env)
        parent.begin_run()
        # the podman client runs as root in the worker's cgroup; the program's limits
        # are the container's
        result = _supervise(command, slot, stdin, limits, as_program=False,
                            kill=parent.kill_containers)
        result.cpu_s, result.memory_kb = parent.run_usage(self._setup_cpu_ns)
        container_exit(result, limits)  # podman exits as the container's init does
        if result.exit_code in (125, 126, 127) and result.stderr.startswith(b"Error: "):
            # podman's own failures (125) and exec failures of the command (126/127)
            result.start_error = "container set-up failed: " + result.stderr.decode(
                "utf-8", "replace").strip()
        if result.wall_timeout or result.stdout_overflow:
            parent.kill_containers()
            subprocess.run([self.podman, "rm", "--force", "--ignore", name],
                           capture_output=True, timeout=60)
        return result
