"""How the rollout engine comes and goes between phases.

k1.5 terminates vLLM after every rollout and restarts it with dummy weights, because
CUDA graphs and NCCL buffers keep memory that an offload cannot release; the new
weights then arrive over the transfer engine. ``restart`` does exactly that with a
rollout_svc process, and starts the next one as soon as the last is gone, on standby:
interpreter and vLLM imported while the trainer trains, the engine (and its device
memory) created only when the next rollout begins. ``persistent`` keeps one engine
alive across phases (vLLM's sleep mode is refused on CPU, so here it simply stays
resident; on GPU that is where sleep/wake would go). ``external`` leaves starting and
stopping the engine to its deployment (the Kubernetes RL pod's rollout container).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

from k1rl.launch import ServiceProcess, start_service
from k1rl.protocol import Ack, StartEngine
from k1rl.rpc import RPCClient, RPCError, wait_until_ready


class EngineLifecycle(ABC):
    """Brings a rollout engine (holding dummy or stale weights) up and halts it."""

    name: str

    def __init__(self, config_path: Path, address: str, log_dir: Path, ready_timeout_s: float):
        self.config_path = Path(config_path)
        self.address = address
        self.log_dir = Path(log_dir)
        self.ready_timeout_s = ready_timeout_s
        self._proc: ServiceProcess | None = None
        self._counted = False  # the running process has answered ready
        self.starts = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.proc.poll() is None

    def _spawn(self, standby: bool = False) -> None:
        """Start rollout_svc with dummy weights (not waiting for it); ``standby``: it makes
        no engine until told to (:class:`RestartLifecycle`)."""
        args = ["--config", str(self.config_path), "--address", self.address, "--dummy-weights"]
        args += ["--standby"] if standby else []
        self._proc = start_service("rollout", "rollout_svc", args, self.address, self.log_dir)

    def wait_up(self) -> None:
        """Wait until a process :meth:`start` spawned answers ready (no-op otherwise)."""
        if self._proc is None or self._counted:
            return
        try:
            self._proc.wait_ready(self.ready_timeout_s)
        except BaseException:
            self._stop()
            raise
        self._counted = True
        self.starts += 1

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
            self._counted = False

    def start(self) -> bool:
        """Begin making the engine available; True when a fresh one (dummy weights) is
        being started. An engine that died since the last rollout is started again rather
        than failing the run; the fresh engine then receives the full policy. Processes
        are spawned on the calling thread, which they die with (PDEATHSIG): call it from a
        thread that outlives the engine."""
        if self.running:
            return False
        self._stop()  # one that died: its log closed, its readiness forgotten
        self._spawn()
        return True

    def bring_up(self) -> bool:
        """:meth:`start`, then :meth:`wait_up`."""
        fresh = self.start()
        self.wait_up()
        return fresh

    @abstractmethod
    def halt(self) -> None:
        """Called when rollout ends."""

    def close(self) -> None:
        self._stop()


class RestartLifecycle(EngineLifecycle):
    name = "restart"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._standby = False  # the running process waits for start_engine

    def start(self) -> bool:
        """The standby process halt() left is told to make its engine; without one (the
        first rollout, or it died) a process is started as before."""
        standby, self._standby = self._standby, False
        if standby and self.running:
            try:
                with RPCClient(self.address, timeout_s=self.ready_timeout_s) as client:
                    client.call("start_engine", StartEngine(), Ack)
                return True
            except RPCError:  # unusable: replaced by a plain start below
                self._stop()
        return super().start()

    def halt(self) -> None:
        self._stop()
        self._spawn(standby=True)
        self._standby = True

    def close(self) -> None:
        self._standby = False
        super().close()


class PersistentLifecycle(EngineLifecycle):
    name = "persistent"

    def halt(self) -> None:
        pass


class ExternalLifecycle(EngineLifecycle):
    """The engine is started and kept by someone else: in Kubernetes, the rollout
    container of the RL pod (a container cannot start processes in another one). The
    sidecar only waits for it to answer; an engine it has not seen before (a first
    start, or a restarted container: new pid) holds dummy weights and counts as fresh."""

    name = "external"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen: tuple[int, float] | None = None  # pid, start time of the last engine

    @property
    def running(self) -> bool:
        return self._seen is not None

    def start(self) -> bool:
        pong = wait_until_ready(self.address, self.ready_timeout_s, require_ready=False)
        # a container's main process often has the same pid after a restart: its start
        # time tells the engines apart
        started_at = time.time() - pong.uptime_s
        fresh = (self._seen is None or pong.pid != self._seen[0]
                 or abs(started_at - self._seen[1]) > 2.0)
        if fresh:
            self.starts += 1
        self._seen = (pong.pid, started_at)
        return fresh

    def halt(self) -> None:
        pass

    def close(self) -> None:
        self._seen = None


LIFECYCLES: dict[str, type[EngineLifecycle]] = {
    RestartLifecycle.name: RestartLifecycle,
    PersistentLifecycle.name: PersistentLifecycle,
    ExternalLifecycle.name: ExternalLifecycle,
}


def make_lifecycle(name: str, **kwargs) -> EngineLifecycle:
    try:
        cls = LIFECYCLES[name]
    except KeyError:
        raise ValueError(
            f"unknown engine lifecycle {name!r}; known: {', '.join(sorted(LIFECYCLES))}"
        ) from None
    return cls(**kwargs)


def bring_up_all(engines: list[EngineLifecycle]) -> dict[EngineLifecycle, bool | Exception]:
    """Bring every engine up at once: all started first, then waited for. Per engine, True
    for a fresh one, False for one that was running, or why it could not be brought up."""
    outcome: dict[EngineLifecycle, bool | Exception] = {}
    for engine in engines:
        try:
            outcome[engine] = engine.start()
        except Exception as exc:  # noqa: BLE001 - an engine that cannot start is left out
            outcome[engine] = exc
    for engine in engines:
        if outcome[engine] is True:
            try:
                engine.wait_up()
            except Exception as exc:  # noqa: BLE001
                outcome[engine] = exc
    return outcome
