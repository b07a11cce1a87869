"""MegatronTrainer: an HF checkpoint trained with megatron-core (TP × PP × DP over
torch.distributed).

One trainer object lives on every rank; the world size is TP × PP × DP. Every public
method that touches the model is collective: all ranks must call it with the same
arguments, in the same order, and every rank gets the same results (except the exports,
which land on global rank 0).

The model is this rank's pipeline stage of a GPTModel wrapped in Megatron DDP; micro-batches
run through megatron's forward-backward schedule (:mod:`trainer_svc.pipeline`). The optimizer
comes from ``get_megatron_optimizer`` (Adam with decoupled weight decay, i.e. AdamW; no
weight decay on norms and biases), sharded over the DP replicas when
``distributed_optimizer``. In float32 everything is fp32; in bfloat16 the parameters and
activations are bf16 and the optimizer is megatron's mixed-precision one (fp32 gradients and
master weights). On CPU the shims of :mod:`trainer_svc.cpu_shims` are applied.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from k1rl.config import TrainerConfig
from trainer_svc import checkpoint, convert, pipeline
from trainer_svc.cpu_shims import apply_cpu_shims, cuda_as_cpu, seed_model_parallel
from trainer_svc.model import (
    TokenBatch,
    build_gpt_model,
    build_token_batch,
    check_examples,
    forward_logprobs,
    pack_rows,
    unwrap,
)
from trainer_svc.parallel import Layout, barrier, init_model_parallel, iter_export_pipeline

# Files next to the weights that make an exported dir loadable by transformers / vLLM.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
LossFn = pipeline.LossFn


def _configured(field: str):
    """The run config's default of a trainer field: declared once, in k1rl.config."""
    return TrainerConfig.model_fields[field].default


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters: ``name`` "adam" (AdamW; ``betas`` = beta1, beta2) or
    "sgd" (plain SGD, no momentum); ``grad_clip`` 0 disables clipping. Defaults are the
    run config's (``trainer.*``)."""

    name: str = _configured("optimizer")
    lr: float = _configured("lr")
    weight_decay: float = _configured("weight_decay")
    betas: tuple[float, float] = (_configured("adam_beta1"), _configured("adam_beta2"))
    eps: float = 1e-8
    grad_clip: float = _configured("grad_clip")

    def __post_init__(self) -> None:
        if self.name not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.name!r}")
        for field in ("lr", "weight_decay", "eps", "grad_clip"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


class SafetensorsDir(Mapping[str, Tensor]):
    """Lazy name -> tensor view of a model dir's safetensors weights.

    A sharded checkpoint's ``model.safetensors.index.json`` says which file holds each
    tensor (as transformers and vLLM read it, so a stale shard left in the dir is
    ignored); without an index every ``*.safetensors`` file is read, and a tensor stored
    in two of them is an error rather than a silent choice.
    """

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self._where: dict[str, Path] = {}
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            self._where = {name: model_dir / file for name, file in weight_map.items()}
            missing = sorted({p.name for p in self._where.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{index.name} names {missing[0]}, which is not in "
                                        f"{model_dir}")
        for path in [] if index.is_file() else sorted(model_dir.glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    if name in self._where:
                        raise ValueError(f"{name} is stored in both {self._where[name].name} "
                                         f"and {path.name} of {model_dir} (a stale shard?), "
                                         "and no model.safetensors.index.json says which")
                    self._where[name] = path
        if not self._where:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")

    def __getitem__(self, name: str) -> Tensor:
        with self._open(self._where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class MegatronTrainer:
    """Trains one policy; see the module docstring for the collective-call contract.

    ``policy_version`` starts at 0 (the loaded weights) and is incremented by one after
    every optimizer step, i.e. once per :meth:`train_step` / :meth:`sft_step` call. It
    is saved and restored by :meth:`save` / :meth:`load`, and may be set by the caller.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        *,
        source_dir: Path,
        device: str,
        seq_length: int,
        micro_batch_tokens: int,
        distributed_optimizer: bool = False,
    ) -> None:
        self.model = model
        self.layout = Layout.current()
        self.distributed_optimizer = distributed_optimizer
        # parameters, activations, exports and the wire; the optimizer's master weights
        # and the gradients are fp32 whatever this is
        self.dtype: torch.dtype = unwrap(model).config.params_dtype
        self.spec: convert.HFModelSpec = unwrap(model).hf_spec
        self.optim = optim
        self.source_dir = source_dir
        self.device = torch.device(device)
        self.seq_length = seq_length
        self.micro_batch_tokens = micro_batch_tokens
        config = unwrap(model).config
        # sequence parallelism splits each row's tokens over the tp ranks
        self.row_multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        self.policy_version = 0
        self.optimizer = self._make_optimizer()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf(
        cls,
        model_dir: str | Path,
        *,
        tp: int = 1,
        pp: int = 1,
        sequence_parallel: bool = False,
        distributed_optimizer: bool = False,
        lr: float = OptimConfig.lr,
        weight_decay: float = OptimConfig.weight_decay,
        betas: tuple[float, float] = OptimConfig.betas,
        grad_clip: float = OptimConfig.grad_clip,
        seed: int = 0,
        device: str = "cpu",
        seq_length: int | None = None,
        micro_batch_tokens: int = 8192,
        attention: str = "sdpa",
        dtype: str = "float32",
    ) -> MegatronTrainer:
        """Build the model for this TP rank and load the HF safetensors weights into it.

        Needs torch.distributed initialised; its world size is ``tp`` × ``pp`` × DP.
        ``sequence_parallel`` is megatron's sequence parallelism over the ``tp`` ranks.
        ``distributed_optimizer`` shards the optimizer state over the DP replicas (megatron's
        distributed optimizer: gradients reduce-scattered, parameters all-gathered). ``seq_length``
        is the packed row length of :meth:`sft_step` (default: the model's
        max_position_embeddings, capped at 4096); ``micro_batch_tokens`` bounds the
        rows x width of one forward pass; ``attention`` is the core attention, "sdpa" or
        "megatron" (see :mod:`trainer_svc.attention`). ``dtype`` "bfloat16" is
        megatron's bf16 mixed precision: bf16 parameters and activations, fp32 gradients
        and fp32 master weights in its mixed-precision optimizer.
        """
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json")
        optim = OptimConfig(lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                            grad_clip=grad_clip)
        layout = init_model_parallel(tp, pp)
        apply_cpu_shims(device)
        seed_model_parallel(seed, device)
        spec = convert.HFModelSpec.from_hf_config(model_dir)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        gpt = build_gpt_model(spec, tp=tp, device=device, attention=attention,
                              dtype=DTYPES[dtype], pp=pp, sequence_parallel=sequence_parallel)
        weights = convert.hf_to_megatron(SafetensorsDir(model_dir), spec, layout.tp_rank, tp,
                                         layout.stage(spec))
        copy_into_params(gpt, weights)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
        )
        model = DistributedDataParallel(gpt.config, ddp_config, gpt)
        if seq_length is None:
            seq_length = min(spec.max_position_embeddings, 4096)
        if seq_length < 1 or micro_batch_tokens < 1:
            raise ValueError(f"seq_length={seq_length} and micro_batch_tokens="
                             f"{micro_batch_tokens} must be positive")
        return cls(
            model,
            optim,
            source_dir=model_dir,
            device=device,
            seq_length=seq_length,
            micro_batch_tokens=micro_batch_tokens,
            distributed_optimizer=distributed_optimizer,
        )

    def _make_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if self.distributed_optimizer and self.optim.name != "adam":
            raise ValueError(f"megatron's distributed optimizer shards Adam only, not "
                             f"{self.optim.name!r} (trainer.distributed_optimizer)")

        config = OptimizerConfig(
            optimizer=self.optim.name,
            sgd_momentum=0.0,
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            adam_beta1=self.optim.betas[0],
            adam_beta2=self.optim.betas[1],
            adam_eps=self.optim.eps,
            clip_grad=self.optim.grad_clip,
            params_dtype=self.dtype,
            bf16=self.dtype == torch.bfloat16,
            use_distributed_optimizer=self.distributed_optimizer,
        )
        with cuda_as_cpu(self.device):
            optimizer = get_megatron_optimizer(config, [self.model])
        # What megatron's LR scheduler would do: per-group weight decay (0 for norms and
        # biases via wd_mult) and LR. There is no scheduler: the LR is constant.
        for group in optimizer.param_groups:
            group["lr"] = self.optim.lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.optim.weight_decay * group.get("wd_mult", 1.0)
        return optimizer

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (k1.5 resets it at the start of every iteration)."""
        self.optimizer = self._make_optimizer()

    def prepare_optimizer(self, policy: str) -> None:
        """The optimizer state an RL iteration starts from: ``reset`` (k1.5: fresh state
        every iteration), ``keep`` (Adam's moments carry over), or ``reset_first_moment``
        (momentum zeroed, the per-parameter scale of the second moment kept)."""
        if policy == "reset":
            self.reset_optimizer()
        elif policy == "reset_first_moment":
            for state in _torch_optimizer_states(self.optimizer):
                if "exp_avg" in state:
                    state["exp_avg"].zero_()
        elif policy != "keep":
            raise ValueError(f"optimizer policy must be reset, keep or reset_first_moment, "
                             f"got {policy!r}")

    def configure_optimizer(self, name: str, lr: float) -> None:
        """Use optimizer ``name`` at ``lr`` from the next step on; a new kind of optimizer
        starts with fresh state, the same kind keeps its state."""
        if name == self.optim.name:
            self.set_lr(lr)
            return
        self.optim = OptimConfig(**{**vars(self.optim), "name": name, "lr": lr})
        self.optimizer = self._make_optimizer()

    def set_lr(self, lr: float) -> None:
        """Change the learning rate from the next optimizer step on."""
        self.optim = OptimConfig(**{**vars(self.optim), "lr": lr})
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    # --------------------------------------------------------------------- forward

    def micro_batches(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pack: bool,
        masks: Sequence[Sequence[bool] | None] | None = None, seq_length: int | None = None,
    ) -> list[TokenBatch]:
        """Examples laid out in rows and grouped into micro-batches of ``micro_batch_tokens``.

        ``pack=False``: one example per row, right-padded (similar lengths grouped);
        ``pack=True``: several examples per row of up to ``seq_length`` tokens (default:
        the trainer's). In every
        batch ``sample_index`` refers to positions in ``prompts``: this is how a loss
        given to :meth:`train_step` finds each token's sample; ``masks`` (per example,
        None = all) leave response tokens out of ``sample_index``.
        """
        check_examples(prompts, responses, self.spec.vocab_size, self.spec.max_position_embeddings)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        if pack:
            rows = pack_rows(lengths, seq_length or self.seq_length)
        else:
            # Similar lengths side by side keep the padding small.
            rows = [[i] for i in sorted(range(len(lengths)), key=lambda i: lengths[i])]
        batches, group, width = [], [], 0
        for row in rows:
            row_len = sum(lengths[i] for i in row)
            if group and max(width, row_len) * (len(group) + 1) > self.micro_batch_tokens:
                batches.append(self._token_batch(prompts, responses, group, masks))
                group, width = [], 0
            group.append(row)
            width = max(width, row_len)
        batches.append(self._token_batch(prompts, responses, group, masks))
        return [b.to(self.device) for b in batches]

    def _token_batch(self, prompts, responses, rows, masks) -> TokenBatch:
        return build_token_batch(prompts, responses, rows, masks, self.row_multiple)

    def forward_logprobs(self, batch: TokenBatch) -> Tensor:
        """Per-position log-probs ``[B, T]`` of ``batch.labels``, with grad (mask them).
        Only without pipeline parallelism (a stage holds part of the model)."""
        return forward_logprobs(self.model, batch)

    @torch.no_grad()
    def token_logprobs(self, micro: Sequence[TokenBatch]) -> list[Tensor]:
        """Each micro-batch's loss-token log-probs (``[sample_index >= 0]``, row-major), on
        every rank; the micro-batches are shared among the DP replicas."""
        self.model.eval()
        return [values for _, values in pipeline.run(self.model, micro, self.layout)]

    def logprobs(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """Log-prob of each response token given the prompt and the preceding response."""
        result: list[list[float]] = [[] for _ in prompt_ids]
        micro = self.micro_batches(prompt_ids, response_ids, pack=False)
        for batch, values in zip(micro, self.token_logprobs(micro), strict=True):
            index = batch.sample_index[batch.sample_index >= 0].cpu()
            for i in index.unique().tolist():
                result[i] = values[index == i].tolist()
        return result

    # -------------------------------------------------------------------- training

    def train_step(self, loss_fn: LossFn, micro_batches: Sequence[TokenBatch],
                   on_record: Callable[[int, object], None] | None = None) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (gradients accumulate across them).

        ``loss_fn(logprobs, batch)`` gets the differentiable ``[B, T]`` log-probs of one
        micro-batch and returns that micro-batch's share of the loss, or ``(share,
        record)``. It runs where the loss is (the last pipeline stage of the DP replica the
        micro-batch went to), so it must not rely on side effects: ``on_record(k, record)``
        is called on every rank, in order, with what it returned for micro-batch ``k``. The
        reported ``loss`` is the sum of the shares; ``grad_norm`` is the norm before
        clipping. Increments ``policy_version``.
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = pipeline.run(self.model, micro_batches, self.layout, loss_fn)
        total = sum(loss for loss, _ in results)
        for k, (_, record) in enumerate(results):
            if on_record is not None:
                on_record(k, record)
        from megatron.core.distributed import finalize_model_grads

        # megatron's own reduction: DP replicas (summed: each share is already normalised),
        # the tied embedding's two pipeline copies, and the TP sums of weights every TP rank
        # holds whole but sees only its heads' share of (Qwen3's q/k norms)
        finalize_model_grads([self.model])
        with cuda_as_cpu(self.device):
            ok, grad_norm, _ = self.optimizer.step()
            if ok and self.optim.grad_clip <= 0:
                # megatron only measures the norm when clipping; the grads are unchanged
                grad_norm = self.optimizer.get_grad_norm()
        if not ok:
            raise RuntimeError("optimizer step was skipped (non-finite gradients)")
        self.policy_version += 1
        return {
            "loss": float(total),
            "grad_norm": float(grad_norm or 0.0),
            "lr": self.optim.lr,
            "policy_version": self.policy_version,
        }

    def sft_step(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                 masks: Sequence[Sequence[bool] | None] | None = None,
                 seq_length: int | None = None) -> dict[str, float]:
        """One optimizer step of SFT: mean NLL over the learned tokens of packed examples.

        Examples are packed several per row (up to ``seq_length`` tokens, default the
        trainer's) with a block-diagonal causal mask and per-document positions; prompt
        tokens, and response tokens whose ``masks`` entry is False, carry no loss.
        """
        if not examples:
            raise ValueError("sft_step needs at least one example")
        prompts = [list(p) for p, _ in examples]
        responses = [list(r) for _, r in examples]
        batches = self.micro_batches(prompts, responses, pack=True, masks=masks,
                                     seq_length=seq_length)
        n_tokens = sum(b.num_response_tokens for b in batches)

        def mean_nll(logprobs: Tensor, batch: TokenBatch) -> Tensor:
            response = batch.loss_mask.bool()
            return -torch.where(response, logprobs, 0.0).sum() / n_tokens

        stats = self.train_step(mean_nll, batches)
        stats.update(tokens=float(n_tokens), rows=float(sum(len(b.input_ids) for b in batches)))
        return stats

    # ----------------------------------------------------------------- weight export

    def iter_hf_tensors(
        self, out: MutableMapping[str, Tensor] | None = None, dst: int | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """Full HF-named tensors (of :attr:`dtype`) in model order (collective: drain it on
        every rank).

        ``dst=None``: every TP rank gets the tensors; ``dst=r``: only TP rank ``r`` does
        (cheaper: a gather instead of an all-gather) and the others yield nothing.
        With pipeline stages or DP replicas ``dst`` must be 0 and the tensors land on
        global rank 0 (each stage sends its layers there, see
        :func:`~trainer_svc.parallel.iter_export_pipeline`). With TP=1 most tensors are
        views of the live weights (no copy): consume them before the next step. ``out`` maps names to destination tensors (e.g. slices of
        a registered transfer buffer) that are filled in place with a single copy.
        ``lm_head.weight`` is always included, last (the embedding when tied).
        """
        from megatron.core import parallel_state

        named = unwrap(self.model).named_parameters()
        if self.layout.pp == 1 and (self.layout.dp == 1 or dst is None):
            group = parallel_state.get_tensor_model_parallel_group()
            return convert.iter_export_hf(named, self.spec, group, out, dst)
        if dst != 0:
            raise ValueError(f"with {self.layout.describe()} the export goes to rank 0 "
                             f"(dst=0), not dst={dst}")
        return iter_export_pipeline(named, self.spec, self.layout, self.dtype, out)

    @property
    def dtype_name(self) -> str:
        """The parameters' dtype as HF and the wire name it ("float32", "bfloat16")."""
        return str(self.dtype).removeprefix("torch.")

    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor :meth:`iter_hf_tensors` yields (all of
        :attr:`dtype`), in order."""
        return convert.hf_shapes(self.spec)

    def compare_with_source(self, max_names: int = 5) -> dict | None:
        """Export the weights (HF -> Megatron -> HF) and compare every tensor with the
        checkpoint they were loaded from, bit for bit in the narrower of the two dtypes
        (an fp32 checkpoint trained in bf16 is compared in bf16, and the other way round).

        Collective; the result on global rank 0, None elsewhere. Only meaningful before the
        first step changes the weights, so it refuses afterwards.
        """
        if self.policy_version != 0:
            raise RuntimeError(f"the trainer holds policy version {self.policy_version}: the "
                               "round trip compares the weights as loaded (version 0)")
        source = SafetensorsDir(self.source_dir) if self.layout.is_root else None
        mismatched, worst, tensors, parameters = [], 0.0, 0, 0
        for name, tensor in self.iter_hf_tensors(dst=0):
            tied_head = self.spec.tied_embeddings and name == "lm_head.weight"
            if source is None or (tied_head and name not in source):
                continue
            stored = source[name]
            diff = _difference(tensor, stored)
            if diff:
                mismatched.append(name)
                worst = max(worst, diff)
            tensors += 1
            parameters += 0 if tied_head else stored.numel()
        if source is None:
            return None
        # old checkpoints store RoPE's inverse frequencies, which are computed, not loaded
        missing = sorted(n for n in set(source) - set(convert.hf_names(self.spec))
                         if not n.endswith("rotary_emb.inv_freq"))
        return {"model_type": self.spec.model_type, "parameters": parameters,
                "tensors": tensors, "exact": not mismatched and not missing,
                "mismatched": (mismatched + [f"{n} (not loaded)" for n in missing])[:max_names],
                "max_abs_diff": worst}

    def export_hf(self, out_dir: str | Path) -> Path | None:
        """Write an HF model dir (config, safetensors, tokenizer files) on global rank 0.

        Collective. Returns the dir on rank 0 and None elsewhere. The tied ``lm_head``
        is left out of the file, as ``save_pretrained`` does.
        """
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tensors = {}
        for name, tensor in self.iter_hf_tensors(dst=0):
            if not (self.spec.tied_embeddings and name == "lm_head.weight"):
                # clone: views share storage, which safetensors refuses to write
                tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        if not self.layout.is_root:
            barrier()
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((self.source_dir / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = self.dtype_name
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (self.source_dir / name).is_file():
                shutil.copyfile(self.source_dir / name, out_dir / name)
        barrier()  # the dir is complete when any rank returns
        return out_dir

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt_dir: str | Path) -> Path:
        """Save weights, optimizer state and ``policy_version``, one file per rank.

        Reloading needs the same TP × PP × DP layout. To change it, go through
        :meth:`export_hf` and :meth:`from_hf`, which drops the optimizer state (k1.5
        resets it every iteration).
        """
        return checkpoint.save(self, Path(ckpt_dir))

    def load(self, ckpt_dir: str | Path) -> None:
        """Restore a :meth:`save` checkpoint written with the same model and layout."""
        checkpoint.load(self, Path(ckpt_dir))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _difference(ours: Tensor, stored: Tensor) -> float:
    """0.0 when the tensors are bit-equal in the narrower of their dtypes, else their
    largest absolute difference (inf when the shapes differ)."""
    if ours.shape != stored.shape:
        return float("inf")
    narrow = min(stored.dtype, ours.dtype, key=lambda d: d.itemsize)
    ours, stored = ours.detach().to("cpu", narrow), stored.to(narrow)
    if torch.equal(ours, stored):
        return 0.0
    return (ours.double() - stored.double()).abs().max().item()


@torch.no_grad()
def copy_into_params(gpt: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy a Megatron parameter dict into the model in place; names must match exactly."""
    params = dict(gpt.named_parameters())
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise KeyError(f"parameter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, param in params.items():
        if param.shape != state[name].shape:
            raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
        param.copy_(state[name])


def torch_optimizers(optimizer) -> list:
    """The megatron optimizers inside a (possibly chained) megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_optimizer_states(optimizer) -> Iterator[dict]:
    """Per-parameter state dicts of the torch optimizers inside a megatron optimizer."""
    for inner in torch_optimizers(optimizer):
        yield from inner.optimizer.state.values()
