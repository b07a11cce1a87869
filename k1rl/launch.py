"""Start k1rl services as local subprocesses and tear them down reliably.

On a cluster each service is its own container (k8s/); on one machine the demo, the
end-to-end tests and the benchmarks start them here, speaking the same ZMQ protocol.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from k1rl.rpc import RPCClient, RPCTimeout

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launching process dies.

    Local services are the launcher's children; if the launcher is killed (even with
    SIGKILL) they must not linger holding ports and memory. Linux-only (prctl).
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServiceStartError(RuntimeError):
    """A service process exited or never became ready; carries the tail of its log."""


@dataclass
class ServiceProcess:
    name: str
    address: str
    proc: subprocess.Popen
    log_path: Path
    _log_file: object = field(repr=False, default=None)
    _terminated: bool = field(repr=False, default=False)
    # how it was started, to start it again
    module: str = ""
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None

    @property
    def exited(self) -> bool:
        """The process ended without being asked to (a crash, a kill)."""
        return self.proc.poll() is not None and not self._terminated

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> None:
        """Ping until the service reports ready; fail fast if the process dies."""
        deadline = time.monotonic() + timeout_s
        with RPCClient(self.address, timeout_s=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceStartError(
                        f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if client.ping(timeout_s=2.0).ready:
                        return
                except RPCTimeout:
                    pass
                time.sleep(0.2)
        raise ServiceStartError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        """Ask the service to stop (SIGTERM to its process group), once; not waiting."""
        if self.proc.poll() is None and not self._terminated:
            # SIGTERM first so the service releases its engine and transport cleanly.
            os.killpg(self.proc.pid, signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()


def start_service(
    name: str,
    module: str,
    args: Sequence[str],
    address: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """``python -m module args...`` in its own process group, output to log_dir/name.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,  # own process group: stop() kills its children too
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    # who runs each service, for operators and the chaos harness (bench/chaos.py)
    (log_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
    return ServiceProcess(name, address, proc, log_path, log_file, module=module,
                          args=tuple(args), env=env)


class LocalCluster:
    """A set of service processes started together and always stopped together.

    With :meth:`supervise`, a service that exits on its own (a crash, a SIGKILL) is
    started again with the same command, up to ``max_restarts`` times, as the kubelet
    restarts a container: callers notice it gone through its ping and wait for it
    (k1rl/watch.py, k1rl/master/recovery.py).
    """

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.services: dict[str, ServiceProcess] = {}
        self.restarts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self, name: str, module: str, args: Sequence[str], address: str,
              env: dict[str, str] | None = None) -> ServiceProcess:
        """Start without waiting, so slow starters (vLLM, Megatron) boot in parallel."""
        svc = start_service(name, module, args, address, self.log_dir, env)
        with self._lock:
            self.services[name] = svc
        return svc

    def supervise(self, max_restarts: int, poll_s: float = 0.5) -> None:
        """Restart services that exit on their own, from a thread that lives as long as the
        cluster (the services die with the thread that started them: PDEATHSIG)."""
        if self._supervisor is None and max_restarts > 0:
            self._supervisor = threading.Thread(
                target=self._supervise, args=(max_restarts, poll_s), name="supervisor",
                daemon=True)
            self._supervisor.start()

    def _supervise(self, max_restarts: int, poll_s: float) -> None:
        from k1rl.metrics.prometheus import SERVICE_RESTARTS

        while not self._stopping.wait(poll_s):
            with self._lock:
                exited = [s for s in self.services.values() if s.exited]
                for svc in exited:
                    if self._stopping.is_set() or self.restarts.get(svc.name, 0) >= max_restarts:
                        continue
                    self.restarts[svc.name] = self.restarts.get(svc.name, 0) + 1
                    log.warning("%s exited with code %s: restart %d of %d", svc.name,
                                svc.proc.returncode, self.restarts[svc.name], max_restarts)
                    SERVICE_RESTARTS.labels(svc.name).inc()
                    try:
                        self.services[svc.name] = _restarted(svc, self.log_dir)
                    except Exception:  # noqa: BLE001 - this thread ending would take every
                        # service it restarted with it (PDEATHSIG): log, try next time
                        log.exception("could not restart %s", svc.name)

    def wait_ready(self, timeout_s: float) -> None:
        for svc in self.services.values():
            svc.wait_ready(timeout_s)

    def stop(self) -> None:
        """SIGTERM to every service at once, then wait for each: they shut down (release
        engines, transports) side by side, in the time of the slowest."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        services = list(reversed(self.services.values()))
        for svc in services:
            svc.terminate()
        for svc in services:
            svc.stop()
        self.services.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def trainer_service(address: str, config_path: Path, log_dir: Path,
                    ready_timeout_s: float = 900.0) -> Iterator[RPCClient]:
    """trainer_svc alone, started on ``config_path`` as a local process (SFT and DPO need
    no engine); yields its client and stops it after."""
    with LocalCluster(log_dir) as cluster:
        cluster.start("trainer", "trainer_svc", ["--config", str(config_path)], address)
        cluster.wait_ready(ready_timeout_s)
        with RPCClient(address, timeout_s=ready_timeout_s) as client:
            yield client


def _restarted(svc: ServiceProcess, log_dir: Path) -> ServiceProcess:
    _kill_group(svc.proc.pid)  # what it started goes with it, as in a pod
    svc.stop()  # closes its log file
    return start_service(svc.name, svc.module, svc.args, svc.address, log_dir, svc.env)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` nobody listens on, for a service started a moment later.

    The port is taken below the kernel's ephemeral range: between this check and the
    service's bind (seconds: a trainer imports torch first) every outgoing connection on
    the machine (torch.distributed stores, Mooncake, ZMQ clients) draws a local port from
    the ephemeral range, and one of them taking the chosen port made a service fail to
    bind with "Address already in use".
    """
    import random
    import socket

    low = _ephemeral_low()
    candidates = random.sample(range(10000, low), min(64, max(0, low - 10000)))
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return f"tcp://{host}:{sock.getsockname()[1]}"
    raise OSError(f"no free TCP port on {host}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class LocalStack:
    """trainer_svc + rollout_svc on this machine, with connected clients.

    Used by the demo, the end-to-end tests and the benchmarks: the same processes and
    messages as a cluster deployment, minus Kubernetes.
    """

    def __init__(self, cfg, config_path: Path, cluster: LocalCluster):
        from k1rl.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.config_path = config_path
        self.cluster = cluster
        self.trainer = RPCClient(cfg.trainer.address, timeout_s=300)
        self.rollout = RPCClient(cfg.rollout.address, timeout_s=300)
        self.tokenizer = load_tokenizer(cfg.model.path)

    @classmethod
    def start(
        cls,
        work_dir: Path,
        *,
        cfg=None,
        model_dir: Path | None = None,
        dummy_rollout: bool = True,
        ready_timeout_s: float = 600.0,
        model_kwargs: dict | None = None,
        engine_model_dir: Path | None = None,
    ) -> LocalStack:
        """Write the run config (fresh ports), build a tiny model if none is given,
        start both services in parallel and wait until they answer ready.
        ``engine_model_dir``: another checkpoint for the engine to load (default: the
        trainer's)."""
        from k1rl.config import RunConfig

        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        if model_dir is None:
            from k1rl.data.tiny_model import init_model

            model_dir = work_dir / "model"
            if not (model_dir / "config.json").exists():
                init_model(model_dir, **(model_kwargs or {}))
        cfg = (cfg or RunConfig()).model_copy(deep=True)
        cfg.model.path = str(model_dir)
        cfg.run_dir = str(work_dir.resolve())  # the services' files stay in the work dir
        cfg.trainer.address = free_tcp_address()
        cfg.rollout.address = free_tcp_address()
        config_path = work_dir / "run.yaml"
        config_path.write_text(cfg.dump_yaml())
        cluster = LocalCluster(work_dir / "logs")
        try:
            cluster.start("trainer", "trainer_svc", ["--config", str(config_path)],
                          cfg.trainer.address)
            engine_config = config_path
            if engine_model_dir is not None:
                engine_cfg = cfg.model_copy(deep=True)
                engine_cfg.model.path = str(engine_model_dir)
                engine_config = work_dir / "engine.yaml"
                engine_config.write_text(engine_cfg.dump_yaml())
            rollout_args = ["--config", str(engine_config)]
            rollout_args += ["--dummy-weights"] if dummy_rollout else []
            cluster.start("rollout", "rollout_svc", rollout_args, cfg.rollout.address)
            cluster.wait_ready(ready_timeout_s)
            return cls(cfg, config_path, cluster)
        except BaseException:
            cluster.stop()
            raise

    def stop(self) -> None:
        self.trainer.close()
        self.rollout.close()
        self.cluster.stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
