"""trainer_svc over ZMQ: SFT steps, log-probs, weight publishing, checkpoints.

Tensor parallelism: every TP rank holds a MegatronTrainer, and every trainer method
is collective. Rank 0 owns the RPC socket; before running a request it broadcasts
(method, payload) to the other ranks, which replay it, so all ranks enter the same
collectives in the same order. Only rank 0 answers and only rank 0 owns the weight
sender (every rank holds the full HF tensors after the export's all-gather).
"""

from __future__ import annotations

import logging
from dataclasses import replace
import time
from collections.abc import Callable
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
    RoundTripRequest,
    RoundTripResult,
    SFTBatch,
    TrainBatch,
    TrainStats,
    WeightManifest,
)
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled, setup_logging
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
        if not self._planned:
            self._plan()
        pipelined = self.cfg.weights.pipelined
        manifest = self.sender.publish(self.trainer.policy_version, tensors, pipelined=pipelined)
        self._publish_started = None if not pipelined else started
        if not pipelined:
            self._log_published(started)
        return manifest

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
        if req.action == "save":
            self.trainer.save(req.path)
        elif req.action == "load":
            self.trainer.load(req.path)
        else:
            self.trainer.export_hf(req.path)
        return CheckpointResult(path=req.path, policy_version=self.trainer.policy_version)

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


def _collective(method: str, fn: Callable[[Any], Any], world_size: int) -> Callable[[Any], Any]:
    """Wrap a rank-0 handler so the followers replay the same call first."""
    if world_size == 1:
        return fn

    def handler(req: BaseModel) -> Any:
        _broadcast((method, req.model_dump()))
        return fn(req)

    return handler


def follow(service: TrainerService) -> None:
    """Non-zero ranks: replay rank 0's calls until it broadcasts stop."""
    routes = service.routes()
    while True:
        method, payload = _broadcast(None)
        if method == _STOP:
            return
        model, fn = routes[method]
        fn(model.model_validate(payload))


def serve_rank(cfg: RunConfig, rank: int, world_size: int, address: str | None) -> None:
    trainer = MegatronTrainer.from_hf(
        cfg.model.path,
        tp=cfg.trainer.tp,
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
            follow(service)
            return
        server = RPCServer(address or cfg.trainer.address, service="trainer")
        for method, (model, fn) in service.routes().items():
            server.register(method, model, service.guarded(_collective(method, fn, world_size)))
        server.set_ready(True, tp=world_size, policy_version=trainer.policy_version)
        server.start_in_thread()
        log.info("trainer ready on %s (tp=%d)", server.address, world_size)
        run_until_signalled(server)
        if world_size > 1:
            try:  # the followers are still in the export's gathers until it ends
                service.finish_publish()
            except Exception:
                log.exception("the last weight publish failed")
            _broadcast((_STOP, None))
    finally:
        service.close()


def rank_main(rank: int, config_path: str, address: str | None, port: int) -> None:
    """Entry of one TP rank process (module-level so multiprocessing spawn can find it)."""
    from trainer_svc.dist import init_distributed

    setup_logging()
    cfg = load_config(config_path)
    init_distributed(
        rank,
        cfg.trainer.tp,
        master_port=port,
        backend=cfg.trainer.dist_backend,
        timeout_s=IDLE_COLLECTIVE_TIMEOUT_S,
    )
    serve_rank(cfg, rank, cfg.trainer.tp, address)
