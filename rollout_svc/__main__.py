"""python -m rollout_svc --config run.yaml [--dummy-weights] [--address tcp://...] [--standby]
[--judge]"""

from __future__ import annotations

import typer

from k1rl.config import load_config
from k1rl.service import setup_logging

# Plain tracebacks: service logs are read by people and log collectors, not terminals.
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)


@app.command()
def main(
    config: str = typer.Option(..., help="RunConfig YAML"),
    dummy_weights: bool = typer.Option(
        False, help="start with random weights and wait for the trainer's first push"
    ),
    address: str = typer.Option(None, help="override rollout.address"),
    standby: bool = typer.Option(
        False, help="import vLLM and answer pings (not ready), but create the engine only "
        "when called `start_engine` (the restart lifecycle's next engine)"),
    judge: bool = typer.Option(
        False, help="serve the CoT reward model (reward.judge.model at reward.judge.address) "
        "instead of the policy"),
) -> None:
    setup_logging()
    from rollout_svc.server import serve

    serve(load_config(config), dummy_weights=dummy_weights, address=address, standby=standby,
          judge=judge)


if __name__ == "__main__":
    app()
