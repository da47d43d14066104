"""The VGG family of Simonyan & Zisserman (2015), Table 1, as data plus one builder.

This module imports neither ray, mlflow nor torch.distributed: it runs anywhere torch does,
including the GPU benchmark machine. All wrapping for training lives in `vgg_ray.parallel`.

Layer layout follows torchvision's `models/vgg.py` (`features`, `avgpool`, `classifier`), so
for nets A, B, D and E a torchvision vgg11/13/16/19 state_dict loads with strict=True.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vgg_ray.errors import ConfigError

# Table 1. An int is a 3x3 conv with that many output channels, a (channels, 1) tuple a 1x1
# conv (net C), "M" a 2x2 max-pool with stride 2, "LRN" AlexNet's local response normalisation.
Layer = int | tuple[int, int] | str
CONFIGS: dict[str, list[Layer]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}  # fmt: skip

# Names as the paper and torchvision know them.
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
HIDDEN = 4096  # FC1 and FC2 width (Table 1)
POOLED = 7  # spatial size after five pools on a 224 input: FC1 sees 512 x 7 x 7
INITS = ("paper", "glorot", "kaiming")


@dataclass(frozen=True)
class NetSummary:
    """One row of `vgg-ray models`."""

    name: str
    weight_layers: int
    parameters: int
    forward_macs: int  # multiply-adds of one forward pass at 224x224


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def make_layers(config: list[Layer], width: float = 1.0, batch_norm: bool = False) -> nn.Sequential:
    """Build the conv stack of one Table 1 column (every conv followed by ReLU; with
    `batch_norm`, conv -> BatchNorm -> ReLU as torchvision's vgg*_bn, which is not the paper)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for layer in config:
        if layer == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif layer == "LRN":
            # AlexNet's LRN, as the paper used it (Sect. 2.3): size 5, alpha 1e-4, beta 0.75, k 2.
            layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            channels, kernel = layer if isinstance(layer, tuple) else (layer, 3)
            out_channels = _scaled(channels, width)
            layers.append(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A VGG net; torchvision's module layout, so its state_dicts load unchanged."""

    def __init__(self, features: nn.Sequential, num_classes: int, width: float, dropout: float):
        super().__init__()
        last_conv = [m for m in features if isinstance(m, nn.Conv2d)][-1]
        hidden = _scaled(HIDDEN, width)
        self.features = features
        # Identity at 224 (the features are already 7x7); lets small demo images (>= 32 px) reach
        # the FC layers unchanged in shape.
        self.avgpool = nn.AdaptiveAvgPool2d((POOLED, POOLED))
        self.classifier = nn.Sequential(
            nn.Linear(last_conv.out_channels * POOLED * POOLED, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    @property
    def batch_norm(self) -> bool:
        return any(isinstance(m, nn.BatchNorm2d) for m in self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def init_weights(model: nn.Module, init: str = "paper") -> None:
    """Initialise every conv and FC layer, biases 0: "paper" is N(0, 0.01) (Sect. 3.1); "glorot"
    Xavier uniform (the paper's afterword: it trains the deep nets without pre-training);
    "kaiming" is torchvision's VGG init (He et al. 2015 for convs, N(0, 0.01) for FCs), which
    keeps the signal's scale through 16 ReLU convs where Glorot halves it at each. Batch norm
    layers start as the identity (weight 1, bias 0), as torchvision's."""
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d | nn.Linear):
            if init == "glorot":
                nn.init.xavier_uniform_(module.weight)
            elif init == "kaiming" and isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.zeros_(module.bias)


REGRESSIONS = ("scr", "pcr")  # Appendix A: single-class or per-class box regression


def head_size(classes: int, regression: str = "") -> int:
    """Outputs of the last FC layer: class scores, or a box (4 numbers) for all classes (SCR)
    or for each class (PCR)."""
    return {"": classes, "scr": 4, "pcr": 4 * classes}[regression]


def init_box_head(model: VGG) -> None:
    """A new box regression layer (Appendix A: the last layer starts random): weights N(0, 1e-3)
    and the bias the centred box of half the crop's side, (0.5, 0.5, 0.5, 0.5) per box. Not
    N(0, 0.01) and a zero bias, as a classifier's last layer: a trained net's FC2 activations
    have a norm of tens, so that would start every box off by about half the crop, and the
    Euclidean loss's first, large gradients would undo the features the net was given."""
    head = model.classifier[-1]
    nn.init.normal_(head.weight, mean=0.0, std=1e-3)
    nn.init.constant_(head.bias, 0.5)


def build_vgg(
    name: str,
    num_classes: int = 1000,
    width: float = 1.0,
    init: str = "paper",
    dropout: float = 0.5,
    batch_norm: bool = False,
) -> VGG:
    """Build net `name` ("A", "A-LRN", "B", "C", "D" or "E") of Table 1.

    `width` scales every conv and FC width (1.0 is the paper's net; 1/16 makes a net that trains
    in seconds on a CPU). `dropout` is the paper's 0.5 after FC1 and FC2. `batch_norm` adds a
    BatchNorm after every conv: torchvision's vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn for A, B,
    D, E (their state_dicts load strictly). Not in the paper (batch norm came later, 2015);
    it is what makes these nets train from scratch on small data sets.
    """
    if name not in CONFIGS:
        raise ConfigError(f"unknown VGG net {name!r}; choose one of {', '.join(CONFIGS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not width > 0:
        raise ConfigError(f"width must be > 0, got {width!r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    model = VGG(make_layers(CONFIGS[name], width, batch_norm), num_classes, width, dropout)
    init_weights(model, init)
    return model


def vgg_for_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "state_dict"
) -> tuple[str, VGG]:
    """(name, net) of the Table 1 net whose layers a plain state_dict holds (torchvision's
    vgg11/13/16/19 and their _bn variants, or a vgg-ray net's weights alone), with its weights.
    The width is read from the first conv and the classes from FC3; the net is the one whose
    every parameter name and shape match. ConfigError where none does (not a VGG)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    first, head = shapes.get("features.0.weight"), shapes.get("classifier.6.weight")
    if not first or not head or len(first) != 4:
        raise ConfigError(f"{source} is not a VGG state_dict (no features.0 conv or classifier.6 "
                          "layer, as vgg-ray and torchvision VGGs have)")  # fmt: skip
    width, batch_norm = first[0] / 64, "features.1.running_mean" in shapes
    for name in CONFIGS:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            candidate = build_vgg(name, num_classes=head[0], width=width, batch_norm=batch_norm)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            model = build_vgg(name, num_classes=head[0], width=width, init="glorot",
                              batch_norm=batch_norm)  # fmt: skip
            model.load_state_dict(state_dict)
            return name, model
    raise ConfigError(f"{source}: its layers match no net of Table 1 ({', '.join(CONFIGS)}) at "
                      f"width {width:g}{' with batch norm' if batch_norm else ''}")  # fmt: skip


def _conv_stages(model: VGG) -> list[list[str]]:
    """Module names of each stage's convs, e.g. [["features.0"], ["features.3"], ...] for A."""
    stages: list[list[str]] = [[]]
    for index, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            stages[-1].append(f"features.{index}")
        elif isinstance(module, nn.MaxPool2d):
            stages.append([])
    return [stage for stage in stages if stage]


def init_from_shallow(deep: VGG, trained_a: VGG) -> list[str]:
    """Copy net A's first four convs (conv1_1, conv2_1, conv3_1, conv3_2) and its three FC layers
    into `deep`, by position inside their stage (Sect. 3.1). Returns the names of the layers of
    `deep` that were overwritten; every other tensor of `deep` is left as it was."""
    source_stages, target_stages = _conv_stages(trained_a), _conv_stages(deep)
    copies = [  # (source, target) module names
        (source_stages[stage][position], target_stages[stage][position])
        for stage, position in ((0, 0), (1, 0), (2, 0), (2, 1))
    ]
    copies += [(f"classifier.{i}", f"classifier.{i}") for i in (0, 3, 6)]
    if trained_a.batch_norm and deep.batch_norm:  # each copied conv's batch norm goes with it
        copies += [(_next(source), _next(target)) for source, target in copies[:4]]
    source_modules, target_modules = dict(trained_a.named_modules()), dict(deep.named_modules())
    for source_name, target_name in copies:
        source, target = source_modules[source_name], target_modules[target_name]
        if source.weight.shape != target.weight.shape:
            raise ConfigError(
                f"cannot initialise {target_name} from net A's {source_name}: shape "
                f"{tuple(source.weight.shape)} vs {tuple(target.weight.shape)} "
                "(the nets differ in width or class count)"
            )
    for source_name, target_name in copies:
        target_modules[target_name].load_state_dict(source_modules[source_name].state_dict())
    return [target for _, target in copies]


def _next(name: str) -> str:
    """ "features.3" -> "features.4": the module right after a conv (its batch norm)."""
    prefix, index = name.rsplit(".", 1)
    return f"{prefix}.{int(index) + 1}"


def forward_macs(model: nn.Module, size: int = 224) -> int:
    """Multiply-adds of one forward pass on a size x size image (convs and FCs; the paper's
    measure). On a model on the meta device this costs neither memory nor compute."""
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kernel = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            macs += output[0].numel() * kernel
        else:
            macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def summarize(name: str) -> NetSummary:
    """Weight layers, parameters and forward multiply-adds of net `name` at full width."""
    with torch.device("meta"):
        model = build_vgg(name)
    weight_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    parameters = sum(p.numel() for p in model.parameters())
    return NetSummary(name, weight_layers, parameters, forward_macs(model))
