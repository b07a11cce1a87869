"""Process-group setup for the trainer, and a multi-process launcher for tests.

The service's ranks are started by torchrun (see ``trainer_svc/__main__.py``) and join
through its rendezvous store; :func:`run_distributed` spawns ranks for tests of the
library. On CPU the backend is gloo.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str | None = "127.0.0.1",
    master_port: int = 29500,
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Initialise the default process group (gloo on CPU, nccl when CUDA is available).

    ``master_addr=None``: join torchrun's rendezvous store (``env://``: the agent already
    listens on MASTER_ADDR:MASTER_PORT)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, not {rank} of {world_size}"
            )
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method="env://" if master_addr is None else f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel groups and the default process group."""
    # Only if megatron was ever imported: importing it just to tear down costs seconds.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class RankError(RuntimeError):
    """A rank of :func:`run_distributed` raised; carries that rank's traceback."""


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    # Each rank gets its own share of the machine's cores instead of all of them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init_distributed(rank, world_size, "127.0.0.1", port)
        # Plain pickle copies tensor storage by value: torch's shared-memory handles
        # would dangle once this process exits.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return their results.

    Each rank has torch.distributed initialised (gloo on CPU, a fresh free port). ``fn``
    must be importable (module level) and its return value picklable. If any rank
    raises, the others get a short grace period and are then killed, and
    :class:`RankError` is raised here with every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = _collect(results, procs, timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failures = {rank: msg for rank, (ok, msg) in outcomes.items() if not ok}
    if failures:
        details = "\n".join(f"--- rank {rank} ---\n{msg}" for rank, msg in sorted(failures.items()))
        raise RankError(f"{len(failures)} of {world_size} ranks failed:\n{details}")
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]


_GRACE_S = 5.0


def _collect(results: Any, procs: list[Any], timeout_s: float) -> dict[int, tuple[bool, Any]]:
    """Wait for every rank's report; ranks that die silently or hang after a failure fail."""
    deadline = time.monotonic() + timeout_s
    outcomes: dict[int, tuple[bool, Any]] = {}
    while len(outcomes) < len(procs):
        while not results.empty():
            rank, ok, value = results.get()
            outcomes[rank] = (ok, value)
            if not ok:
                deadline = min(deadline, time.monotonic() + _GRACE_S)
        missing = [i for i in range(len(procs)) if i not in outcomes]
        if not missing:
            break
        silent = [i for i in missing if not procs[i].is_alive()]
        if silent and results.empty():
            for i in silent:
                outcomes[i] = (False, f"process exited with code {procs[i].exitcode} unreported")
            continue
        if time.monotonic() > deadline:
            failed = any(not ok for ok, _ in outcomes.values())
            reason = "after another rank failed" if failed else f"within {timeout_s} s"
            for i in missing:
                outcomes[i] = (False, f"did not finish {reason}; killed")
            break
        time.sleep(0.05)
    return outcomes
