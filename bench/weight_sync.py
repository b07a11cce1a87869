"""Weight sync: full trainer->vLLM update speed against the raw Mooncake wire, one run.

Starts trainer_svc (megatron-core) and rollout_svc (vLLM, dummy weights) on a model of
at least 50 MB and measures, over several updates:

- full: trainer exports HF tensors from Megatron and packs them into its registered
  region, the vLLM worker pulls every bucket over Mooncake and reloads in place
  (the time the master waits for push_weights + update_weights);
- raw: a Mooncake receiver in this process pulling the very same published region,
  bucket by bucket, with no conversion, no checksum and no load.

With a pipelined publish (``weights.pipelined``, the default) push_weights returns
the manifest before the trainer has packed, so ``export_pack_s`` is then only the
hand-off; the export is inside ``full_update_s``, which still ends only when vLLM has
reloaded every bucket. ``--no-pipeline`` measures the sequential path.

The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k1rl.config import RunConfig  # noqa: E402
from k1rl.launch import LocalStack  # noqa: E402
from k1rl.protocol import (  # noqa: E402
    PushWeightsRequest,
    SFTBatch,
    SFTExample,
    TrainStats,
    WeightManifest,
    WeightUpdateResult,
)

# ~70 MB of fp32 weights: above the 50 MB the target is stated for.
BENCH_MODEL = dict(
    hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=1408
)


def _raw_pull(manifest: WeightManifest, cfg: RunConfig) -> float:
    from checkpoint_engine import get_receiver
    from checkpoint_engine.options import transport_options

    opts = transport_options(cfg.weights, role="receiver")
    opts["require_checksum"] = False
    receiver = get_receiver(manifest.transport, **opts)
    try:
        # the same bytes with nothing around them: no digests, no ready stamps to poll
        unchecked = manifest.model_copy(
            update={
                "checksum": None,
                "ready_offset": None,
                "bucket_checksum": None,
                "buckets": [b.model_copy(update={"checksum": None}) for b in manifest.buckets],
            }
        )
        for _ in receiver.receive(unchecked):  # warm-up: allocate and register once
            pass
        start = time.perf_counter()
        for _ in receiver.receive(unchecked):
            pass
        return time.perf_counter() - start
    finally:
        receiver.close()


def _bump_version(stack: LocalStack) -> None:
    """One tiny SFT step: a new policy version, so the engine accepts the next push."""
    tok = stack.tokenizer
    ex = SFTExample(prompt_token_ids=tok.encode("Q: 1 + 1\nA:"), response_token_ids=tok.encode(" 2"))
    stack.trainer.call("sft_step", SFTBatch(examples=[ex]), TrainStats)


def _full_update(stack: LocalStack) -> tuple[float, float, WeightManifest, WeightUpdateResult]:
    start = time.perf_counter()
    manifest = stack.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    published = time.perf_counter()
    result = stack.rollout.call("update_weights", manifest, WeightUpdateResult)
    end = time.perf_counter()
    return end - start, published - start, manifest, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--verify", choices=["checksum", "none"], default="checksum")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--no-pipeline", action="store_true", help="pack before handing out")
    args = ap.parse_args()

    cfg = RunConfig()
    cfg.weights.pipelined = not args.no_pipeline
    cfg.weights.bucket_mb = args.bucket_mb
    cfg.weights.verify = args.verify
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="k1rl-bench-"))
    with LocalStack.start(work, cfg=cfg, model_kwargs=BENCH_MODEL) as stack:
        _full_update(stack)  # warm-up: region allocation, registration, first connection
        fulls, exports, raws, loads = [], [], [], []
        for _ in range(args.repeats):
            _bump_version(stack)
            full_s, export_s, manifest, result = _full_update(stack)
            fulls.append(full_s)
            exports.append(export_s)
            loads.append(result.load_s)
            raws.append(_raw_pull(manifest, stack.cfg))
        nbytes = manifest.total_bytes

    full = statistics.median(fulls)
    raw = statistics.median(raws)
    report = {
        "bytes": nbytes,
        "buckets": len(manifest.buckets),
        "tensors": len(manifest.tensors),
        "verify": args.verify,
        "pipelined": cfg.weights.pipelined,
        "repeats": args.repeats,
        "raw_transfer_s": round(raw, 4),
        "full_update_s": round(full, 4),
        "export_pack_s": round(statistics.median(exports), 4),
        "reload_s": round(statistics.median(loads), 4),
        "raw_transfer_gbps": round(nbytes / raw / 1e9, 3),
        "full_update_gbps": round(nbytes / full / 1e9, 3),
        "full_over_raw": round(raw / full, 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
