"""One optimizer step, and the counts evaluation reduces. Plain PyTorch: no ray, no mlflow.

The training loop (`vgg_ray.train`) and the benchmarks both call these, so what is measured is
what trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vgg_ray.parallel import autocast


class StepResult(NamedTuple):
    """What one optimizer step did."""

    loss: float
    """Mean loss of this worker's images."""
    correct: torch.Tensor
    """Top-1 and top-5 correct counts of this worker's images, on the device."""
    grad_norm: float
    """Global L2 norm of the gradient before clipping: the same on every worker (DDP
    all-reduced the gradient first). Not finite when the step was skipped."""

    @property
    def applied(self) -> bool:
        """Whether the optimizer updated the weights (the gradient was finite)."""
        return math.isfinite(self.grad_norm)


def sgd(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float, fused: bool = False
) -> torch.optim.SGD:
    """The paper's optimizer (mini-batch SGD with momentum and L2 weight decay), as training
    and the benchmarks build it. `fused`: one CUDA kernel for the whole update instead of
    PyTorch's default multi-tensor (foreach) kernels; benchmarks/train_throughput.py times both."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                           weight_decay=weight_decay, fused=fused)  # fmt: skip


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    bf16: bool = False,
    clip_grad_norm: float = 0.0,
    global_rows: int = 0,
) -> StepResult:
    """Forward and backward over the micro-batches of one step (gradient accumulation), then one
    optimizer update, unless the gradient is not finite: such a step is skipped, as AMP's
    GradScaler skips one, so one bad batch cannot turn weeks of weights into NaN.
    `clip_grad_norm` > 0 scales the gradient down to that global L2 norm first. `global_rows`:
    the step's rows over all workers, where the workers' shares differ in size (an elastic
    worker count): each worker's loss sum is scaled by world size / global rows, so that DDP's
    average of the workers' gradients is the gradient of the mean loss over the whole step."""
    device = micro_batches[0][0].device
    total = sum(len(labels) for _, labels in micro_batches)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    optimizer.zero_grad(set_to_none=True)
    for index, (images, labels) in enumerate(micro_batches):
        # Under DDP, all-reduce only on the last micro-batch: the others just accumulate.
        is_last = index == len(micro_batches) - 1
        sync = nullcontext() if is_last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, bf16):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, reduction="sum")
            (loss * (world / global_rows) if global_rows else loss / total).backward()
        loss_sum += loss.detach()
        correct += topk_correct(logits.detach(), labels)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # The step's one device sync, before the update: whether to apply it. It is decided on the
    # all-reduced gradient, never on the local loss, so every worker skips the same steps and
    # the replicas' weights stay equal.
    mean_loss, norm = (torch.stack([loss_sum / total, grad_norm.float()])).tolist()
    if math.isfinite(norm):
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, grad_norm)
        optimizer.step()
    return StepResult(mean_loss, correct, norm)


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> torch.Tensor:
    """How many rows have their label among the top-k scores, for each k (k capped at the
    number of classes, as with fewer than 5 classes top-5 is always right)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    batches,
    *,
    bf16: bool = False,
) -> torch.Tensor:
    """[rows, top-1 correct, top-5 correct, loss sum] over `batches` of (images, labels).
    The caller all-reduces these across workers: errors come from summed counts, so workers
    with unequal shares are weighted right and nothing is padded."""
    totals = None
    for images, labels in batches:
        with autocast(images.device, bf16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        counts = torch.cat(
            [
                torch.tensor([len(labels)], device=images.device, dtype=torch.float64),
                topk_correct(logits, labels).double(),
                loss.double()[None],
            ]
        )
        totals = counts if totals is None else totals + counts
    return totals if totals is not None else torch.zeros(4, dtype=torch.float64)
