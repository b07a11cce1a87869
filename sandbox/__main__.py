"""python -m sandbox serve | run  (see sandbox/README.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from k1rl.config import ConfigError, RunConfig, SandboxConfig, load_config
from k1rl.service import setup_logging

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, no_args_is_help=True)


def _config(path: str | None) -> SandboxConfig:
    return load_config(path).sandbox if path else RunConfig().sandbox


@app.command()
def serve(
    config: str = typer.Option(None, help="RunConfig YAML (its `sandbox` section)"),
    address: str = typer.Option(None, help="override sandbox.address (ZMQ)"),
    http_port: int = typer.Option(None, help="override sandbox.http_port (0: any free port)"),
    workers: int = typer.Option(None, help="override sandbox.workers"),
) -> None:
    """Serve run_code over ZMQ and POST /run_code over HTTP until SIGTERM."""
    setup_logging()
    from sandbox.server import serve as serve_forever

    cfg = _config(config)
    updates = {k: v for k, v in (("http_port", http_port), ("workers", workers)) if v is not None}
    cfg = SandboxConfig.model_validate({**cfg.model_dump(), **updates})
    serve_forever(cfg, address=address)


@app.command()
def run(
    language: str = typer.Option(..., help="python, cpp, c, ..."),
    source: Path = typer.Option(..., exists=True, dir_okay=False, help="program file"),
    stdin: Path = typer.Option(None, exists=True, dir_okay=False, help="its stdin"),
    expected: Path = typer.Option(None, exists=True, dir_okay=False,
                                  help="expected stdout (whitespace-insensitive check)"),
    time_limit: float = typer.Option(2.0, help="CPU seconds"),
    memory_mb: int = typer.Option(256, help="memory limit in MB"),
    address: str = typer.Option(None, help="sandbox service (default: sandbox.address)"),
    config: str = typer.Option(None, help="RunConfig YAML giving sandbox.address"),
    timeout_s: float = typer.Option(300.0, help="how long to wait for the program's result"),
    local: bool = typer.Option(False, help="run it here, under the same isolation as the "
                               "service (one worker of the config's sandbox), no service"),
) -> None:
    """Run one program through a sandbox service (or --local) and print its JSON response.

    Exit code 0 when the sandbox answered (whatever the verdict), 2 for a request it
    refused, 1 when no service answers at the address (said within PING_S seconds).
    """
    from k1rl.protocol import RunCodeRequest, TestCase

    try:
        req = RunCodeRequest(
            language=language, source=source.read_text(),
            tests=[TestCase(stdin=stdin.read_text() if stdin else "",
                            expected=expected.read_text() if expected else None)],
            time_limit_s=time_limit, memory_limit_mb=memory_mb,
        )
    except ValueError as e:
        typer.echo(json.dumps({"error": str(e)}), err=True)
        raise typer.Exit(2) from None
    cfg = _config(config)
    result = (_run_here(cfg, req) if local
              else _run_remote(address or cfg.address, req, timeout_s))
    typer.echo(json.dumps(result.model_dump(), indent=2))


# a running service answers a ping in milliseconds, even while its workers are busy
PING_S = 2.0


def _run_remote(addr: str, req, timeout_s: float):
    from k1rl.protocol import RunCodeResult
    from k1rl.rpc import RemoteError, RPCClient, RPCTimeout

    client = RPCClient(addr, timeout_s=timeout_s)
    try:
        try:
            client.ping(timeout_s=PING_S)
        except (RPCTimeout, OSError):
            typer.echo(json.dumps({"error": (
                f"nothing answers at {addr} within {PING_S:.0f} s: start a sandbox service "
                "there (`python -m sandbox serve --address ...`), point --address or "
                "--config at one, or run the program here with --local")}), err=True)
            raise typer.Exit(1) from None
        return client.call("run_code", req, RunCodeResult, timeout_s=timeout_s)
    except RemoteError as e:
        typer.echo(json.dumps({"error": str(e)}), err=True)
        raise typer.Exit(2) from None
    except (RPCTimeout, OSError) as e:
        typer.echo(json.dumps({"error": f"no answer from the sandbox at {addr}: {e}"}), err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def _run_here(cfg: SandboxConfig, req):
    """The request on a one-worker pool of this process: the service's isolation, runner
    and limits, without the service."""
    from sandbox.pool import WorkerPool

    pool = WorkerPool(SandboxConfig.model_validate({**cfg.model_dump(), "workers": 1}))
    try:
        return pool.run(req)
    except ValueError as e:
        typer.echo(json.dumps({"error": str(e)}), err=True)
        raise typer.Exit(2) from None
    finally:
        pool.close()


@app.command("build-tests")
def build_tests(
    problem: Path = typer.Argument(..., exists=True, file_okay=False,
                                   help="problem dir: problem.yaml, gen.py, solutions/"),
    out: Path = typer.Option(None, help="where to write the test set (default PROBLEM/tests.json)"),
    address: str = typer.Option(None, help="sandbox service (default: sandbox.address)"),
    config: str = typer.Option(None, help="RunConfig YAML giving sandbox.address"),
    parallel: int = typer.Option(2, min=1, help="references run at once"),
) -> None:
    """Generate CYaRon cases, keep those the references agree on, check the references."""
    from k1rl.protocol import RunCodeRequest, RunCodeResult
    from k1rl.rpc import ThreadLocalClients
    from sandbox.testgen import build_tests as build, write_test_set

    clients = ThreadLocalClients(address or _config(config).address, timeout_s=600)

    def run_one(req: RunCodeRequest) -> RunCodeResult:
        return clients.call("run_code", req, RunCodeResult)

    try:
        test_set = build(problem, run_one, parallel=parallel)
    finally:
        clients.close()
    target = out or problem / "tests.json"
    write_test_set(test_set, target)
    status = "kept" if test_set.kept else f"DROPPED ({test_set.reason})"
    typer.echo(f"{test_set.problem}: {len(test_set.tests)}/{test_set.cases_generated} cases "
               f"kept, {len(test_set.passing_references)}/{len(test_set.references)} "
               f"references pass them all; problem {status} -> {target}")
    if not test_set.kept:
        raise typer.Exit(3)


if __name__ == "__main__":
    try:
        app()
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
