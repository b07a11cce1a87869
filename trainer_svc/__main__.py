"""python -m trainer_svc --config run.yaml [--address tcp://...] [--nnodes N --node-rank R]

Run as is, this process becomes torchrun's agent (``torch.distributed.run``) and starts
this node's share of the trainer's tp x pp x dp ranks (a one-rank trainer runs in this
process), each of which re-enters this module
as a torchrun worker; rank 0 serves ZMQ. One node: a standalone rendezvous on a free port.
Several: ``--node-rank`` with ``MASTER_ADDR`` / ``MASTER_PORT`` (node 0 hosts rank 0, the
address the master dials), or ``--rdzv-endpoint host:port`` (c10d rendezvous; the ranks
land wherever the rendezvous puts them). ``K1RL_NNODES`` / ``K1RL_NODE_RANK`` (set by the
k8s manifests) stand in for the flags. If any rank fails, torchrun stops the others and
this process exits non-zero, naming the rank.
"""

from __future__ import annotations

import os

import typer

from k1rl.config import load_config
from k1rl.service import setup_logging

# Plain tracebacks: service logs are read by people and log collectors, not terminals.
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

_WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def torchrun_args(config: str, address: str | None, world: int, nnodes: int,
                  node_rank: int | None, rdzv_endpoint: str | None) -> list[str]:
    """torchrun's command line for this node's agent."""
    args = ["--nnodes", str(nnodes), "--nproc-per-node", str(world // nnodes),
            "--max-restarts", "0", "--monitor-interval", "1"]
    if rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    elif nnodes > 1 or node_rank:
        args += ["--node-rank", str(node_rank or 0),
                 "--master-addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
                 "--master-port", os.environ.get("MASTER_PORT")
                 or os.environ.get("K1RL_DIST_PORT") or "29500"]
    elif _env_int("K1RL_DIST_PORT"):
        args += ["--master-addr", "127.0.0.1", "--master-port", os.environ["K1RL_DIST_PORT"]]
    else:
        args += ["--standalone"]
    args += ["-m", "trainer_svc", "--config", config]
    if address:
        args += ["--address", address]
    return args


@app.command()
def main(
    config: str = typer.Option(..., help="RunConfig YAML"),
    address: str = typer.Option(None, help="override trainer.address"),
    nnodes: int = typer.Option(None, help="nodes of the trainer (default: K1RL_NNODES, "
                               "else trainer.nnodes)"),
    node_rank: int = typer.Option(None, help="this node's rank (default: K1RL_NODE_RANK)"),
    rdzv_endpoint: str = typer.Option(None, help="host:port of a c10d rendezvous"),
) -> None:
    setup_logging()
    if all(name in os.environ for name in _WORKER_ENV):
        from trainer_svc.server import worker_main

        worker_main(config, address)
        return
    cfg = load_config(config)
    nnodes = nnodes or _env_int("K1RL_NNODES") or cfg.trainer.nnodes
    node_rank = node_rank if node_rank is not None else _env_int("K1RL_NODE_RANK")
    world = cfg.trainer.world_size
    if world % nnodes:
        raise typer.BadParameter(f"{nnodes} nodes cannot hold the trainer's {world} ranks "
                                 "(tp x pp x dp) equally")
    if world == 1 and nnodes == 1 and not rdzv_endpoint:
        # one rank: no agent to supervise it, so it runs here (seconds saved at each start)
        from trainer_svc.dist import free_port
        from trainer_svc.server import worker_main

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("K1RL_DIST_PORT") or str(free_port()))
        worker_main(config, address)
        return
    from torch.distributed.run import main as torchrun

    torchrun(torchrun_args(config, address, world, nnodes, node_rank, rdzv_endpoint))


if __name__ == "__main__":
    app()
