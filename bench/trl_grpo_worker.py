"""The peer in bench/peer_trl.py: TRL's GRPOTrainer on k1rl's RL prompts, scored by k1rl's
reward_svc, for a fixed training wall time.

Runs in .venv-trl (bench/trl_env.py), started by peer_trl.py with the repo on PYTHONPATH.
Of k1rl it imports only ``k1rl.protocol`` and ``k1rl.rpc`` (pydantic, pyzmq, msgpack): the
rewards come from the same reward_svc k1rl's loop calls, item by item, so both sides
optimise exactly the same reward (task reward + k1.5 length penalty; a response the
sandbox could not judge is left out of the step, as k1rl leaves it out).

Settings that make it the comparison asked for: raw text prompts (no chat template, as
k1rl), ``num_generations`` samples per prompt, ``prompts_per_step`` prompts per optimizer
step (one generation batch per step), temperature / top_p / max_completion_length as
k1rl's rollouts, beta 0 (no reference model), loss_type "dapo", constant lr, HF generate
on CPU. Everything else is GRPOTrainer's default. A callback stops training at the
first optimizer step that ends past ``--budget-s`` seconds of training.

Writes ``OUT/model`` (HF, safetensors) and ``OUT/result.json`` (steps, completions,
wall seconds, per-step rewards and times). Lines starting with "trl:" are progress.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from k1rl.protocol import RewardItem, RewardRequest, RewardResult, RunRef
from k1rl.rpc import RPCClient


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="HF checkpoint to start from (the SFT)")
    ap.add_argument("--prompts", required=True, help="JSONL: prompt, answer, verifier per row")
    ap.add_argument("--reward-address", required=True, help="reward_svc's ZMQ address")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--budget-s", type=float, required=True, help="training wall seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--max-completion-length", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--run-id", default="peer-trl")
    return ap.parse_args()


class RewardTally:
    """What the reward function saw: completions scored, right, and not judgeable."""

    def __init__(self) -> None:
        self.completions = 0
        self.correct = 0
        self.errors = 0


def reward_function(address: str, n: int, run_id: str, tally: RewardTally):
    """A GRPOTrainer reward function that asks reward_svc, as k1rl's loop does: one request
    per generation batch, group ids = index // n (TRL lays a prompt's n completions out
    consecutively; checked), ``ref.iteration`` = the optimizer step (the length penalty's
    warm-up counts iterations; one k1rl iteration is one step in the demo config)."""
    client = RPCClient(address, timeout_s=900)

    def k1rl_reward_svc(prompts, completions, completion_ids, answer, verifier, trainer_state,
                        **_) -> list[float | None]:
        for g in range(0, len(prompts), n):
            if len(set(prompts[g:g + n])) != 1:
                raise RuntimeError(f"completions {g}..{g + n - 1} are not one prompt's group")
        items = [RewardItem(group_id=j // n, response=text, answer=gold,
                            response_tokens=len(ids), verifier=name)
                 for j, (text, ids, gold, name)
                 in enumerate(zip(completions, completion_ids, answer, verifier, strict=True))]
        ref = RunRef(run_id=run_id, iteration=trainer_state.global_step)
        result = client.call("score", RewardRequest(ref=ref, items=items), RewardResult)
        errors = result.errors or [""] * len(items)
        tally.completions += len(items)
        tally.correct += sum(result.correct)
        tally.errors += sum(bool(e) for e in errors)
        # None: TRL leaves the item out of the reward statistics (NaN-aware), the nearest
        # it has to k1rl leaving an unjudgeable response out of the step
        return [None if e else r for r, e in zip(result.rewards, errors)]

    return k1rl_reward_svc


def budget_callback(budget_s: float, record: dict):
    """Stop at the first optimizer step that ends past ``budget_s`` of training."""
    from transformers import TrainerCallback

    class WallBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["t0"] = record["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            record["step_s"].append(now - record["last"])
            record["last"] = now
            record["train_wall_s"] = now - record["t0"]
            if record["train_wall_s"] >= budget_s:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                record["rewards"].append(logs["reward"])
                print(f"trl: step {state.global_step} reward {logs['reward']:.3f} "
                      f"train {record.get('train_wall_s', 0.0):.0f}/{budget_s:.0f} s", flush=True)

    return WallBudget()


def check_prompt_tokens(tokenizer, prompt: str) -> None:
    """TRL tokenizes prompts with the tokenizer's special tokens; k1rl's engine without.
    For the demo's tokenizer both are the same: say so loudly if a model differs."""
    with_special = tokenizer(text=prompt)["input_ids"]
    plain = tokenizer.encode(prompt, add_special_tokens=False)
    if with_special != plain:
        print(f"trl: WARNING prompt tokens differ from k1rl's ({len(with_special)} vs "
              f"{len(plain)}): the tokenizer adds special tokens", flush=True)


def train(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "answer", "verifier")}
                                 for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_prompt_tokens(tokenizer, rows[0]["prompt"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out = Path(args.out)
    config = GRPOConfig(
        output_dir=str(out / "trainer"), learning_rate=args.lr, lr_scheduler_type="constant",
        beta=0.0, loss_type="dapo", num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, temperature=args.temperature, top_p=args.top_p,
        max_completion_length=args.max_completion_length,
        max_steps=1_000_000,  # the wall budget stops training; the lr is constant anyway
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=args.seed, data_seed=args.seed, disable_tqdm=True,
    )
    tally = RewardTally()
    record: dict = {"step_s": [], "rewards": []}
    trainer = GRPOTrainer(
        model=model, processing_class=tokenizer, args=config, train_dataset=dataset,
        reward_funcs=reward_function(args.reward_address, args.num_generations,
                                     args.run_id, tally),
        callbacks=[budget_callback(args.budget_s, record)],
    )
    trainer.train()
    trainer.save_model(str(out / "model"))  # safetensors, with the tokenizer
    steps = trainer.state.global_step
    return {
        "lr": args.lr,
        "optimizer_steps": steps,
        "completions": tally.completions,
        "completions_correct": tally.correct,
        "reward_errors": tally.errors,
        "train_wall_s": record.get("train_wall_s", 0.0),
        "step_s_median": statistics.median(record["step_s"]) if record["step_s"] else None,
        "step_s_first": record["step_s"][0] if record["step_s"] else None,
        "rewards": record["rewards"],
        "model": str((out / "model").resolve()),
    }


def main() -> None:
    args = parse_args()
    result = train(args)
    Path(args.out, "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"trl: done: {result['optimizer_steps']} steps, {result['completions']} completions "
          f"in {result['train_wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
