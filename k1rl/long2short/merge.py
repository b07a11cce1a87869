"""Model merging (k1.5 §2.4): the weighted average of checkpoints of one architecture, e.g.
a long-CoT and a short-CoT model fine-tuned from the same base.

Tensors are read one at a time from the safetensors shards, averaged in float64 and
written in the first model's dtype and shard layout (memory: one output shard); the config,
tokenizer and generation config are the first model's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

INDEX = "model.safetensors.index.json"


def tensor_files(model: Path) -> dict[str, Path]:
    """Where each tensor of an HF checkpoint is (one file or an indexed set of shards)."""
    from safetensors import safe_open

    model = Path(model)
    if (model / INDEX).is_file():
        weight_map = json.loads((model / INDEX).read_text())["weight_map"]
        return {name: model / shard for name, shard in weight_map.items()}
    single = model / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model}: no model.safetensors or {INDEX}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Merge weights for ``n`` models: given ones, which must be positive and sum to 1;
    else equal."""
    if n < 2:
        raise ValueError("merging needs at least two models")
    if not weights:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} models")
    if any(not w > 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must be positive and sum to 1, not {list(weights)}")
    return list(weights)


def merge_checkpoints(models: Sequence[Path], weights: Sequence[float] | None,
                      out: Path) -> dict:
    """Write the weighted average of ``models`` to ``out`` (an HF checkpoint); returns what
    was merged."""
    from safetensors.torch import save_file

    weights = check_weights(weights, len(models))
    maps = [tensor_files(m) for m in models]
    names = list(maps[0])
    for m, found in zip(models[1:], maps[1:]):
        if set(found) != set(names):
            extra = sorted(set(found) ^ set(names))[:3]
            raise ValueError(f"{m} and {models[0]} hold different tensors (e.g. {extra})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[Path, list[str]] = {}
    for name in names:  # the first model's shard layout, one shard in memory at a time
        shards.setdefault(maps[0][name], []).append(name)
    for shard, members in shards.items():
        merged = {name: _average(name, models, maps, weights) for name in members}
        save_file(merged, str(out / shard.name), metadata={"format": "pt"})
    for item in Path(models[0]).iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin"):
            shutil.copy2(item, out / item.name)  # config, tokenizer, the shard index
    return {"models": [str(m) for m in models], "weights": weights, "tensors": len(names),
            "out": str(out)}


def _average(name: str, models: Sequence[Path], maps: list[dict[str, Path]],
             weights: list[float]):
    from safetensors import safe_open

    total, first = None, None
    for w, found, model in zip(weights, maps, models):
        with safe_open(str(found[name]), framework="pt") as f:
            t = f.get_tensor(name)
        if first is None:
            first = t
        elif t.shape != first.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} in {model}, "
                             f"{tuple(first.shape)} in {models[0]}")
        total = t.double() * w if total is None else total + t.double() * w
    return total.to(first.dtype).contiguous()
