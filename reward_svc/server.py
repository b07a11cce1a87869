"""Serve a RewardService over ZMQ: method ``score`` (RewardRequest -> RewardResult), ``ping``."""

from __future__ import annotations

import logging

from k1rl.config import RunConfig
from k1rl.protocol import RewardRequest
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled

from reward_svc import verifiers
from reward_svc.service import RewardService

log = logging.getLogger(__name__)


def register_service(server: RPCServer, service: RewardService) -> None:
    server.register("score", RewardRequest, service.score)


def serve(cfg: RunConfig, *, address: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT on ``address`` (default ``cfg.reward.address``)."""
    # answer pings (not ready) while the math-verify worker starts
    server = RPCServer(address or cfg.reward.address, service="reward", ready=False,
                       handler_threads=cfg.reward.handler_threads,
                       max_message_bytes=cfg.reward.max_message_bytes,
                       metrics_port=cfg.reward.metrics_port)
    server.start_in_thread()
    service = RewardService(cfg.reward)
    try:
        service.start()
        register_service(server, service)
        server.set_ready(True, verifiers=",".join(verifiers.available()))
        log.info("reward_svc ready on %s", server.address)
        run_until_signalled(server)
    finally:
        server.stop()
        service.close()
