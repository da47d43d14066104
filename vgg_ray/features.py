"""VGG as a feature extractor (Appendix B): the paper's image descriptor of decoded images.

This module imports torch only (through `vgg_ray.evaluate`): it runs alone on a GPU machine. The
Ray Data job that runs it over an image set and writes Parquet is `vgg_ray.features_job`.

The descriptor of one image, for each net (D, E, ...; fixed, not fine-tuned):
- the image rescaled isotropically to smaller side Q, for each Q of the scale set;
- the net applied densely (`evaluate.DenseNet`) without FC3: a map of FC2 activations (after
  FC2's ReLU), 4096-d at each position, globally averaged; averaged with the flipped image's;
- the per-Q vectors averaged (`mean`: VOC, Q in {256, 384, 512, 640, 768}) or stacked
  (`stack`, concatenated: Caltech, Q in {256, 384, 512}), then L2-normalised;
- several nets (D & E, Table 11's best): their L2-normalised descriptors stacked and the result
  L2-normalised again, so each net weighs the same.

Batching never changes a descriptor: the dense net runs the images of a batch grouped by
rescaled size, each group as it is (nothing padded), as dense evaluation does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vgg_ray.errors import ConfigError
from vgg_ray.evaluate import STRIDE, NetInfo, NetScorer, rescale
from vgg_ray.models import VGG

AGGREGATES = ("mean", "stack")
# Caltech's Q set (Appendix B), for 224 crops; the default for nets trained on other crops is
# the same set scaled with the crop (like the 32 of evaluation's multi-scale test).
PAPER_SCALES = (256, 384, 512)
VOC_SCALES = (256, 384, 512, 640, 768)


def feature_scales(info: NetInfo, scales: Sequence[int] = ()) -> tuple[int, ...]:
    """The scale set Q for one net: `scales` as given, else the paper's {256, 384, 512} scaled
    to the net's crop (the same for a 224 net; {37, 55, 73} for a 32 px demo net)."""
    if scales:
        return tuple(int(q) for q in scales)
    return tuple(max(info.crop, round(q * info.crop / 224)) for q in PAPER_SCALES)


def check_descriptor(info: NetInfo, scales: Sequence[int], aggregate: str) -> None:
    """ConfigError where this net cannot make the descriptor."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    if info.crop % STRIDE:
        raise ConfigError(f"net {info.name} was trained on {info.crop} px crops: the dense "
                          f"descriptor needs a crop that is a multiple of {STRIDE}")  # fmt: skip
    if min(scales) < info.crop:
        raise ConfigError(f"scale Q = {min(scales)} is below net {info.name}'s crop size "
                          f"{info.crop}: every Q must be >= {info.crop}")  # fmt: skip


def descriptor_dim(models: Sequence[VGG], scales: Sequence[Sequence[int]], aggregate: str) -> int:
    """The descriptor's length: FC2's width per net, times its scale count when stacked."""
    return sum(
        model.classifier[3].out_features * (len(s) if aggregate == "stack" else 1)
        for model, s in zip(models, scales, strict=True)
    )


class Describer:
    """The paper's descriptor for one net or several (stacked).

    ```
    describe = Describer(models, infos, scales=(256, 384, 512), aggregate="stack")
    vectors = describe(images)      # (N, describe.dim) float32, rows of unit L2 norm
    ```
    `images` are uint8 (3, h, w) tensors of any size (CPU, or already on `device`); each is
    rescaled once per Q and shared by every net that needs that Q.
    """

    def __init__(
        self,
        models: Sequence[VGG],
        infos: Sequence[NetInfo],
        *,
        scales: Sequence[int] = (),
        aggregate: str = "stack",
        device: torch.device | str = "cpu",
        max_crops: int = 64,
        bf16: bool = False,
        channels_last: bool = False,
    ):
        if not models or len(models) != len(infos):
            raise ValueError(f"{len(models)} models but {len(infos)} infos")
        self.scales = [feature_scales(info, scales) for info in infos]
        for info, net_scales in zip(infos, self.scales, strict=True):
            check_descriptor(info, net_scales, aggregate)
        self.aggregate, self.device = aggregate, torch.device(device)
        self.scorers = [
            NetScorer(m, i, self.device, max_crops=max_crops, bf16=bf16,
                      channels_last=channels_last)
            for m, i in zip(models, infos, strict=True)
        ]  # fmt: skip
        self.dim = descriptor_dim(models, self.scales, aggregate)

    def __call__(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        images = [image.to(self.device) for image in images]
        if not images:
            return np.zeros((0, self.dim), np.float32)
        rescaled = {q: rescale(images, q) for q in sorted({q for s in self.scales for q in s})}
        per_net = []
        for scorer, scales in zip(self.scorers, self.scales, strict=True):
            parts = [scorer.fc2_descriptor(rescaled[q]) for q in scales]
            joined = (
                torch.stack(parts).mean(dim=0)
                if self.aggregate == "mean"
                else torch.cat(parts, dim=1)
            )
            per_net.append(F.normalize(joined, dim=1))
        out = per_net[0] if len(per_net) == 1 else F.normalize(torch.cat(per_net, dim=1), dim=1)
        return out.float().cpu().numpy()
