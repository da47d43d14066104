"""A training run's configuration: the paper's recipe (Sect. 3.1) as the defaults.

`TrainConfig` is what the CLI and the jobs build, what MLflow logs as params and what every
checkpoint carries. Profiles (`paper`, `demo`) are functions returning a config; command-line
options override single fields with `dataclasses.replace`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgg_ray.data import StreamConfig
from vgg_ray.errors import ConfigError, require
from vgg_ray.models import CONFIGS, INITS, REGRESSIONS
from vgg_ray.schedules import SCHEDULES
from vgg_ray.transforms import PAPER_SCALE


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field docstrings (the string literal under each field), by field name,
    its bases' too (a subclass's own win): the one place an option is described, read by the
    CLI for its --help."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, doc in zip(body, body[1:], strict=False):
            is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            if is_field and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                docs[node.target.id] = " ".join(str(doc.value.value).split())
    return docs


def checked_fields(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` (e.g. from a YAML file) for the fields of dataclass `cls`, each checked against
    its annotation (int, float, str, bool, X | None, tuple[...]): a ConfigError naming the key,
    `config: data.crop must be an int, got 'big'`. Ints stand for floats (made floats), and so
    does "1e-3" (PyYAML's string for it); lists stand for tuples; bools are not numbers. Keys
    that are not fields pass unchecked (the caller reports them); a field of another type (a
    nested dataclass) is the caller's to check."""
    hints = field_types(cls)
    return {
        key: check_value(hints[key], value, f"{prefix}{key}") if key in hints else value
        for key, value in values.items()
    }


def check_value(kind: Any, value: Any, key: str) -> Any:
    """`value` as type `kind` (see `checked_fields`), else a ConfigError naming `key`."""
    ok, converted = _convert(kind, value)
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"config: {key} must be {_describe(kind)}, got {shown}")
    return converted


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved from its (string) annotations."""
    return typing.get_type_hints(cls)


# YAML 1.1 (PyYAML) reads 1e-3 as a string: an exponent needs a dot there (1.0e-3).
_YAML_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _convert(kind: Any, value: Any) -> tuple[bool, Any]:
    """(whether `value` fits type `kind`, the value as that type)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for arm in args:
            if arm is not type(None) and (fit := _convert(arm, value))[0]:
                return fit
        return False, value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        arms = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        fits = [_convert(arm, item) for arm, item in zip(arms, value, strict=False)]
        ok = len(arms) == len(value) and all(fit for fit, _ in fits)
        return ok, tuple(item for _, item in fits) if ok else value
    if kind is float:
        if isinstance(value, str) and _YAML_EXPONENT.fullmatch(value):
            return True, float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind in (str, bool):
        return isinstance(value, kind), value
    raise TypeError(f"no check for fields of type {kind!r}")  # a bug: teach _convert the type


def _describe(kind: Any) -> str:
    """ "an int", "a number or null", "a list of 2 ints": what a value of type `kind` is."""
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
    if kind in names:
        return names[kind]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args if arm is not type(None)) + " or null"
    if origin is tuple and (args[-1:] == (Ellipsis,) or len(set(args)) == 1):
        plural = {int: "ints", float: "numbers", str: "strings", bool: "booleans"}[args[0]]
        count = "" if args[-1:] == (Ellipsis,) else f"{len(args)} "
        return f"a list of {count}{plural}"
    return str(kind)


def default_home() -> Path:
    """Where the embedded default keeps runs, checkpoints and its MLflow database."""
    return Path(os.environ.get("VGG_RAY_HOME", Path.cwd() / "vgg-ray-runs")).resolve()


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Defaults are the paper's recipe for a full-size net."""

    arch: str = "E"
    """Net of Table 1: A, A-LRN, B, C, D or E."""
    width: float = 1.0
    """Multiplier on every conv and FC width; 1.0 is the paper's net."""
    dropout: float = 0.5
    """Dropout after FC1 and FC2."""
    batch_norm: bool = False
    """A BatchNorm after every conv (torchvision's vgg*_bn; not in the paper): trains from
    scratch on small data sets where the paper's nets are slow to start."""
    init: str = "paper"
    """"paper" (N(0, 0.01)), "glorot", "kaiming", or where trained weights come from: a
    checkpoint of a trained net A (path or s3:// URI; Sect. 3.1's init of deep nets: its first
    four convs and three FCs are copied), a checkpoint of the same net (fine-tuning), a
    `models:/` or `runs:/` URI, or a torchvision VGG state_dict file (`.pth`)."""
    base_init: str = "paper"
    """Random init ("paper", "glorot", "kaiming") of the layers that `init`'s trained weights
    do not set: a deep net initialised from net A keeps the paper's N(0, 0.01) elsewhere."""
    regression: str = ""
    """Localisation (Appendix A): the last FC predicts boxes instead of class scores, "scr" one
    box for all classes (4 outputs) or "pcr" one per class (4 x classes), trained with the
    Euclidean loss on the images with boxes; init from a trained classifier of the same net
    (its last layer stays random). "": classification."""
    finetune: str = "all"
    """What trains when starting from trained weights: "all" layers, or "fc" only the fully
    connected ones (the convs frozen; Appendix A's Table 8 compares the two)."""
    data: StreamConfig = field(default_factory=StreamConfig)
    """Where the shards are and the paper's augmentation (scale jittering, crop, flip, colour)."""

    epochs: int = 74
    """The paper stopped after 370K iterations of batch 256: 74 epochs."""
    global_batch: int = 256
    """Images per optimizer step over all workers; stays the same whatever the worker count."""
    grad_accum: int = 1
    """Micro-batches per step on each worker, where a worker cannot hold global_batch/workers."""
    lr: float = 1e-2
    """Initial learning rate (the paper: 1e-2; 1e-3 when fine-tuning the S = 384 nets)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 penalty multiplier."""
    lr_factor: float = 0.1
    """Multiplier of each lr decay (the paper divides the lr by 10) ..."""
    lr_patience: int = 2
    """... plateau rule: decay when val accuracy has not improved for more than this many
    epochs ..."""
    lr_decays: int = 3
    """... at most this many times (the paper: 3)."""
    schedule: str = "plateau"
    """Learning-rate schedule family (vgg_ray.schedules): "plateau" (the paper's rule above),
    "step" (x lr_factor every step_size epochs), "cosine" (to 0 at `epochs`), "warmup_cosine"
    (linear warm-up over warmup_epochs, then cosine)."""
    clip_grad_norm: float = 0.0
    """Scale each step's gradient down to this global L2 norm (0: off, as in the paper)."""
    max_nonfinite_steps: int = 20
    """A step whose gradient is not finite (inf/NaN) is skipped; after this many in a row the
    run stops as diverged, its checkpoint holding the weights from before them."""
    step_size: int = 20
    """Epochs between decays of the "step" schedule."""
    warmup_epochs: int = 5
    """Epochs of linear warm-up of the "warmup_cosine" schedule."""

    workers: int = 1
    """Ray Train workers (one per GPU on a GPU cluster); with `min_workers`, the most."""
    min_workers: int = 0
    """Elastic training (`--workers 2-8`: 2): the run goes on with the workers that remain when
    some are lost, down to this many, and grows back to `workers` when capacity returns, each
    change through its latest checkpoint; the global batch, the step count and the lr schedule
    go on as if nothing had happened. 0: a fixed count, `workers`."""
    max_preemptions: int = -1
    """Preemptions (a node reclaimed, as spot capacity is) recovered from, counted apart from
    `max_failures`; -1: no limit."""
    sigterm_notice_s: float = 30.0
    """A SIGTERM to a training worker (what a spot node's shutdown sends, often with no notice
    Ray has heard of) is taken as its node's preemption: the run checkpoints at the next step
    boundary polled and restarts without that node this many seconds later, or when it goes
    (counted against `max_preemptions`)."""
    elastic_check_s: float = 60.0
    """How often an elastic run looks for returned capacity to grow back into (through its
    latest checkpoint: checkpoint often enough that a regrowth loses little)."""
    gpus_per_worker: float | None = None
    """None: 1 when the cluster has GPUs, else 0."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each training worker reserves."""
    bf16: bool | None = None
    """bf16 autocast; None: on when training on GPU."""
    channels_last: bool | None = None
    """NHWC memory format, faster for convs on tensor cores; None: on when training on GPU."""
    compile: bool = False
    """torch.compile the model."""
    seed: int = 0
    """Seeds the initial weights, every epoch's data order and every image's augmentation."""

    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only)."""
    keep_best: int = 3
    """Checkpoints kept besides the latest, best by validation top-5 error."""
    max_failures: int = 3
    """Worker failures recovered from the latest checkpoint before the run gives up."""
    storage_path: str = ""
    """Local folder or s3://bucket/prefix for checkpoints; "" = <home>/checkpoints."""
    run_name: str = ""
    """Names the run in Ray and MLflow; a stopped run continues when started again by name."""
    tracking_uri: str = ""
    """MLflow tracking URI; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    experiment: str = "vgg-ray"
    """MLflow experiment of the run."""
    log_every_steps: int = 50
    """Log the step's loss, gradient norm and lr every this many optimizer steps."""

    def validate(self) -> TrainConfig:
        """Raise ConfigError for the first problem found; return self for chaining."""
        checks = [
            (
                self.arch in CONFIGS,
                f"unknown arch {self.arch!r}; choose one of {', '.join(CONFIGS)}",
            ),
            (self.width > 0, f"width must be > 0, got {self.width}"),
            (
                self.regression in ("", *REGRESSIONS),
                f"unknown regression {self.regression!r}; "
                f"choose one of {', '.join(REGRESSIONS)} (or none: classification)",
            ),
            (
                self.finetune in FINETUNE,
                f"unknown finetune {self.finetune!r}; choose one of {', '.join(FINETUNE)}",
            ),
            (
                self.finetune == "all" or self.init not in INITS,
                "--finetune fc trains only the "
                "FC layers of trained weights: give --init a trained net's checkpoint",
            ),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (
                self.base_init in INITS,
                f"unknown base_init {self.base_init!r}; choose one of {', '.join(INITS)}",
            ),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 < self.lr_factor < 1, f"lr factor must be in (0, 1), got {self.lr_factor}"),
            (self.lr_patience >= 0 and self.lr_decays >= 0, "lr patience and decays must be >= 0"),
            (
                self.schedule in SCHEDULES,
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}",
            ),
            (self.clip_grad_norm >= 0, f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}"),
            (
                self.max_nonfinite_steps >= 1,
                f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}",
            ),
            (self.step_size >= 1, f"step size must be >= 1 epoch, got {self.step_size}"),
            (self.warmup_epochs >= 1, f"warmup epochs must be >= 1, got {self.warmup_epochs}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (
                self.min_workers <= self.workers,
                f"--workers {self.min_workers}-{self.workers}: the fewest workers is more than "
                "the most",
            ),
            (self.min_workers >= 0, f"min_workers must be >= 0 (0: fixed), got {self.min_workers}"),
            (self.max_preemptions >= -1, "max preemptions must be >= 0 (or -1 for no limit)"),
            (self.sigterm_notice_s > 0, f"sigterm notice must be > 0, got {self.sigterm_notice_s}"),
            (
                not self.min_workers or self.global_batch >= self.workers,
                f"global batch {self.global_batch} cannot give each of up to {self.workers} "
                "workers an image per step; lower the most workers or raise the global batch",
            ),
            (
                (self.gpus_per_worker is None or self.gpus_per_worker >= 0)
                and self.cpus_per_worker >= 0,
                f"GPUs and CPUs per worker must be >= 0, got {self.gpus_per_worker} and "
                f"{self.cpus_per_worker}",
            ),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.log_every_steps >= 1, "log_every_steps must be >= 1"),
            (self.grad_accum >= 1, f"grad accumulation must be >= 1, got {self.grad_accum}"),
            (self.global_batch >= 1, f"global batch must be >= 1, got {self.global_batch}"),
            (
                # workers and grad_accum are checked above, but the list is built eagerly;
                # an elastic run splits steps unevenly where it must (np.array_split)
                self.min_workers or self.global_batch % max(self.workers * self.grad_accum, 1) == 0,
                f"global batch {self.global_batch} is not divisible by workers x grad "
                f"accumulation ({self.workers} x {self.grad_accum})",
            ),
            (self.keep_best >= 1, f"keep_best must be >= 1, got {self.keep_best}"),
            (self.max_failures >= -1, "max failures must be >= 0 (or -1 for no limit)"),
            (self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0"),
            # The run name is a folder under storage_path and a quoted MLflow filter value:
            # "../x" would write outside it, a quote would break the run lookup on resume.
            (
                not self.run_name or re.fullmatch(r"[^./\\'\"`\s][^/\\'\"`\s]*", self.run_name),
                f"run name {self.run_name!r} must not start with '.' nor hold '/', '\\', quotes "
                "or spaces",
            ),
        ]
        require(checks)
        is_file_init = self.init not in INITS
        if is_file_init and not (
            self.init.startswith(("models:/", "s3://", "runs:/")) or Path(self.init).exists()
        ):
            raise ConfigError(
                f"init {self.init!r} is neither {' nor '.join(INITS)} nor an existing checkpoint, "
                "models:/ URI or torchvision state_dict file"
            )
        self.data.validate()
        return self

    @property
    def micro_batch(self) -> int:
        """Images one worker pushes through the net per forward pass (at most: with fewer
        workers than `workers`, an elastic run's workers take more micro-batches a step)."""
        return max(1, self.global_batch // (self.workers * self.grad_accum))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "") -> TrainConfig:
        """The config of `values` (`to_dict`'s, or a YAML file's), each value checked against
        its field's type; `prefix` names where `values` sit in the file (e.g. "train.")."""
        values = dict(values)
        data = values.pop("data", {})
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: {prefix}data must be a mapping of data options, got "
                              f"{data!r}")  # fmt: skip
        unknown = {str(k) for k in set(values) - {f.name for f in dataclasses.fields(cls)}}
        unknown |= {
            f"data.{k}" for k in set(data) - {f.name for f in dataclasses.fields(StreamConfig)}
        }
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        values = checked_fields(cls, values, prefix)
        data = checked_fields(StreamConfig, data, f"{prefix}data.")
        return cls(**values, data=StreamConfig(**data))

    def merged(self, file: Mapping[str, Any], options: Mapping[str, Any]) -> TrainConfig:
        """This config (a profile's), then a YAML file's values (nested: `data:` a mapping of
        its own), then command-line options (flat: each goes to the run or its data by field
        name). Each layer wins over the one before; values are checked as `from_dict` does."""
        config = self
        if file:
            merged = self.to_dict()
            merged.update({k: v for k, v in file.items() if k != "data"})
            data = file.get("data") or {}  # not a mapping: from_dict says so
            merged["data"] = {**merged["data"], **data} if isinstance(data, Mapping) else data
            config = TrainConfig.from_dict(merged)
        data_fields = {f.name for f in dataclasses.fields(StreamConfig)}
        own_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data"}
        data = dataclasses.replace(
            config.data, **{k: v for k, v in options.items() if k in data_fields}
        )
        return dataclasses.replace(
            config, data=data, **{k: v for k, v in options.items() if k in own_fields}
        )

    def flat(self) -> dict[str, Any]:
        """`data.scale`-style keys: what MLflow logs as params."""
        flat = {k: v for k, v in self.to_dict().items() if k != "data"}
        flat.update({f"data.{k}": v for k, v in self.to_dict()["data"].items()})
        return flat


def paper(arch: str = "E", **overrides: Any) -> TrainConfig:
    """The paper's recipe for net `arch` at full size on ImageNet (Sect. 3.1). Net A trains at
    S = 256 from N(0, 0.01), the paper's start. The deep nets jitter S over [256, 512]; the
    paper initialised them from a trained net A (`init=<net A checkpoint>`, what `vgg-ray
    reproduce` does); without one they start from Glorot init, the paper's own alternative:
    N(0, 0.01) stalls nets this deep (their initial logits are ~1e-7, see `init_note`)."""
    scale = (256, 256) if arch in SHALLOW else PAPER_SCALE
    values: dict[str, Any] = dict(
        arch=arch, init="paper" if arch in SHALLOW else "glorot", data=StreamConfig(scale=scale)
    )
    values.update(overrides)
    return TrainConfig(**values)


def demo(arch: str = "E", **overrides: Any) -> TrainConfig:
    """A narrow net (1/16 width) on the small generated demo set: learns well above chance in a
    couple of minutes on a 2-core laptop (net E: about 30% top-1 error on 4 classes, chance
    75%). Same recipe otherwise, with images scaled down 7x (S in [36, 72], 32 px crops) and
    torchvision's Kaiming init: without batch norm, Glorot halves the signal at each of E's 16
    convs and the demo's few epochs would mostly be spent escaping that."""
    data = StreamConfig(scale=(36, 72), crop=32, shuffle_buffer=256)
    values: dict[str, Any] = dict(
        arch=arch, width=1 / 16, init="kaiming", base_init="kaiming", data=data, epochs=16,
        global_batch=32, lr=0.01, lr_patience=3, workers=1, log_every_steps=10,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


@dataclass(frozen=True)
class DataFacts:
    """What the `small` profile chooses its recipe from (`vgg_ray.data.data_facts`)."""

    classes: int
    train_images: int
    short_side: int
    """Median of the training images' smaller side, in pixels."""


def small(arch: str | None = None, *, facts: DataFacts, **overrides: Any) -> TrainConfig:
    """A recipe for one's own small data set (hundreds to tens of thousands of images), chosen
    from its image count and sizes; beyond the paper, and labelled so:
    - batch norm after every conv (torchvision's vgg*_bn) and Kaiming init: VGG without
      normalisation barely leaves chance on small data, whatever its init;
    - net A (VGG-11) under 20,000 images, else D; 1/4 width under 5,000 images, 1/2 under
      50,000, else full: capacity grows with the data;
    - 32 px crops for images under 72 px, else 64 (CPU-friendly; raise --crop on a GPU), with
      milder scale jittering than the paper's [8/7, 16/7] x crop: S in [8/7, 3/2] x crop. A
      small data set's objects often fill the frame; a crop of 44% of the side loses them;
    - global batch 64, lr 0.01 with a 3-epoch linear warm-up then a cosine, so the lr does not
      decay while the net is still at chance (0.05 made the FC layers, which have no batch
      norm, blow up after the warm-up); ~40,000 images seen (15-60 epochs).
    With trained weights at hand (`init=` a torchvision vgg*_bn file or a checkpoint), fine-tuning
    them is faster still (docs/training.md)."""
    images = facts.train_images
    crop = 32 if facts.short_side < 72 else 64
    scale = (round(crop * 8 / 7), round(crop * 3 / 2))
    values: dict[str, Any] = dict(
        arch=arch or ("A" if images < 20_000 else "D"),
        width=0.25 if images < 5_000 else 0.5 if images < 50_000 else 1.0,
        batch_norm=True, init="kaiming", base_init="kaiming",
        data=StreamConfig(scale=scale, crop=crop, shuffle_buffer=min(4096, images)),
        epochs=max(15, min(60, round(40_000 / max(images, 1)))),
        global_batch=64, lr=0.01, schedule="warmup_cosine", warmup_epochs=3,
        log_every_steps=20,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


FINETUNE = ("all", "fc")
LOCALISATION_LR = 1e-3  # Appendix A: the localisation nets' learning rate


PROFILES = {"paper": paper, "demo": demo, "small": small}
SHALLOW = ("A", "A-LRN")  # the nets the paper trained from N(0, 0.01) (Sect. 3.1)


def init_note(config: TrainConfig) -> str | None:
    """One line about the run's init where it matters: the paper's N(0, 0.01) on a deep net
    without batch norm stalls (Sect. 3.1, "bad initialisation can stall learning"; He et al.
    2015, Sect. 2.2: nets of more than 8 conv layers); Glorot is the paper's stated alternative."""
    if config.arch in SHALLOW or config.batch_norm:
        return None
    if config.init == "paper":
        return (
            f"warning: net {config.arch} from N(0, 0.01): the paper warns this init stalls deep "
            "nets (Sect. 3.1) and initialised them from a trained net A; pass --init <net A "
            "checkpoint or models:/ URI>, or --init glorot (the paper's alternative)"
        )
    if config.init == "glorot":
        return (
            f"net {config.arch} starts from Glorot init (the paper's alternative to initialising "
            "from a trained net A, Sect. 3.1); --init <net A checkpoint> for the paper's way"
        )
    return None
