"""Sandbox runners, registered by name (``sandbox.runner``): each executes one command in
a worker's slot under hard limits and reports what came of it.

One module per runner, named after it: ``bubblewrap.py`` (``bwrap``: namespaces +
seccomp + rlimits + cgroups, a few ms per run, the default) and ``podman.py``
(``podman``: a podman/runc container per run). What both build on (slots, limits,
supervising a run) is in ``isolation.py``; the verdict is the judge's (``judge.py``), so
runners stay interchangeable behind :class:`Runner`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from k1rl.config import SandboxConfig
from k1rl.registry import SANDBOX_RUNNERS
from sandbox.isolation import Execution, Limits, Slot

register = SANDBOX_RUNNERS.register


class Runner(abc.ABC):
    name: str = ""
    # The pool worker may move into an empty network namespace of its own, which the
    # runner's programs then share (sparing each run the ~2 ms of making one).
    shares_worker_netns: bool = False
    # The runner puts every run in cgroups of its own, so the worker makes none; they are
    # swept like the workers' on start and shutdown.
    own_cgroups: bool = False
    # The runner sets up a worker's next sandbox while the current program runs, in the
    # second of the slot's two cgroups (sandbox/prewarm.py).
    pre_warms: bool = False

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: SandboxConfig, in_empty_netns: bool) -> Runner:
        """The runner of a pool worker; ``in_empty_netns``: the worker moved into an empty
        network namespace of its own (only when :attr:`shares_worker_netns`)."""

    @abc.abstractmethod
    def execute(self, slot: Slot, argv: list[str], *, stdin: bytes, limits: Limits,
                writable_code: bool = False, cwd: str = "",
                env: dict[str, str] | None = None) -> Execution:
        """Run ``argv`` in the slot's code dir (or its subdir ``cwd``), with
        :func:`~sandbox.isolation.base_env` updated by ``env``; never raises
        because of what the program does. ``start_error`` is set when the sandbox itself
        could not start the command."""


def runtime_setup_cpu_ns(run_empty: Callable[[], Execution]) -> int:
    """The CPU a container runtime spends setting a container up inside the container's
    cgroup (runc: ~0.1 s here): the least of two empty runs, which the container runners
    leave out of every program's CPU time."""
    return int(min(run_empty().cpu_s for _ in range(2)) * 1e9)


def get(name: str) -> type[Runner]:
    return SANDBOX_RUNNERS.get(name)


def available() -> list[str]:
    return SANDBOX_RUNNERS.names()


def uses_cgroups(cfg: SandboxConfig) -> bool:
    """Whether the service's runs leave cgroups behind to sweep."""
    return cfg.use_cgroups == "auto" or get(cfg.runner).own_cgroups


def create(cfg: SandboxConfig, in_empty_netns: bool = False) -> Runner:
    """A new runner of the kind ``cfg.runner`` names (see :meth:`Runner.from_config`)."""
    return get(cfg.runner).from_config(cfg, in_empty_netns)
