"""A pool of single-threaded worker processes, each owning one sandbox slot.

Why processes: a worker forks every program and sets limits between fork and exec
(sandbox/isolation.py), which is only safe in a single-threaded process; the service
itself runs RPC and HTTP threads. A worker that crashes, hangs past its request's
deadline or is killed is replaced, and that one request is answered with a
``sandbox_error``: nothing else is lost.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import shutil
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from k1rl.config import SandboxConfig
from k1rl.protocol import RunCodeRequest, RunCodeResult
from sandbox import runners

log = logging.getLogger(__name__)
_CTX = mp.get_context("spawn")  # the parent has threads: never fork it


class WorkerCrashed(RuntimeError):
    pass


def _worker_main(index: int, cfg_json: str, instance: str, conn: Connection) -> None:
    from sandbox import cgroups
    from sandbox.isolation import Slot, become_subreaper, enter_empty_netns
    from sandbox.judge import Judge

    become_subreaper()

    cfg = SandboxConfig.model_validate_json(cfg_json)
    kind = runners.get(cfg.runner)
    # the worker talks to the service over a pipe only: it can live without a network
    own_netns = kind.shares_worker_netns and enter_empty_netns()
    own_cgroup = cfg.use_cgroups == "auto" and not kind.own_cgroups
    cgroup = cgroups.create(f"{instance}-w{index}") if own_cgroup else None
    spare = cgroups.create(f"{instance}-w{index}-warm") \
        if cgroup is not None and kind.pre_warms and cfg.prewarm else None
    slot = Slot(index, cfg.uid_base + index, Path(cfg.work_root) / instance / f"w{index}",
                cgroup, spare)
    try:
        judge = Judge(kind.from_config(cfg, in_empty_netns=own_netns), slot, cfg)
    except RuntimeError as e:  # the runner cannot work on this host: say why
        conn.send(("failed", str(e)))
        return
    conn.send(("ready", {"cgroup": cgroup is not None or kind.own_cgroups}))
    try:
        while True:
            try:
                payload = conn.recv()
            except EOFError:
                return
            try:
                result = judge.run(RunCodeRequest.model_validate(payload))
                conn.send(("ok", result.model_dump()))
            except ValueError as e:  # the request cannot be run (unknown language)
                conn.send(("invalid", str(e)))
    finally:
        for c in (slot.cgroup, slot.spare_cgroup):
            if c is not None:
                c.remove()


def _make_reachable(path: Path) -> None:
    """Create ``path``; every dir above it must let the sandbox uids pass (o+x)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o711)
    for parent in path.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            raise ValueError(
                f"sandbox.work_root {path.parent}: {parent} is not searchable by other users "
                f"(mode {oct(os.stat(parent).st_mode & 0o777)}), so the sandbox uids cannot "
                "reach their work dirs; pick a work_root under a world-searchable dir")


class _Worker:
    def __init__(self, index: int, cfg: SandboxConfig, instance: str) -> None:
        self.index = index
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=_worker_main, daemon=True,
                                 args=(index, cfg.model_dump_json(), instance, child),
                                 name=f"sandbox-worker-{index}")
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            self.proc.kill()
            raise RuntimeError(f"sandbox worker {index} did not start")
        status, self.info = self.conn.recv()
        if status == "failed":
            self.close()
            raise RuntimeError(f"sandbox worker {index} cannot run: {self.info}")

    def close(self) -> None:
        self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class WorkerPool:
    """``run`` is thread-safe: each call borrows an idle worker (waiting for one)."""

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        # one instance id per service process: cgroups and work dirs of two services on
        # one host never collide (uids do unless uid_base differs: see SandboxConfig)
        self.instance = f"svc{os.getpid()}"
        _make_reachable(Path(cfg.work_root) / self.instance)
        if runners.uses_cgroups(cfg):
            from sandbox import cgroups

            cgroups.remove_stale()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.workers = [_Worker(i, cfg, self.instance) for i in range(cfg.workers)]
        for w in self.workers:
            self._idle.put(w)
        self.cgroups = all(w.info.get("cgroup") for w in self.workers)
        self.restarts = 0

    def run(self, req: RunCodeRequest) -> RunCodeResult:
        worker = self._idle.get()
        try:
            worker.conn.send(req.model_dump())
            # generous: compiling, every test at its wall limit, a custom checker each
            budget = 120 + len(req.tests) * (req.wall_limit + 25)
            if not worker.conn.poll(budget):
                raise WorkerCrashed(f"no answer within {budget:.0f} s")
            status, body = worker.conn.recv()
        except (EOFError, OSError, WorkerCrashed) as e:
            worker = self._replace(worker, e)
            return RunCodeResult(verdict="sandbox_error", runner=self.cfg.runner,
                                 skipped=len(req.tests),
                                 error=f"the sandbox worker failed: {e}")
        finally:
            self._idle.put(worker)
        if status == "invalid":
            raise ValueError(body)
        return RunCodeResult.model_validate(body)

    def _replace(self, worker: _Worker, why: Exception) -> _Worker:
        log.error("sandbox worker %d failed (%s); starting a new one", worker.index, why)
        worker.proc.kill()
        worker.close()
        with self._lock:
            self.restarts += 1
            fresh = _Worker(worker.index, self.cfg, self.instance)
            self.workers[worker.index] = fresh
        return fresh

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            w.close()
        if runners.uses_cgroups(self.cfg):
            from sandbox import cgroups

            cgroups.remove_stale(self.instance)  # a killed worker could not clean up
        shutil.rmtree(Path(self.cfg.work_root) / self.instance, ignore_errors=True)
