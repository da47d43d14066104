"""Everything that wraps a model for training, in one place and one fixed order.

Imports torch only (no ray, no mlflow), so the GPU benchmarks run the very code training runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn


def parallelize(
    model: nn.Module,
    device: torch.device,
    *,
    channels_last: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Prepare `model` for training on `device`, in this order:

    0. on CUDA, cuDNN's autotuner on: training crops have one fixed size, so each conv's fastest
       algorithm is found once, in the first steps (with varying input sizes, as in dense
       evaluation, it would re-tune for every new shape; evaluation leaves it off);
    1. move to the device;
    2. channels_last memory format (before DDP, which registers the parameters' layout);
    3. DistributedDataParallel when a process group is up (Ray Train starts one per run);
    4. torch.compile last, so it traces the DDP-wrapped module and can overlap its all-reduce
       with the backward pass (the order PyTorch's DDP + compile docs recommend).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # The FC1 weight (102M floats at full width) dominates; bucket size stays at the default.
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside compile and DDP wrappers: what checkpoints store."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on the device, or nothing. bf16 needs no loss scaling, unlike fp16."""
    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (a no-op without a process group); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor
