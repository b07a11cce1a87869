"""python -m trainer_svc --config run.yaml [--address tcp://...]

Starts one process per tensor-parallel rank (gloo on CPU); rank 0 serves ZMQ.
"""

from __future__ import annotations

import os

import typer

from k1rl.config import load_config
from k1rl.service import setup_logging

# Plain tracebacks: service logs are read by people and log collectors, not terminals.
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)


@app.command()
def main(
    config: str = typer.Option(..., help="RunConfig YAML"),
    address: str = typer.Option(None, help="override trainer.address"),
) -> None:
    from trainer_svc.dist import free_port
    from trainer_svc.server import rank_main

    setup_logging()
    cfg = load_config(config)
    port = int(os.environ.get("K1RL_DIST_PORT", "0")) or free_port()
    if cfg.trainer.tp == 1:
        rank_main(0, config, address, port)
        return
    import torch.multiprocessing as mp

    mp.start_processes(
        rank_main, args=(config, address, port), nprocs=cfg.trainer.tp, start_method="spawn"
    )


if __name__ == "__main__":
    app()
