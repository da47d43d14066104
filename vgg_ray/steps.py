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

from vgg_ray.boxes import IOU_CORRECT
from vgg_ray.parallel import autocast


class Classification:
    """Sect. 3.1's objective: multinomial logistic regression (softmax cross-entropy) on the
    labels; a batch's counts are its top-1 and top-5 correct rows."""

    counts = ("top1", "top5")
    score = "val_top5_error"  # what the best checkpoints are kept by: the paper's measure
    tie_break = "val_top1_error"  # ... ties broken by it
    plateau = "val_top1_error"  # the plateau schedule's "validation set accuracy" (Sect. 3.1)

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="sum")

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return topk_correct(outputs, targets)

    def errors(self, counts: Sequence[float], rows: float) -> dict[str, float]:
        """{"top1_error", "top5_error"} of summed counts over `rows` images."""
        return {f"{name}_error": 1 - count / max(rows, 1.0)
                for name, count in zip(self.counts, counts, strict=True)}  # fmt: skip


class BoxRegression:
    """Appendix A's objective: the Euclidean loss between the predicted and the ground-truth box
    (centre x, centre y, width, height, over the crop side: `vgg_ray.boxes.to_target`), half
    the squared distance as Caffe's EuclideanLoss. `per_class` (PCR): the net predicts a box for
    each class (4 x classes outputs, class-major) and only the ground-truth class's is trained
    and scored; else (SCR) one box for all. Targets are (N, 5): label, then the box; a row whose
    box is NaN (no object of its class shows in the crop) adds nothing. A batch's counts: rows
    whose box has IoU > 0.5 with the target (the ILSVRC criterion), and rows with a target."""

    counts = ("box_hits", "boxes")
    score = "val_loc_error"
    tie_break = "val_loss"
    plateau = "val_loc_error"

    def __init__(self, *, per_class: bool):
        self.per_class = per_class

    def boxes(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, 4) float32: each row's predicted box (its class's, with PCR)."""
        outputs = outputs.float()
        if not self.per_class:
            return outputs
        return outputs.view(len(outputs), -1, 4)[torch.arange(len(outputs)), labels]

    def _split(self, outputs: torch.Tensor, targets: torch.Tensor):
        """(predicted boxes, target boxes with 0 for NaN, which rows have a target): masks, not
        boolean indexing, so that no step waits on the device for a row count."""
        labels, boxes = targets[:, 0].long(), targets[:, 1:].float()
        valid = torch.isfinite(boxes).all(dim=1)
        return self.boxes(outputs, labels), torch.where(valid[:, None], boxes, 0.0), valid

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted, truth, valid = self._split(outputs, targets)
        return 0.5 * ((predicted - truth).square().sum(dim=1) * valid).sum()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted, truth, valid = self._split(outputs, targets)
        hits = (centre_iou(predicted, truth) > IOU_CORRECT) & valid
        return torch.stack([hits.sum(), valid.sum()])

    def errors(self, counts: Sequence[float], rows: float) -> dict[str, float]:
        """{"loc_error"}: the share of rows with a target whose box misses it (IoU <= 0.5)."""
        hits, boxes = counts
        return {"loc_error": 1 - hits / max(boxes, 1.0)}


def objective(regression: str = "") -> Classification | BoxRegression:
    """The training objective of a run: classification, or box regression ("scr"/"pcr")."""
    return BoxRegression(per_class=regression == "pcr") if regression else Classification()


def centre_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of boxes given as (centre x, centre y, width, height), on the device."""

    def corners(t):
        half = t[:, 2:].clamp(min=0) / 2
        return t[:, :2] - half, t[:, :2] + half

    (a_low, a_high), (b_low, b_high) = corners(a), corners(b)
    inter = (torch.minimum(a_high, b_high) - torch.maximum(a_low, b_low)).clamp(min=0).prod(1)
    union = (a_high - a_low).prod(1) + (b_high - b_low).prod(1) - inter
    return inter / union.clamp(min=1e-12)


class StepResult(NamedTuple):
    """What one optimizer step did."""

    loss: float
    """Mean loss of this worker's images."""
    correct: torch.Tensor
    """The objective's two counts of this worker's images (top-1 and top-5 correct), on the
    device."""
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
    objective: Classification | BoxRegression | None = None,
) -> StepResult:
    """Forward and backward over the micro-batches of one step (gradient accumulation), then one
    optimizer update, unless the gradient is not finite: such a step is skipped, as AMP's
    GradScaler skips one, so one bad batch cannot turn weeks of weights into NaN.
    `clip_grad_norm` > 0 scales the gradient down to that global L2 norm first. `global_rows`:
    the step's rows over all workers, where the workers' shares differ in size (an elastic
    worker count): each worker's loss sum is scaled by world size / global rows, so that DDP's
    average of the workers' gradients is the gradient of the mean loss over the whole step.
    `objective`: the loss and counts (default: classification)."""
    objective = objective or Classification()
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
                outputs = model(images)
                loss = objective.loss_sum(outputs, labels)
            (loss * (world / global_rows) if global_rows else loss / total).backward()
        loss_sum += loss.detach()
        correct += objective.correct(outputs.detach(), labels)
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
    objective: Classification | BoxRegression | None = None,
) -> torch.Tensor:
    """[rows, the objective's two counts (top-1, top-5 correct), loss sum] over `batches` of
    (images, labels). The caller all-reduces these across workers: errors come from summed
    counts, so workers with unequal shares are weighted right and nothing is padded."""
    objective = objective or Classification()
    totals = None
    for images, labels in batches:
        with autocast(images.device, bf16):
            outputs = model(images)
        loss = objective.loss_sum(outputs.float(), labels)
        counts = torch.cat(
            [
                torch.tensor([len(labels)], device=images.device, dtype=torch.float64),
                objective.correct(outputs, labels).double(),
                loss.double()[None],
            ]
        )
        totals = counts if totals is None else totals + counts
    return totals if totals is not None else torch.zeros(4, dtype=torch.float64)
