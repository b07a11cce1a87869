"""trainer_svc over ZMQ: SFT steps, log-probs, weight publishing, checkpoints.

Every rank of the TP x PP x DP grid holds a MegatronTrainer, and every trainer method is
collective. Rank 0 owns the RPC socket; before running a request it broadcasts (method,
payload) to the other ranks, which replay it, so all ranks enter the same collectives in
the same order. Only rank 0 answers and only rank 0 owns the weight sender: the export
brings every stage's tensors to it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch.distributed as dist
from pydantic import BaseModel

from k1rl.config import RunConfig, load_config
from k1rl.protocol import (
    CheckpointRequest,
    CheckpointResult,
    LogprobRequest,
    LogprobResult,
    PushWeightsRequest,
    ReleaseWeights,
    RoundTripRequest,
    RoundTripResult,
    SFTBatch,
    TrainBatch,
    TrainStats,
    WeightManifest,
    WeightReaders,
)
from k1rl.paths import confine
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled
from trainer_svc.losses import create as create_loss
from trainer_svc.rl_step import StepSettings, rl_iteration
from trainer_svc.trainer import MegatronTrainer

log = logging.getLogger(__name__)

_STOP = "__stop__"
# Followers block in a broadcast while the service is idle between iterations, which
# may be far longer than torch's default collective timeout.
IDLE_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0


class TrainerService:
    """The trainer's verbs; the same object runs on every rank."""

    def __init__(self, trainer: MegatronTrainer, cfg: RunConfig, rank: int):
        self.trainer = trainer
        self.cfg = cfg
        self.rank = rank
        self.sender = None
        if rank == 0:
            from checkpoint_engine import get_sender
            from checkpoint_engine.options import transport_options

            self.sender = get_sender(
                cfg.weights.transport, **transport_options(cfg.weights, role="sender")
            )
        self._planned = False
        self._publish_started: float | None = None
        self.loss = create_loss(cfg.trainer.loss)
        self._after_sft = False
        self.broken: str | None = None

    def fail(self, reason: str) -> None:
        """The rank group is broken: stop serving (SIGTERM to this process, as k8s would);
        :func:`serve_rank` then raises ``reason`` so torchrun reports this rank."""
        log.critical("%s", reason)
        self.broken = reason
        os.kill(os.getpid(), signal.SIGTERM)

    # -------------------------------------------------------------------- verbs
    def sft_step(self, batch: SFTBatch) -> TrainStats:
        examples = [(e.prompt_token_ids, e.response_token_ids) for e in batch.examples]
        # SFT is plain supervised learning: always AdamW, whatever RL iterations use
        self.trainer.configure_optimizer("adam", batch.lr or self.trainer.optim.lr)
        stats = self.trainer.sft_step(examples, [e.response_mask for e in batch.examples],
                                      batch.seq_length)
        self._after_sft = True
        return TrainStats(
            ref=batch.ref,
            policy_version=self.trainer.policy_version,
            steps=1,
            loss=stats["loss"],
            metrics={k: float(v) for k, v in stats.items() if k != "loss"},
        )

    def train(self, batch: TrainBatch) -> TrainStats:
        """One RL iteration of the configured loss (trainer_svc.rl_step)."""
        newest = max(s.policy_version for s in batch.samples)
        if newest > self.trainer.policy_version:
            # e.g. a trainer restarted from the base model (v0) mid-run: training these
            # samples would silently fork the run from the wrong policy
            raise ValueError(
                f"this trainer holds policy v{self.trainer.policy_version}, but the batch was "
                f"sampled from v{newest}: load the run's checkpoint of v{newest} first")
        t = self.cfg.trainer
        settings = StepSettings.from_config(t)
        if self._after_sft:
            # SFT's moments (another objective, another lr) never carry into RL
            settings = replace(settings, optimizer="reset")
            self._after_sft = False
        # SFT steps may have scheduled another lr; RL iterations use the configured one
        self.trainer.configure_optimizer(t.optimizer, t.lr)
        stats = rl_iteration(self.trainer, batch, self.loss, settings)
        return TrainStats(
            ref=batch.ref,
            policy_version=self.trainer.policy_version,
            steps=int(stats["steps"]),
            loss=stats["loss"],
            metrics={k: float(v) for k, v in stats.items() if k not in ("loss", "steps")},
        )

    def logprobs(self, req: LogprobRequest) -> LogprobResult:
        values = self.trainer.logprobs(req.prompt_token_ids, req.response_token_ids)
        return LogprobResult(logprobs=values, policy_version=self.trainer.policy_version)

    def roundtrip(self, req: RoundTripRequest) -> RoundTripResult | None:
        self.finish_publish()
        result = self.trainer.compare_with_source()
        return None if result is None else RoundTripResult(**result)

    def push_weights(self, req: PushWeightsRequest) -> WeightManifest | None:
        """Export HF-named tensors and pack them into the sender's registered region.

        Pipelined (``weights.pipelined``): the manifest goes back at once while a sender
        thread exports and packs, and receivers pull each bucket as soon as it is packed.
        Every verb waits for that pack first (:meth:`finish_publish`), so no training
        step changes the weights being exported and, with TP, no collective of another
        verb interleaves with the export's gathers.
        """
        started = time.perf_counter()
        # Only rank 0 publishes, so gather to it alone (cheaper than an all-gather).
        tensors = self.trainer.iter_hf_tensors(dst=0)
        if self.sender is None:
            for _ in tensors:  # followers take part in the gathers and yield nothing
                pass
            return None
        self.finish_publish()
        if req.abandon_readers and (gone := self.sender.abandon_readers()):
            log.warning("readers of the last publish declared dead by a restarted sidecar: %s",
                        ", ".join(gone))
        if not self._planned:
            self._plan()
        pipelined = self.cfg.weights.pipelined
        manifest = self.sender.publish(self.trainer.policy_version, tensors, pipelined=pipelined,
                                       receivers=req.receivers)
        self._publish_started = None if not pipelined else started
        if not pipelined:
            self._log_published(started)
        return manifest

    def release_weights(self, req: ReleaseWeights) -> WeightReaders:
        """A receiver of the last publish is done with it (rank 0 only: the sender's)."""
        self.sender.release(req.version, req.receiver, dead=req.dead)
        if req.dead:
            log.warning("receiver %s of v%d declared dead", req.receiver, req.version)
        return WeightReaders(version=req.version, pending=self.sender.readers)

    def finish_publish(self) -> None:
        """Wait for a pipelined pack to end; raise its error to the caller (once)."""
        if self.sender is None or self._publish_started is None:
            return
        started, self._publish_started = self._publish_started, None
        self.sender.wait_published()
        self._log_published(started)

    def _log_published(self, started: float) -> None:
        stats = self.sender.stats
        log.info(
            "published policy v%d: %.1f MB, pack %.3f s, checksum %.3f s, %.3f s after push",
            stats.version,
            stats.bytes / 1e6,
            stats.pack_s,
            stats.checksum_s,
            time.perf_counter() - started,
        )

    def checkpoint(self, req: CheckpointRequest) -> CheckpointResult:
        path = confine(req.path, self.cfg.run_dir)
        if req.action == "save":
            self.trainer.save(path)
        elif req.action == "load":
            self.trainer.load(path)
        else:
            self.trainer.export_hf(path)
        return CheckpointResult(path=str(path), policy_version=self.trainer.policy_version)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()

    def guarded(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Wrap a rank-0 handler so it runs only after a pipelined pack has ended."""

        def run(req: BaseModel) -> Any:
            self.finish_publish()
            return handler(req)

        return run

    def _plan(self) -> None:
        from checkpoint_engine import plan_buckets

        dtype = self.trainer.dtype_name
        specs = [(n, dtype, list(s)) for n, s in self.trainer.hf_tensor_shapes().items()]
        metas, buckets = plan_buckets(specs, self.cfg.weights.bucket_mb * 2**20)
        self.sender.prepare(metas, buckets)
        self._planned = True

    # ---------------------------------------------------------------- dispatch
    def routes(self) -> dict[str, tuple[type[BaseModel], Callable[[Any], Any]]]:
        return {
            "sft_step": (SFTBatch, self.sft_step),
            "train": (TrainBatch, self.train),
            "logprobs": (LogprobRequest, self.logprobs),
            "push_weights": (PushWeightsRequest, self.push_weights),
            "checkpoint": (CheckpointRequest, self.checkpoint),
            "roundtrip": (RoundTripRequest, self.roundtrip),
        }


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GroupBroken(RuntimeError):
    """A collective failed: a peer rank died or became unreachable. Fatal for the rank."""


def _agree(ok: bool, device: str) -> bool:
    """Whether the verb succeeded on every rank (an all-reduce of failure flags). Every rank
    runs it after every verb, so an error on one rank (bad input fails alike everywhere)
    leaves all ranks in step; a dead peer makes it raise :class:`GroupBroken`."""
    import torch

    failed = torch.tensor([0 if ok else 1], device=device)
    try:
        dist.all_reduce(failed)
    except Exception as exc:  # noqa: BLE001 - gloo and NCCL raise plain RuntimeErrors
        raise GroupBroken(f"trainer rank {dist.get_rank()}: a peer rank is gone ({exc})") from exc
    return int(failed.item()) == 0


def _collective(method: str, fn: Callable[[Any], Any], service: TrainerService,
                world_size: int) -> Callable[[Any], Any]:
    """Wrap a rank-0 handler so the followers replay the same call first."""
    if world_size == 1:
        return fn
    device = service.cfg.trainer.device

    def handler(req: BaseModel) -> Any:
        try:
            try:
                _broadcast((method, req.model_dump()))
            except Exception as exc:  # noqa: BLE001 - only a lost peer fails a broadcast
                raise GroupBroken(f"trainer rank 0: {method} could not reach the other "
                                  f"ranks ({exc})") from exc
            try:
                result = fn(req)
            except Exception:
                _agree(False, device)
                raise
            if not _agree(True, device):
                raise RuntimeError(f"{method} failed on another trainer rank (see its log)")
            return result
        except GroupBroken as exc:
            service.fail(str(exc))
            raise

    return handler


def follow(service: TrainerService) -> None:
    """Non-zero ranks: replay rank 0's calls until it broadcasts stop. A verb that fails
    here fails on rank 0 too (it answers with the error); a lost peer ends the rank."""
    routes = service.routes()
    device = service.cfg.trainer.device
    while True:
        method, payload = _broadcast(None)
        if method == _STOP:
            return
        model, fn = routes[method]
        try:
            fn(model.model_validate(payload))
            ok = True
        except Exception:  # noqa: BLE001 - reported by rank 0; this rank stays in step
            log.exception("%s failed on trainer rank %d", method, service.rank)
            ok = False
        _agree(ok, device)


def serve_rank(cfg: RunConfig, rank: int, world_size: int, address: str | None,
               node_lead: bool = False) -> None:
    """One rank's life. Rank 0 serves the verbs; ``node_lead`` (a later node's first rank)
    answers only ping on the address, so that node's pod has a liveness and readiness to
    probe, as rank 0's has."""
    trainer = MegatronTrainer.from_hf(
        cfg.model.path,
        tp=cfg.trainer.tp,
        pp=cfg.trainer.pp,
        sequence_parallel=cfg.trainer.sequence_parallel,
        distributed_optimizer=cfg.trainer.distributed_optimizer,
        lr=cfg.trainer.lr,
        weight_decay=cfg.trainer.weight_decay,
        betas=(cfg.trainer.adam_beta1, cfg.trainer.adam_beta2),
        grad_clip=cfg.trainer.grad_clip,
        seed=cfg.seed,
        device=cfg.trainer.device,
        seq_length=cfg.trainer.seq_length,
        micro_batch_tokens=cfg.trainer.micro_batch_tokens,
        attention=cfg.trainer.attention,
        dtype=cfg.model.dtype,
    )
    service = TrainerService(trainer, cfg, rank)
    try:
        if rank != 0:
            probe = _probe_server(address or cfg.trainer.address, rank) if node_lead else None
            try:
                follow(service)
            finally:
                if probe is not None:
                    probe.stop()
            return
        server = RPCServer(address or cfg.trainer.address, service="trainer",
                           max_message_bytes=cfg.trainer.max_message_bytes,
                           metrics_port=cfg.trainer.metrics_port)
        for method, (model, fn) in service.routes().items():
            handler = service.guarded(_collective(method, fn, service, world_size))
            server.register(method, model, _reporting_version(server, trainer, handler))
        # the sender's bookkeeping: rank 0 alone, and not behind a pipelined pack
        server.register("release_weights", ReleaseWeights, service.release_weights, inline=True)
        layout = trainer.layout
        server.set_ready(True, tp=layout.tp, pp=layout.pp, dp=layout.dp,
                         policy_version=trainer.policy_version)
        server.start_in_thread()
        log.info("trainer ready on %s (%s)", server.address, layout.describe())
        run_until_signalled(server)
        if service.broken:
            raise GroupBroken(service.broken)
        if world_size > 1:
            try:  # the followers are still in the export's gathers until it ends
                service.finish_publish()
            except Exception:
                log.exception("the last weight publish failed")
            _broadcast((_STOP, None))
    finally:
        service.close()


def _reporting_version(server: RPCServer, trainer, handler: Callable[[Any], Any]):
    """``handler``, after which ping reports the policy version the trainer holds: the
    master checks it after a failure (a restarted trainer holds the base model's v0)."""
    def run(request: Any) -> Any:
        try:
            return handler(request)
        finally:
            server.set_detail(policy_version=trainer.policy_version)
    return run


def _probe_server(address: str, rank: int) -> RPCServer | None:
    try:
        server = RPCServer(address, service="trainer", max_message_bytes=1 << 16)  # ping only
    except ValueError as e:  # e.g. a second node on one machine given rank 0's address
        log.warning("trainer rank %d answers no probes: %s", rank, e)
        return None
    server.set_ready(True, rank=rank, follower=True)
    server.start_in_thread()
    log.info("trainer rank %d (following rank 0) answers ping on %s", rank, server.address)
    return server


def worker_main(config_path: str, address: str | None) -> None:
    """Entry of one trainer rank started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous's MASTER_ADDR / MASTER_PORT in the environment)."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record

    cfg = load_config(config_path)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != cfg.trainer.world_size:
        raise RuntimeError(f"torchrun started {world} ranks; the config's trainer runs "
                           f"tp x pp x dp = {cfg.trainer.world_size}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.trainer.device == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        # torchrun's default is one thread per worker; a rank gets its share of the cores
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    from trainer_svc.dist import init_distributed

    init_distributed(rank, world, None, backend=cfg.trainer.dist_backend,
                     timeout_s=IDLE_COLLECTIVE_TIMEOUT_S)
    # record: torchrun's error report names this rank and carries its traceback
    node_lead = rank != 0 and local_rank == 0
    record(serve_rank)(cfg, rank, world, address, node_lead)
