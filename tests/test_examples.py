"""Every example config runs from a fresh clone as its header says: the header's commands,
run in order from a directory holding only examples/, succeed.

Runs are shortened (RL: one iteration of 4 prompts, no in-run evaluation; SFT: two steps;
eval: 8 rows, 2 samples) and moved to free ports, with options added to the header's
commands; the commands and the configs are the header's."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from k1rl.config import load_config
from k1rl.launch import free_tcp_address

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
SHORTEN = {
    "rl": ["--set=rl.iterations=1", "--set=rl.prompts_per_iteration=4", "--set=rl.eval_every=0"],
    "sft": ["--set=sft.stages=[{steps: 2, lr: 1.0e-3}]", "--set=sft.eval_every=0"],
    "eval": ["--limit=8", "--samples=2"],
}


def header_commands(path: Path) -> list[list[str]]:
    """The indented `#   k1rl ...` lines of the file's leading comment block, as argv lists."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        command = re.match(r"#\s{2,}(k1rl .*)$", line)
        if command:
            commands.append(shlex.split(command.group(1)))
    return commands


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_says_how_to_run_it(example):
    commands = header_commands(example)
    assert any(c[1] == "rl" and f"examples/configs/{example.name}" in c for c in commands)
    load_config(example)


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_runs_as_its_header_says(example, tmp_path):
    shutil.copytree(EXAMPLES.parent, tmp_path / "examples")
    cfg = load_config(example)
    sandbox = free_tcp_address()
    moved = [*(f"{name}.address={free_tcp_address()}"
               for name in ("trainer", "rollout", "reward", "checkpoint_engine")),
             f"sandbox.address={sandbox}", f"reward.sandbox_address={sandbox}",
             "sandbox.http_port=null"]
    for argv in header_commands(example):
        argv += SHORTEN.get(argv[1], [])
        if argv[1] in ("rl", "sft"):
            argv += [f"--set={pair}" for pair in moved]
        out = subprocess.run([sys.executable, "-m", "k1rl", *argv[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=900, check=False)
        assert out.returncode == 0, f"{shlex.join(argv)}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    run_dir = tmp_path / cfg.run_dir
    for argv in header_commands(example):
        if "--run-dir" in argv:
            run_dir = tmp_path / argv[argv.index("--run-dir") + 1]
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
