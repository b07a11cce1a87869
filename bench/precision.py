"""What bf16 mixed precision costs on this machine, against float32, for both engines.

Trainer: megatron-core SFT steps (packed rows, AdamW) of one model built in each dtype
(`MegatronTrainer.from_hf(dtype=...)`), median step time after a warm-up step. Rollout:
vLLM generating from the same prompts with the same seeds in each dtype, decode tokens per
second. The model is a random-init checkpoint of ``--like`` (default: Qwen2.5-0.5B's
published config) scaled to ``--layers`` x ``--hidden``. Each dtype runs alone, one after
the other. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PUBLISHED = Path(__file__).resolve().parents[1] / "tests" / "data" / "published_configs"
DTYPES = ("float32", "bfloat16")


def _trainer_steps(rank, world, model_dir, dtype, steps, seed):
    import random

    from trainer_svc import MegatronTrainer

    rng = random.Random(seed)
    trainer = MegatronTrainer.from_hf(model_dir, tp=world, lr=1e-4, dtype=dtype,
                                      seq_length=512)
    examples = [([rng.randrange(3, 300) for _ in range(40)],
                 [rng.randrange(3, 300) for _ in range(60)]) for _ in range(32)]
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        trainer.sft_step(examples)
        times.append(time.perf_counter() - started)
    return times[1:]  # the first step builds the optimizer state


def _rollout(model_dir: str, dtype: str, prompts: int, n: int, tokens: int) -> float:
    """Decode tokens per second of vLLM in ``dtype`` (in a fresh process per dtype)."""
    import subprocess

    code = f"""
import time, json
from vllm import LLM, SamplingParams
llm = LLM(model={model_dir!r}, dtype={dtype!r}, max_model_len=256, enforce_eager=True,
          seed=0, max_num_seqs=512, max_num_batched_tokens=512 * 256)
prompts = [{{"prompt_token_ids": [3 + (7 * i + j) % 290 for j in range(32)]}}
           for i in range({prompts})]
params = SamplingParams(n={n}, temperature=1.0, max_tokens={tokens}, ignore_eos=True, seed=0)
llm.generate(prompts[:2], params, use_tqdm=False)
started = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - started
print(json.dumps(sum(len(c.token_ids) for o in outs for c in o.outputs) / elapsed))
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=1800)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--like", type=Path, default=PUBLISHED / "qwen2.5-0.5b-instruct.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=448, help="width where --like's is free")
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    from k1rl.data.tiny_model import init_model
    from trainer_svc import run_distributed

    model_dir = Path(tempfile.mkdtemp(prefix="k1rl-bench-precision-")) / "model"
    summary = init_model(model_dir, like=args.like, num_layers=args.layers, num_kv_heads=2,
                         hidden_size=args.hidden, intermediate_size=args.intermediate,
                         corpus_size=20)
    result: dict = {"model": args.like.stem, "parameters": summary.params,
                    "layers": args.layers, "hidden": summary.hidden_size}
    for dtype in DTYPES:
        (times,) = run_distributed(_trainer_steps, 1, str(model_dir), dtype, args.steps, 0)
        result[f"trainer_step_s_{dtype}"] = round(statistics.median(times), 3)
        print(f"trainer {dtype}: steps {[round(t, 3) for t in times]}", flush=True)
    for dtype in DTYPES:
        rate = _rollout(str(model_dir), dtype, args.prompts, args.n, args.tokens)
        result[f"rollout_tokens_per_s_{dtype}"] = round(rate, 1)
        print(f"rollout {dtype}: {rate:.0f} tokens/s", flush=True)
    result["trainer_bf16_over_fp32"] = round(
        result["trainer_step_s_bfloat16"] / result["trainer_step_s_float32"], 2)
    result["rollout_bf16_over_fp32"] = round(
        result["rollout_tokens_per_s_float32"] / result["rollout_tokens_per_s_bfloat16"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
