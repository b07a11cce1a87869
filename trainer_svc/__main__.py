"""python -m trainer_svc --config run.yaml [--address tcp://...]

Starts one process per tensor-parallel rank (gloo on CPU); rank 0 serves ZMQ.
"""

from __future__ import annotations

import os

import typer

from k1rl.config import load_config
from k1rl.service import setup_logging

# Followers block in a broadcast while the service is idle between iterations, which
# may be far longer than torch's default collective timeout.
IDLE_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0


def _rank_main(rank: int, config: str, address: str | None, port: int) -> None:
    setup_logging()
    from trainer_svc.dist import init_distributed
    from trainer_svc.server import serve_rank

    cfg = load_config(config)
    init_distributed(
        rank,
        cfg.trainer.tp,
        master_port=port,
        backend=cfg.trainer.dist_backend,
        timeout_s=IDLE_COLLECTIVE_TIMEOUT_S,
    )
    serve_rank(cfg, rank, cfg.trainer.tp, address)


def main(
    config: str = typer.Option(..., help="RunConfig YAML"),
    address: str = typer.Option(None, help="override trainer.address"),
) -> None:
    from trainer_svc.dist import free_port

    cfg = load_config(config)
    port = int(os.environ.get("K1RL_DIST_PORT", "0")) or free_port()
    if cfg.trainer.tp == 1:
        _rank_main(0, config, address, port)
        return
    import torch.multiprocessing as mp

    mp.start_processes(
        _rank_main, args=(config, address, port), nprocs=cfg.trainer.tp, start_method="spawn"
    )


if __name__ == "__main__":
    typer.run(main)
