"""Everything megatron-core needs to run on a CPU-only host, in one place.

megatron-core 0.16.1 assumes CUDA in a handful of spots that are not behind a
device switch. Each shim below names the spot it covers; all of them are applied
only when the trainer's device is ``cpu`` and are no-ops on a CUDA host.

- ``torch.cuda.current_device`` is used as the default device for buffers (DDP grad
  buffers, rotary ``inv_freq``): it must return the CPU device.
- ``torch.cuda.synchronize`` is called around checkpointing and timers: no-op.
- The CUDA RNG tracker: ``model_parallel_cuda_manual_seed(..., inference_rng_tracker=True)``
  (see :func:`seed_model_parallel`) uses a tracker that never touches CUDA generators.
- The optimizer (``MegatronOptimizer``, clip_grads) allocates scalars with
  ``device='cuda'`` and asserts ``grad.type() == 'torch.cuda.FloatTensor'``: run it
  under :class:`CudaToCpuMode` (see :func:`cuda_as_cpu`).
- Attention builds its default causal mask on CUDA: callers always pass an explicit
  mask (trainer_svc.model does).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_applied = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_sync(device: object = None) -> None:
    del device


def apply_cpu_shims(device: str | torch.device) -> None:
    """Patch the global CUDA entry points megatron-core calls; idempotent, CPU only."""
    global _applied
    if torch.device(device).type != "cpu":
        return
    with _lock:
        if _applied:
            return
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _no_sync
        _applied = True


def seed_model_parallel(seed: int, device: str | torch.device) -> None:
    """Seed torch and megatron's RNG tracker in a way that works without CUDA generators."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    on_cpu = torch.device(device).type == "cpu"
    # force_reset: a second trainer in the same process must not trip over the
    # tracker of the first ("state already exists").
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=on_cpu, force_reset_rng=True
    )


def _is_cuda_device(value: object) -> bool:
    if isinstance(value, str):
        return value.startswith("cuda")
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return False


# Tensor.type() strings megatron's optimizer asserts on, mapped to their CUDA names.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Redirects tensor creation on 'cuda' to the CPU and reports CPU tensors as CUDA types.

    Only the three patterns megatron's optimizer path uses are rewritten: a ``device``
    keyword naming cuda, ``Tensor.cuda()``, and the no-argument ``Tensor.type()``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_as_cpu(device: str | torch.device) -> Iterator[None]:
    """Run a block under :class:`CudaToCpuMode` when the device is the CPU."""
    if torch.device(device).type != "cpu":
        yield
        return
    with CudaToCpuMode():
        yield
