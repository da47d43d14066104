"""One optimizer step, and the counts evaluation reduces. Plain PyTorch: no ray, no mlflow.

The training loop (`vgg_ray.train`) and the benchmarks both call these, so what is measured is
what trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from vgg_ray.parallel import autocast


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    bf16: bool = False,
) -> tuple[float, torch.Tensor]:
    """Forward and backward over the micro-batches of one step (gradient accumulation), then one
    optimizer update. Returns the mean loss (a float: the only device sync of the step) and the
    top-1/top-5 correct counts of the step as a tensor on the device."""
    device = micro_batches[0][0].device
    total = sum(len(labels) for _, labels in micro_batches)
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
            (loss / total).backward()
        loss_sum += loss.detach()
        correct += topk_correct(logits.detach(), labels)
    optimizer.step()
    return loss_sum.item() / total, correct


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
