"""The paper's test protocol (Sect. 3.2, Tables 3-6): single crop, dense, multi-crop and dense +
multi-crop evaluation over one or several test scales Q, for one net or an ensemble.

This module imports torch, torchvision and numpy only: it runs alone on a GPU benchmark machine.
The Ray Data driver that runs it over the val shards and logs to MLflow is `vgg_ray.evaluate_job`.

Geometry, relative to the crop size c a net was trained on (224 in the paper, 32 for demo nets):
- every image is rescaled isotropically so its smaller side is Q (Q >= c), once per scale;
- single: the centre c x c crop (what training's validation measures);
- multicrop: a 5x5 regular grid of c x c crops, mirror-symmetric, each also flipped: 50 per
  scale; their soft-max averaged;
- dense: the net in its fully convolutional form on the whole rescaled image; the class score
  map is averaged over space, then soft-max, averaged with that of the flipped image. FC1 reads
  a 7x7 map after `avgpool`; on a c x c crop the conv stack gives a c/32 map, which
  `AdaptiveAvgPool2d` maps linearly to 7x7. FC1 o avgpool is therefore one conv with a c/32
  kernel (FC1's 7x7 kernel composed with the pooling matrix), exact for any c that is a multiple
  of 32; at c = 224 the pooling is the identity and this is the paper's 7x7 conv
  (`DenseNet`). FC2 and FC3 are 1x1 convs;
- dense+multicrop: the mean of the two soft-maxes; several scales: the mean over scales; an
  ensemble: the mean over its nets (each with its own crop, normalisation and scales).

Batching never changes a score: dense mode runs the images of a batch grouped by rescaled size,
each group as it is (no padding), and every other mode works on fixed-size crops. A batch is cut
into forward passes of at most `max_crops` inputs only for memory.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from vgg_ray.errors import ConfigError
from vgg_ray.models import POOLED, VGG
from vgg_ray.transforms import PAPER_CROP, PAPER_SCALE, ColorStats, normalization

MODES = ("single", "dense", "multicrop", "dense+multicrop")
# What a mode averages: dense+multicrop is the mean of the other two (Sect. 4.3, Table 5).
COMPONENTS = {
    "single": ("single",),
    "dense": ("dense",),
    "multicrop": ("multicrop",),
    "dense+multicrop": ("dense", "multicrop"),
}
GRID = 5  # multi-crop: a 5x5 grid of crops per scale, each also flipped (Sect. 3.2)
STRIDE = 32  # the conv stack's total stride: five 2x2 max-pools
TOP_K = 5


@dataclass(frozen=True, kw_only=True)
class NetInfo:
    """What the protocol needs to know about a trained net besides its weights."""

    name: str
    """The net's label in result tables, e.g. "D" (the paper's "ConvNet config." column)."""
    crop: int = PAPER_CROP
    """Side of the crops it was trained on; every test geometry is defined relative to it."""
    train_scale: tuple[int, int] = PAPER_SCALE
    """Training scale (Smin, Smax); Smin = Smax for a fixed-S net. Sets the default test scales."""
    normalize: str = "paper"
    """Input normalisation it was trained with: "paper" or "torchvision"."""
    stats: ColorStats | None = None
    """Mean RGB of its training set (no colour shift at test time); None: unknown, the
    evaluation job fills in the data set's (then ImageNet's default)."""
    classes: tuple[str, ...] = ()
    """WordNet ids of its outputs, by index; () when unknown (only the count is then checked)."""
    source: str = ""
    """Where it came from (checkpoint path, runs:/ or models:/ URI), for logs and tags."""
    run_id: str | None = None
    """The MLflow run it was trained in, if known: results are logged there."""
    manifest: str = ""
    """The manifest it was trained on, if known: the default data set to evaluate on."""
    regression: str = ""
    """A localisation net's box regression, "scr" or "pcr" (Appendix A); "": a classifier."""
    finetune: str = "all"
    """Which of its layers were trained from its init: "all", or "fc" only."""

    @property
    def train_scale_label(self) -> str:
        low, high = self.train_scale
        return str(low) if low == high else f"[{low};{high}]"


def default_scales(info: NetInfo) -> tuple[int, ...]:
    """The paper's multi-scale test (Sect. 4.2): Q in {S-32, S, S+32} for a net trained at fixed
    S, {Smin, (Smin+Smax)/2, Smax} for a scale-jittered one. The 32 is for 224 crops and scales
    with the crop (5 px for a 32 px demo net)."""
    low, high = info.train_scale
    if low == high:
        offset = max(1, round(32 * info.crop / 224))
        return (low - offset, low, low + offset)
    return (low, (low + high) // 2, high)


def single_scale(info: NetInfo) -> int:
    """The paper's single test scale (Table 3): Q = S for fixed S, (Smin+Smax)/2 jittered."""
    low, high = info.train_scale
    return (low + high) // 2


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """One row of a result table: which nets, which mode, at which test scales."""

    members: tuple[int, ...]
    """Indices of the nets (in the evaluator's order); several make an ensemble."""
    mode: str
    """One of MODES."""
    scales: tuple[tuple[int, ...], ...]
    """Test scales Q, one tuple per member (members of an ensemble may differ)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.members or len(self.scales) != len(self.members):
            raise ConfigError("a protocol needs one scale set per member")
        if any(not s for s in self.scales):
            raise ConfigError("a protocol needs at least one test scale per member")

    @property
    def scales_label(self) -> str:
        labels = {",".join(map(str, s)) for s in self.scales}
        return labels.pop() if len(labels) == 1 else "; ".join(",".join(map(str, s))
                                                               for s in self.scales)  # fmt: skip

    @property
    def key(self) -> str:
        """Metric-name-safe id, e.g. "dense_multicrop_256_384_512"."""
        scales = "_".join(map(str, self.scales[0])) if len(set(self.scales)) == 1 else "default"
        return f"{self.mode.replace('+', '_')}_{scales}"


def check_protocol(protocol: Protocol, infos: Sequence[NetInfo]) -> None:
    """Raise ConfigError where `protocol` cannot run on these nets."""
    for member, scales in zip(protocol.members, protocol.scales, strict=True):
        info = infos[member]
        low = min(scales)
        if low < info.crop:
            raise ConfigError(
                f"test scale Q = {low} is below net {info.name}'s crop size {info.crop}: "
                f"every test scale must be >= {info.crop}"
            )
        if "dense" in COMPONENTS[protocol.mode] and info.crop % STRIDE:
            raise ConfigError(
                f"dense evaluation needs a crop size that is a multiple of {STRIDE}; net "
                f"{info.name} was trained on {info.crop} px crops"
            )


def protocols(
    infos: Sequence[NetInfo],
    modes: Sequence[str] = MODES,
    scale_sets: Sequence[tuple[int, ...]] = (),
    *,
    members: bool = True,
) -> list[Protocol]:
    """The rows of a table: for each model set (each net alone when `members`, and the ensemble
    of all when there are several) x mode x scale set. Without `scale_sets`, the paper's defaults
    per net: single (the centre crop training validates on; no table of the paper) at the single
    test scale; dense at the single test scale (Table 3) and at three scales (Table 4); the other
    modes at three scales (Tables 5-6)."""
    sets: list[tuple[int, ...]] = [tuple(range(len(infos)))] if len(infos) > 1 else []
    if members or len(infos) == 1:
        sets = [(i,) for i in range(len(infos))] + sets
    rows = []
    for model_set in sets:
        for mode in modes:
            if scale_sets:
                choices = [tuple(tuple(s) for _ in model_set) for s in scale_sets]
            else:
                one = tuple((single_scale(infos[i]),) for i in model_set)
                three = tuple(default_scales(infos[i]) for i in model_set)
                choices = {"single": [one], "dense": [one, three]}.get(mode, [three])
            for scales in choices:
                protocol = Protocol(members=model_set, mode=mode, scales=scales)
                check_protocol(protocol, infos)
                rows.append(protocol)
    return rows


# --- the dense form and the crop grid ------------------------------------------------------


class DenseNet(nn.Module):
    """A VGG trained on c x c crops as a fully convolutional net (see the module docstring).

    Shares the net's modules; only FC1's kernel is computed (a view of FC1's weight at c = 224,
    a small new tensor otherwise). Build it after moving the net to its device. Returns the class
    score map (N, classes, h, w): 1x1 at a c x c input, equal to the net's logits there. With
    `head=False`, FC3 is left off (Appendix B): the map of FC2's activations (after its ReLU).
    """

    def __init__(self, model: VGG, crop: int, *, head: bool = True):
        super().__init__()
        # classifier: FC1 ReLU Dropout FC2 ReLU Dropout FC3 (dropout: the identity in eval)
        self.layers = list(model.classifier) if head else list(model.classifier)[:-2]
        if crop % STRIDE:
            raise ConfigError(f"dense evaluation needs a crop that is a multiple of {STRIDE}")
        self.features = model.features
        self.classifier = model.classifier
        self.side = crop // STRIDE  # the feature map of one training crop
        fc1 = model.classifier[0]
        channels = fc1.in_features // POOLED**2
        weight = fc1.weight.detach().view(fc1.out_features, channels, POOLED, POOLED)
        if self.side != POOLED:
            # pool[y, p]: weight of feature row y in avgpool's output row p (AdaptiveAvgPool2d is
            # separable, the same matrix on both axes).
            eye = torch.eye(self.side, dtype=weight.dtype, device=weight.device)
            pool = F.adaptive_avg_pool1d(eye[None], POOLED)[0]
            weight = torch.einsum("oipq,yp,xq->oiyx", weight, pool, pool).contiguous()
        self.fc1_kernel = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-2] < self.side or x.shape[-1] < self.side:
            raise ValueError(
                f"dense evaluation needs inputs of at least {STRIDE * self.side} px per side"
            )
        first = True
        for module in self.layers:
            if isinstance(module, nn.Linear):
                if first:
                    kernel, first = self.fc1_kernel, False
                else:
                    kernel = module.weight.view(module.out_features, module.in_features, 1, 1)
                x = F.conv2d(x, kernel, module.bias)  # autocast casts them under bf16
            else:
                x = module(x)
        return x


def grid_positions(free: int, count: int = GRID) -> list[int]:
    """`count` evenly spaced offsets in [0, free], mirror-symmetric (offset i and count-1-i add up
    to `free`), so the flipped grid is the same grid: the flip-averaged score of a flipped image
    is the score of the image."""
    half = [(i * free) // (count - 1) for i in range((count + 1) // 2)]
    return half + [free - p for p in reversed(half[: count // 2])]


def multicrop_windows(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the 5x5 grid of `crop` crops on a height x width image (25 windows)."""
    return [
        (top, left)
        for top in grid_positions(height - crop)
        for left in grid_positions(width - crop)
    ]


# --- scoring -------------------------------------------------------------------------------


class NetScorer:
    """One net on one device: soft-max posteriors of rescaled uint8 images, per component."""

    def __init__(
        self,
        model: VGG,
        info: NetInfo,
        device: torch.device,
        *,
        max_crops: int = 64,
        bf16: bool = False,
        channels_last: bool = False,
    ):
        self.info, self.device = info, device
        self.max_crops, self.bf16, self.channels_last = max_crops, bf16, channels_last
        self.model = model.to(device).eval()
        if channels_last:  # NHWC: faster convs on tensor cores
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dense_net = DenseNet(self.model, info.crop) if info.crop % STRIDE == 0 else None
        self.feature_net: DenseNet | None = None  # FC3 left off: built on first use
        gain, bias = normalization(info.stats or ColorStats(), info.normalize)
        self.gain, self.bias = gain.to(device)[:, None, None], bias.to(device)[:, None, None]
        self.forwarded = 0  # inputs pushed through the net (multi-crop: 50 per image and scale)

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().mul_(self.gain).add_(self.bias)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _forward(self, net: nn.Module, pixels: torch.Tensor, *, maps: bool = False) -> torch.Tensor:
        """Logits (or score maps averaged over space; `maps`: as they are) of uint8 inputs, in
        float32."""
        outputs = []
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else nullcontext())  # fmt: skip
        with torch.inference_mode(), autocast:
            for start in range(0, len(pixels), self.max_crops):
                out = net(self._input(pixels[start : start + self.max_crops]))
                if out.ndim == 4 and not maps:  # the paper's sum-pooling of a map (as a mean)
                    out = out.float().mean(dim=(-2, -1))
                outputs.append(out.float())
        self.forwarded += len(pixels)
        return torch.cat(outputs)

    def single(self, rescaled: Sequence[torch.Tensor]) -> torch.Tensor:
        crop = self.info.crop
        crops = torch.stack([TF.center_crop(image, [crop, crop]) for image in rescaled])
        return self._forward(self.model, crops).softmax(dim=1)

    def multicrop(self, rescaled: Sequence[torch.Tensor]) -> torch.Tensor:
        crop = self.info.crop
        crops = []
        for image in rescaled:
            windows = multicrop_windows(image.shape[-2], image.shape[-1], crop)
            grid = torch.stack([image[:, t : t + crop, x : x + crop] for t, x in windows])
            crops += [grid, grid.flip(-1)]
        per_image = 2 * GRID * GRID
        probs = self._forward(self.model, torch.cat(crops)).softmax(dim=1)
        return probs.view(len(rescaled), per_image, -1).mean(dim=1)

    def dense(self, rescaled: Sequence[torch.Tensor]) -> torch.Tensor:
        return self._dense_flip_mean(self._dense_net(), rescaled, torch.softmax)

    def outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """The net's raw outputs (N, outputs) of uint8 (N, 3, crop, crop) inputs, float32."""
        return self._forward(self.model, pixels)

    def dense_map(self, rescaled: torch.Tensor) -> torch.Tensor:
        """The dense net's raw output map (outputs, h, w) of one rescaled uint8 image, float32:
        position (i, j) is the crop x crop window at (STRIDE * i, STRIDE * j)."""
        return self._forward(self._dense_net(), rescaled[None], maps=True)[0]

    def fc2_descriptor(self, rescaled: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, 4096·width) FC2 activations of the dense net averaged over space, then over the
        image and its flip (Appendix B); not normalised."""
        if self.feature_net is None:
            self.feature_net = DenseNet(self.model, self.info.crop, head=False)
        return self._dense_flip_mean(self.feature_net, rescaled, lambda x, dim: x)

    def _dense_net(self) -> DenseNet:
        if self.dense_net is None:
            raise ConfigError(f"net {self.info.name}: dense evaluation needs a crop divisible "
                              f"by {STRIDE}")  # fmt: skip
        return self.dense_net

    def _dense_flip_mean(
        self, net: DenseNet, rescaled: Sequence[torch.Tensor], then
    ) -> torch.Tensor:
        """`then`(the spatial mean of `net`'s map, dim=1), averaged over each image and its
        flip. Images are grouped by size, each group one batch as it is: nothing padded."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(rescaled):
            by_size[tuple(image.shape[-2:])].append(i)
        out: list[torch.Tensor | None] = [None] * len(rescaled)
        for indices in by_size.values():
            images = torch.stack([rescaled[i] for i in indices])
            values = then(self._forward(net, torch.cat([images, images.flip(-1)])), dim=1)
            values = values.view(2, len(indices), -1).mean(dim=0)
            for i, value in zip(indices, values, strict=True):
                out[i] = value
        return torch.stack(out)


def rescale(images: Sequence[torch.Tensor], scale: int) -> list[torch.Tensor]:
    """Isotropic rescale of uint8 (3, h, w) images to smaller side Q = `scale` (as EvalPreset)."""
    return [TF.resize(image, [scale], antialias=True) for image in images]


class Evaluator:
    """Scores decoded images under a list of protocols, for one net or several.

    ```
    evaluator = Evaluator(models, infos, protocols(infos), device=device)
    probs = evaluator.posteriors(images)   # (rows, N, classes): one per protocol
    top5 = evaluator.top_k(images)         # (N, rows, 5) class indices, best first
    ```
    `images` are uint8 (3, h, w) tensors of any size (CPU, or already on `device`). Each image is
    rescaled once per scale and shared by every net and mode that needs that scale.
    """

    def __init__(
        self,
        models: Sequence[VGG],
        infos: Sequence[NetInfo],
        rows: Sequence[Protocol],
        *,
        device: torch.device | str = "cpu",
        max_crops: int = 64,
        bf16: bool = False,
        channels_last: bool = False,
    ):
        if len(models) != len(infos):
            raise ValueError(f"{len(models)} models but {len(infos)} infos")
        counts = {m.num_classes for m in models}
        if len(counts) != 1:
            raise ConfigError(f"an ensemble's nets must have the same classes; got {counts}")
        for row in rows:
            check_protocol(row, infos)
        self.device = torch.device(device)
        self.rows = list(rows)
        self.num_classes = counts.pop()
        self.scorers = [
            NetScorer(m, i, self.device, max_crops=max_crops, bf16=bf16,
                      channels_last=channels_last)
            for m, i in zip(models, infos, strict=True)
        ]  # fmt: skip
        # (net, component, scale) triples the rows need: each is computed once per batch.
        self.needed: dict[int, set[tuple[int, str]]] = defaultdict(set)
        for row in self.rows:
            for member, scales in zip(row.members, row.scales, strict=True):
                for scale in scales:
                    for component in COMPONENTS[row.mode]:
                        self.needed[scale].add((member, component))

    def posteriors(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(rows, N, classes) float32 soft-max posteriors, one per protocol."""
        images = [image.to(self.device) for image in images]
        if not images:
            return torch.zeros(len(self.rows), 0, self.num_classes)
        parts: dict[tuple[int, str, int], torch.Tensor] = {}
        for scale in sorted(self.needed):
            rescaled = rescale(images, scale)
            for member, component in sorted(self.needed[scale]):
                scorer = self.scorers[member]
                parts[member, component, scale] = getattr(scorer, component)(rescaled)
        out = []
        for row in self.rows:
            per_member = []
            for member, scales in zip(row.members, row.scales, strict=True):
                # Mean over components of the mean over scales (equal weights in both).
                per_component = [
                    torch.stack([parts[member, c, s] for s in scales]).mean(dim=0)
                    for c in COMPONENTS[row.mode]
                ]
                per_member.append(torch.stack(per_component).mean(dim=0))
            out.append(torch.stack(per_member).mean(dim=0))  # ensemble: mean soft-max
        return torch.stack(out)

    def top_k(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """(N, rows, k) int64 class indices, best first; k = min(5, classes)."""
        probs = self.posteriors(images)
        k = min(TOP_K, self.num_classes)
        return probs.topk(k, dim=-1).indices.permute(1, 0, 2).cpu().numpy()


# --- counting and tables -------------------------------------------------------------------


@dataclass
class Tally:
    """Top-1 / top-5 hits per protocol and class; adds up across batches and actors."""

    rows: int
    classes: int
    images: np.ndarray = field(init=False)  # (classes,) images per true class
    top1: np.ndarray = field(init=False)  # (rows, classes) hits per protocol and true class
    top5: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.images = np.zeros(self.classes, np.int64)
        self.top1 = np.zeros((self.rows, self.classes), np.int64)
        self.top5 = np.zeros((self.rows, self.classes), np.int64)

    def add(self, labels: np.ndarray, top_k: np.ndarray) -> None:
        """labels (N,) and top_k (N, rows, k) class indices, best first."""
        labels = np.asarray(labels, np.int64)
        if len(labels) == 0:
            return
        if labels.min() < 0 or labels.max() >= self.classes:
            raise ConfigError(f"labels outside [0, {self.classes}) in the data")
        hits = np.asarray(top_k) == labels[:, None, None]  # (N, rows, k)
        np.add.at(self.images, labels, 1)
        for row in range(self.rows):
            np.add.at(self.top1[row], labels, hits[:, row, 0])
            np.add.at(self.top5[row], labels, hits[:, row, :TOP_K].any(axis=1))

    @property
    def total(self) -> int:
        return int(self.images.sum())

    def errors(self, row: int) -> tuple[float, float]:
        """(top-1, top-5) error of protocol `row` over all images."""
        n = max(self.total, 1)
        return 1 - self.top1[row].sum() / n, 1 - self.top5[row].sum() / n


@dataclass(frozen=True)
class ResultRow:
    """One line of the paper-shaped table."""

    nets: str  # "D", or "D+E" for an ensemble
    train_scale: str  # "256" or "[256;512]" per net
    mode: str
    test_scales: str  # "256,384,512"
    top1_error: float  # fraction, not %
    top5_error: float
    images: int
    key: str  # metric-name-safe protocol id
    members: tuple[int, ...]


def result_rows(tally: Tally, rows: Sequence[Protocol], infos: Sequence[NetInfo]):
    out = []
    for index, row in enumerate(rows):
        top1, top5 = tally.errors(index)
        nets = [infos[i] for i in row.members]
        out.append(ResultRow(
            nets="+".join(n.name for n in nets),
            train_scale=", ".join(n.train_scale_label for n in nets),
            mode=row.mode, test_scales=row.scales_label, top1_error=float(top1),
            top5_error=float(top5), images=tally.total, key=row.key, members=row.members,
        ))  # fmt: skip
    return out


def table_markdown(results: Sequence[ResultRow]) -> str:
    """The paper's table shape (Tables 3-6): net, train S, method, test Q, top-1 and top-5 %."""
    lines = [
        "| ConvNet | train S | method | test Q | top-1 val. error (%) | top-5 val. error (%) |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.nets} | {r.train_scale} | {r.mode} | {r.test_scales} | "
            f"{100 * r.top1_error:.1f} | {100 * r.top5_error:.1f} |"
        )
    images = {r.images for r in results}
    lines.append(f"\n{images.pop() if len(images) == 1 else images} images evaluated.")
    return "\n".join(lines) + "\n"


def table_csv(results: Sequence[ResultRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["nets", "train_scale", "mode", "test_scales", "top1_error", "top5_error",
                     "images"])  # fmt: skip
    for r in results:
        writer.writerow([r.nets, r.train_scale, r.mode, r.test_scales, f"{r.top1_error:.6f}",
                         f"{r.top5_error:.6f}", r.images])  # fmt: skip
    return buffer.getvalue()


def per_class_csv(
    tally: Tally,
    results: Sequence[ResultRow],
    class_ids: Sequence[str],
    class_names: Sequence[str],
    *,
    only: Sequence[int] | None = None,
) -> str:
    """Per-class errors, one line per (protocol, class); `only` picks protocol indices."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["nets", "mode", "test_scales", "class", "wnid", "name", "images",
                     "top1_error", "top5_error"])  # fmt: skip
    for index in only if only is not None else range(len(results)):
        r = results[index]
        for c in range(tally.classes):
            n = tally.images[c]
            top1 = 1 - tally.top1[index, c] / n if n else float("nan")
            top5 = 1 - tally.top5[index, c] / n if n else float("nan")
            writer.writerow([r.nets, r.mode, r.test_scales, c, class_ids[c], class_names[c], n,
                             f"{top1:.6f}", f"{top5:.6f}"])  # fmt: skip
    return buffer.getvalue()
