"""python -m reward_svc --config run.yaml [--address tcp://...]"""

from __future__ import annotations

import typer

from k1rl.config import load_config
from k1rl.service import setup_logging

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)


@app.command()
def main(
    config: str = typer.Option(..., help="RunConfig YAML"),
    address: str = typer.Option(None, help="override reward.address"),
) -> None:
    setup_logging()
    from reward_svc.server import serve

    serve(load_config(config), address=address)


if __name__ == "__main__":
    app()
