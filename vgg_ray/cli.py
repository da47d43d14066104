"""`vgg-ray`: one command line over the library. Each subcommand parses, builds a config and
calls one function; user mistakes (`ConfigError`) print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vgg_ray.errors import ConfigError, redact

Command = Callable[[argparse.Namespace], int | None]
EVAL_MODES = ("single", "dense", "multicrop", "dense+multicrop")  # vgg_ray.evaluate.MODES
FEATURE_AGGREGATES = ("mean", "stack")  # vgg_ray.features.AGGREGATES


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage dump), still with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {redact(message)}\n")


def _tracking_option(add: Callable) -> None:
    add("--tracking-uri", type=_tracking_uri,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or local)")  # fmt: skip


def _s3_option(add: Callable) -> None:
    add("--s3-endpoint", type=_s3_endpoint,
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL[_S3])")  # fmt: skip


def _has_user_info(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return "@" in urlsplit(url if "://" in url else f"//{url}").netloc
    except ValueError:  # not a URL at all: the command's own check says what is wrong
        return False


def _s3_endpoint(text: str) -> str:
    """An S3 endpoint URL without credentials in it (they would show in `ps`, shell history
    and every message that names the endpoint)."""
    if _has_user_info(text):
        raise argparse.ArgumentTypeError(
            f"{redact(text)}: credentials do not go in the endpoint URL; set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY in the environment"
        )
    return text


def _tracking_uri(text: str) -> str:
    """An MLflow tracking URI; a server's (http, https) without credentials in it. A database
    URI (postgresql://user:pass@...) may carry them: MLflow has no other place for those."""
    if text.lower().startswith(("http://", "https://")) and _has_user_info(text):
        raise argparse.ArgumentTypeError(
            f"{redact(text)}: credentials do not go in the tracking URI; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"
        )
    return text


def _actor_options(add: Callable) -> None:
    """Where an evaluation runs: Ray Data's actor pool (evaluate, promote)."""
    add("--max-images", type=int, help="only the split's first N images")
    add("--actors", type=_at_least_one, help="evaluation actors (default: one per GPU, else "
        "per 2 CPUs)")  # fmt: skip
    add("--gpus-per-actor", type=_non_negative_float)
    add("--cpus-per-actor", type=float)
    add("--batch-size", type=int, help="images per batch sent to an actor (default 32)")


def _number(kind: type, least: float, note: str = "") -> Callable[[str], Any]:
    """An argparse type: a `kind` (int or float) of at least `least`; NaN is refused."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not value >= least:  # NaN too
            raise argparse.ArgumentTypeError(f"must be >= {least}{note}, got {text}")
        return value

    return parse


# A count given as 1 or more (omitting it takes the default); a count or seed of 0 or more; a
# resource amount (GPUs, CPUs) of 0 or more.
_at_least_one = _number(int, 1, " (omit it for the default)")
_non_negative = _number(int, 0)
_non_negative_float = _number(float, 0)


def _scale(text: str) -> tuple[int, int]:
    """ "256" (fixed S) or "256-512" / "256:512" (S jittered per image over the range)."""
    try:
        low, _, high = text.replace(":", "-").partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a scale or range like 256 or 256-512: {text!r}"
        ) from None


def _worker_range(text: str) -> tuple[int, int]:
    """ "4" (a fixed count) or "2-8" (elastic, 2 to 8) -> (most, fewest; 0 for a fixed count)."""
    low, dash, high = text.partition("-")
    try:
        most, fewest = (int(high), int(low)) if dash else (int(low), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a worker count like 4 or 2-8: {text!r}") from None
    if dash and fewest < 1:  # 0 would read as a fixed count; the config checks the rest
        raise argparse.ArgumentTypeError(f"workers must be >= 1: {text!r}")
    return most, fewest


def add_train_options(
    parser: argparse.ArgumentParser, *, arch: str | None = None, one_run: bool = True
) -> None:
    """The options of `vgg-ray train` and of every jobs/train_*.py (where arch is fixed); without
    `one_run` (the chain of `reproduce`), no --arch, --run-name, --resume, --scale and
    --eval-scale: each stage sets them."""
    from vgg_ray.config import TrainConfig
    from vgg_ray.data import StreamConfig
    from vgg_ray.models import CONFIGS

    add = parser.add_argument
    if arch is None and one_run:
        add("--arch", choices=list(CONFIGS), help="net of Table 1 (default E; small: chosen)")
    add(
        "--profile",
        choices=["demo", "paper", "small"],
        help="demo: narrow net on generated data (default without --manifest); "
        "paper: the paper's recipe at full size (default with --manifest); small: a recipe "
        "chosen for one's own small data set (batch norm; docs/training.md)",
    )
    add("--config", metavar="YAML", help="options from a YAML file (e.g. a Tune search's best)")
    add("--manifest", help="shards' manifest.json (local path or s3://...); default: demo data")
    _s3_option(add)
    add("--storage-path", help="checkpoints: local folder or s3://bucket/prefix")
    if one_run:
        add("--run-name", help="names the run; a stopped run continues with --resume")
        add("--resume", action="store_true", help="continue the run named by --run-name")
    add("--workers", type=_worker_range, help="Ray Train workers (one per GPU): 4, or 2-8 to "
        "train elastically on 2 to 8 (docs/training.md, spot capacity)")  # fmt: skip
    add("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs")
    add("--cpus-per-worker", type=float)
    add("--epochs", type=int)
    add("--global-batch", type=int, help="images per step over all workers (paper: 256)")
    add("--grad-accum", type=int, help="micro-batches per step, where memory is short")
    add("--lr", type=float, help="initial learning rate (paper: 0.01)")
    add("--weight-decay", type=float)
    add("--clip-grad-norm", type=float, help="clip each step's gradient to this L2 norm (0: off)")
    add("--max-nonfinite-steps", type=int, help="steps in a row with a non-finite gradient "
        "(each skipped) before the run stops as diverged (default 20)")  # fmt: skip
    if one_run:  # a chain's stages set their own net, scale and run name
        add("--scale", type=_scale, help="training scale S: 256, 384 or a jitter range 256-512")
        add("--eval-scale", type=int, help="validation scale Q")
    add("--crop", type=int, help="training crop size (paper: 224)")
    add("--width", type=float, help="multiplier on every layer's width (paper: 1)")
    add("--init", help="paper | glorot | trained net A checkpoint | models:/ URI | "
        "torchvision state_dict file")  # fmt: skip
    add("--decode", choices=["cpu", "gpu"], help="where JPEGs are decoded (gpu: nvjpeg)")
    add("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on GPU)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    add("--seed", type=int)
    add("--checkpoint-every-steps", type=int, help="also checkpoint inside epochs")
    add("--keep-best", type=int, help="checkpoints kept by val top-5 error (besides the latest)")
    add("--max-failures", type=int, help="worker failures recovered from (default 3)")
    _tracking_option(add)
    add("--experiment", help="MLflow experiment (default vgg-ray)")
    # Every other field of the run's config, its help the field's docstring.
    per_stage = set() if one_run else {"arch", "run_name", "scale", "eval_scale"}
    add_field_options(parser, TrainConfig, skip={"data", *per_stage})
    add_field_options(parser, StreamConfig, skip=per_stage)


def add_field_options(parser: argparse.ArgumentParser, cls: type, *, skip=()) -> None:
    """An option --field-name for each field of dataclass `cls` that has none yet; the value's
    type from the annotation, the help from the field's docstring, no default (None: not given,
    so the profile's or the YAML's value stands). Options written by hand for a field (a range
    check, another name) keep their parsing and get the docstring as help where they have none."""
    import dataclasses

    from vgg_ray.config import field_docs

    docs = field_docs(cls)
    by_dest = {action.dest: action for action in parser._actions}
    for spec in dataclasses.fields(cls):
        flag = "--" + spec.name.replace("_", "-")
        help_text = docs.get(spec.name, "").replace("%", "%%")
        if spec.name in by_dest or flag in parser._option_string_actions:
            if spec.name in by_dest and by_dest[spec.name].help is None:
                by_dest[spec.name].help = help_text
            continue
        if spec.name in skip:
            continue
        kind = str(spec.type)
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind.split(" ")[0] in ("int", "float", "str"):
            convert = {"int": int, "float": float, "str": str}[kind.split(" ")[0]]
            parser.add_argument(flag, type=convert, help=help_text)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def _config_of(cls: type, args: argparse.Namespace, *, tuples: Sequence[str] = (), skip=()):
    """A `cls` dataclass from the options given whose names are its fields; list options
    named in `tuples` become tuples (the dataclasses are frozen and hashable)."""
    options = _given(args)
    for name in set(tuples) & set(options):
        options[name] = tuple(options[name])
    return cls(**{k: v for k, v in options.items() if k in _field_names(cls) and k not in skip})


def _yaml_mapping(path: str, what: str) -> dict:
    """The mapping of options in YAML file `path`; ConfigError if unreadable or not a mapping."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}".splitlines()[0]) from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} options")
    return values


def _field_names(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _profile_name(args: argparse.Namespace) -> str:
    """--profile, else `paper` with --manifest (one's data set) and `demo` without."""
    return args.profile or ("paper" if args.manifest else "demo")


def _profile_config(profile: str, arch: str | None, args: argparse.Namespace):
    """The profile's config; `small` reads the data set's size first (the demo set without
    --manifest)."""
    import numpy as np

    from vgg_ray.config import PROFILES, DataFacts, small
    from vgg_ray.manifest import load_manifest, short_sides

    if profile != "small":
        return PROFILES[profile](arch or "E")
    uri = args.manifest or _demo_manifest()
    manifest = load_manifest(uri, s3_endpoint=args.s3_endpoint)
    sides = short_sides(manifest)
    facts = DataFacts(classes=len(manifest.classes), train_images=len(sides),
                      short_side=int(np.median(sides)) if len(sides) else 0)  # fmt: skip
    config = small(arch, facts=facts)
    config = replace(config, data=replace(config.data, manifest=uri))
    print(
        f"vgg-ray: small profile for {facts.train_images:,} training images of {facts.classes} "
        f"classes (median smaller side {facts.short_side} px): net {config.arch} with batch "
        f"norm at width {config.width:g}, {config.data.crop} px crops of S in "
        f"[{config.data.scale[0]}, {config.data.scale[1]}], {config.epochs} epochs",
        flush=True,
    )
    return config


def _demo_manifest() -> str:
    from vgg_ray.demo import ensure_demo_shards

    print("vgg-ray: no --manifest given: using the generated demo data set", flush=True)
    return ensure_demo_shards()


def train_config(args: argparse.Namespace):
    """Profile, then YAML file, then each option given on the command line."""

    profile = _profile_name(args)
    config = _profile_config(profile, getattr(args, "arch", None), args)
    yaml_values = _yaml_mapping(args.config, "training") if args.config else {}
    given = _given(args)
    if isinstance(given.get("workers"), tuple):  # --workers 4 or 2-8
        given["workers"], given["min_workers"] = given["workers"]
    config = config.merged(yaml_values, given)
    if not config.data.manifest:
        config = replace(config, data=replace(config.data, manifest=_demo_manifest()))
    if config.regression:
        config = _localisation_recipe(
            config, {**given, **yaml_values, **yaml_values.get("data", {})}
        )
    config = config.validate()
    if profile == "paper" and config.init == "glorot" and "init" not in {**given, **yaml_values}:
        config = _paper_net_a(config)
    return config


def _localisation_recipe(config, given: dict[str, Any]):
    """Appendix A's recipe where a localisation net's options leave it open: lr 1e-3 and a
    fixed training scale (the paper trained these nets at S = 256 and 384, no jittering: a
    jittered profile's Smin)."""
    from vgg_ray.config import LOCALISATION_LR

    if "lr" not in given:
        config = replace(config, lr=LOCALISATION_LR)
    low, high = config.data.scale
    if "scale" not in given and low != high:
        config = replace(config, data=replace(config.data, scale=(low, low)))
    return config


def _paper_net_a(config):
    """The paper's init of a deep net (Sect. 3.1), where a trained net A is registered."""
    from vgg_ray.train_job import registered_net_a

    if source := registered_net_a(config):
        print(
            f"vgg-ray: net {config.arch} starts from the registry's trained net A ({source}): "
            "its first four convs and three FCs, as in the paper (Sect. 3.1)",
            flush=True,
        )
        config = replace(config, init=source)
    return config


def _train(args: argparse.Namespace) -> None:
    from vgg_ray.train_job import train

    train(train_config(args), resume=args.resume)


def train_main(argv: Sequence[str], *, arch: str) -> int:
    """Entry point of jobs/train_<arch>.py: `vgg-ray train --arch <arch>`."""
    parser = Parser(
        prog=f"train_{arch.replace('-', '_')}.py",
        description=f"Train VGG net {arch} (Simonyan & Zisserman 2015) on Ray.",
    )
    add_train_options(parser, arch=arch)
    args = parser.parse_args(argv)
    args.arch, args.command, args.run = arch, "train", _train
    return _dispatch(args)


def add_reproduce_options(parser: argparse.ArgumentParser) -> None:
    """The options of `vgg-ray reproduce` and jobs/reproduce_paper.py: the chain's own, then the
    training options every stage shares."""
    add = parser.add_argument
    add("--name", help="names the chain; a rerun continues it (default: paper, or demo)")
    add("--nets", type=_choices(str), metavar="A,D,E", help="nets of the chain (default all six; "
        "the deep nets bring net A)")  # fmt: skip
    add("--stages", type=_choices(str), metavar="S,T", help="part of the plan: training scales "
        "(256, 384, jitter), kinds (train, eval, ensemble, register) or stage names")  # fmt: skip
    add("--max-concurrent", type=int, help="stages at once (default: one per --workers GPUs)")
    add("--resume", action="store_true", help="continue the chain named by --name (must exist)")
    add("--dry-run", action="store_true", help="print the plan and its cost; run nothing")
    add("--max-images", type=int, help="evaluate only the val split's first N images")
    add("--actors", type=int, help="evaluation actors (default: one per GPU, else per 2 CPUs)")
    add("--localisation", action="store_true", help="also Appendix A: net D's localisation nets "
        "at S = 256 and 384, Tables 8 and 9 (needs data prepared with --boxes)")  # fmt: skip
    add_train_options(parser, one_run=False)


DEMO_CHAIN_EPOCHS = 8  # a stage: the embedded default's 26 stages in 10-15 minutes on 2 cores


def reproduce_config(args: argparse.Namespace):
    """The chain's config: its own options, and the stages' base from `train_config`, built
    for net A (the chain's start: the paper profile's N(0, 0.01))."""
    from vgg_ray.reproduce import NETS, ReproduceConfig

    args.arch = "A"
    base = train_config(args)
    if _profile_name(args) == "demo" and args.epochs is None:
        base = replace(base, epochs=DEMO_CHAIN_EPOCHS)
    return ReproduceConfig(
        base=base, name=args.name or "", nets=tuple(args.nets or NETS),
        stages=tuple(args.stages or ()), max_concurrent=args.max_concurrent or 0,
        resume=args.resume, dry_run=args.dry_run, max_images=args.max_images or 0,
        actors=args.actors or 0, localisation=args.localisation,
    )  # fmt: skip


def _reproduce(args: argparse.Namespace) -> None:
    from vgg_ray.reproduce import reproduce

    reproduce(reproduce_config(args))


def reproduce_main(argv: Sequence[str]) -> int:
    """Entry point of jobs/reproduce_paper.py: `vgg-ray reproduce`."""
    parser = Parser(prog="reproduce_paper.py", description=REPRODUCE_HELP)
    add_reproduce_options(parser)
    args = parser.parse_args(argv)
    args.command, args.run = "reproduce", _reproduce
    return _dispatch(args)


REPRODUCE_HELP = ("The paper's experiment plan as one resumable chain: A -> B..E at S = 256 -> "
                  "384 -> jittered, Tables 3-6, the registry (docs/reproduce.md).")  # fmt: skip


def _models(args: argparse.Namespace) -> None:
    from vgg_ray.models import CONFIGS, summarize

    print(f"{'net':<6} {'weight layers':>13} {'parameters':>13} {'GMACs @224':>11}")
    for name in CONFIGS:
        net = summarize(name)
        print(
            f"{net.name:<6} {net.weight_layers:>13} {net.parameters:>13,} "
            f"{net.forward_macs / 1e9:>11.2f}"
        )


def _size(text: str) -> int:
    """ "256MB", "1GB", "512KiB" or plain bytes; K/M/G are powers of 1024."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        return int(float(number.removesuffix(unit)) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size like 256MB: {text!r}") from None


def _prepare(args: argparse.Namespace) -> None:
    from vgg_ray.prepare import PrepareConfig, prepare

    print(f"prepared {prepare(_config_of(PrepareConfig, args, tuples=['boxes'])).line()}")


def _verify(args: argparse.Namespace) -> None:
    from vgg_ray.manifest import load_manifest, verify_shards

    manifest = load_manifest(args.manifest, s3_endpoint=args.s3_endpoint)
    problems = verify_shards(manifest)
    shards = sum(len(shards) for shards in manifest.splits.values())
    if problems:
        raise ConfigError(f"{len(problems)} of {shards} shards do not match the manifest: "
                          + "; ".join(problems))  # fmt: skip
    print(f"all {shards} shards of {manifest.uri} match their size and sha256")


def _demo_data(args: argparse.Namespace) -> None:
    from vgg_ray.demo import NAMES_FILE, make_demo_tree

    root = make_demo_tree(
        args.dest,
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        oddities=args.oddities,
    )
    print(
        f"wrote a demo ImageNet tree to {root}; try: vgg-ray prepare {root} {root}-shards "
        f"--class-names {root / NAMES_FILE}"
    )


def _stack(args: argparse.Namespace) -> int | None:
    from vgg_ray import stack

    state_dir = Path(args.state_dir) if args.state_dir else stack.default_state_dir()
    if args.action == "up":
        config = replace(_config_of(stack.StackConfig, args, skip=("state_dir",)),
                         state_dir=state_dir)  # fmt: skip
        already = stack.load(state_dir) is not None
        if not already:
            print(f"vgg-ray stack: starting in {state_dir} (logs in logs/) ...", file=sys.stderr)
        # The exports go to stdout alone, so `eval "$(vgg-ray stack up)"` works.
        print(stack.up(config).exports(), end="", flush=True)
        print(
            f"vgg-ray stack: {'already ' if already else ''}up; `vgg-ray stack down` stops it",
            file=sys.stderr,
        )
    elif args.action == "down":
        stopped = stack.down(state_dir)
        print(f"vgg-ray stack: stopped {', '.join(stopped)}" if stopped else "no stack running")
    elif args.action == "status":
        alive = stack.status(state_dir)
        for name, up in alive.items():
            print(f"{name:<7} {'up' if up else 'DOWN'}")
        if not alive:
            print(f"no stack recorded in {state_dir}")
        return 0 if alive and all(alive.values()) else 1
    else:
        running = stack.load(state_dir)
        if running is None:
            raise ConfigError(f"no stack recorded in {state_dir}; run `vgg-ray stack up`")
        print(running.exports(), end="")


def _scale_set(text: str) -> tuple[int, ...]:
    """ "384" or "256,384,512": one set of test scales Q."""
    try:
        return tuple(int(q) for q in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not scales like 384 or 256,384,512: {text!r}") from None


def _evaluate(args: argparse.Namespace) -> None:
    from vgg_ray.evaluate_job import EvaluateConfig, evaluate

    evaluate(_config_of(EvaluateConfig, args, tuples=("models", "modes", "scales")))


def _localise(args: argparse.Namespace) -> None:
    from vgg_ray.localisation import LocaliseConfig, localise

    localise(_config_of(LocaliseConfig, args, tuples=("models", "scales")))


def _features(args: argparse.Namespace) -> None:
    from vgg_ray.features_job import FeaturesConfig, extract

    extract(_config_of(FeaturesConfig, args, tuples=("models",)))


def _probe(args: argparse.Namespace) -> None:
    from vgg_ray.probe import ProbeConfig, probe

    probe(_config_of(ProbeConfig, args, tuples=("features", "test")))


def _register(args: argparse.Namespace) -> None:
    from vgg_ray.registry import RegisterConfig, register_runs

    register_runs(_config_of(RegisterConfig, args, tuples=("runs", "scales")))


def _register_ensemble(args: argparse.Namespace) -> None:
    from vgg_ray.registry import EnsembleConfig, register_ensemble

    register_ensemble(_config_of(EnsembleConfig, args, tuples=("members", "scales")))


def _promote(args: argparse.Namespace) -> int:
    from vgg_ray.registry import PromoteConfig, promote

    decision = promote(_config_of(PromoteConfig, args, tuples=("scales",)))
    return 0 if decision.promoted else 1  # a refusal is an answer, but scripts must see it


def _rollback(args: argparse.Namespace) -> None:
    from vgg_ray.registry import rollback

    rollback(args.name, tracking_uri=args.tracking_uri or "")


def _range(text: str) -> tuple[float, float]:
    """ "0.01" (fixed) or "1e-3:1e-1" (sampled log-uniformly)."""
    try:
        low, _, high = text.partition(":")
        return float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a value or range like 1e-3:1e-1: {text!r}") from None


def _choices(kind: type) -> Callable[[str], tuple]:
    """ "a,b,c": a choice of values."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list like a,b,c: {text!r}") from None

    return parse


def add_tune_options(parser: argparse.ArgumentParser) -> None:
    """The options of `vgg-ray tune` and jobs/tune_schedule.py."""
    from vgg_ray.models import CONFIGS

    add = parser.add_argument
    add("--profile", choices=["demo", "paper"],
        help="demo: 4 small trials on generated data (default without --manifest); paper: "
        "around the paper's recipe at full size (default with --manifest)")  # fmt: skip
    add("--config", metavar="YAML", help="search options from a YAML file (docs/tune.md)")
    add("--arch", choices=list(CONFIGS), help="net of Table 1 (default A)")
    add("--manifest", help="shards' manifest.json (local path or s3://...); default: demo data")
    _s3_option(add)
    add("--scheduler", help="asha (default) or pbt")
    add("--num-samples", type=int, help="trials (PBT: population size)")
    add("--epochs", type=int, help="epochs per trial")
    add("--lr", type=_range, metavar="LOW:HIGH", help="initial lr range (log scale) or value")
    add("--weight-decay", type=_range, metavar="LOW:HIGH", help="range (log scale) or value")
    add("--schedule", type=_choices(str), metavar="A,B", help="schedule families to try: "
        "plateau, step, cosine, warmup_cosine")  # fmt: skip
    add("--lr-factor", type=_choices(float), metavar="F,G", help="decay factors to try")
    add("--lr-patience", type=_choices(int), metavar="P,Q", help="plateau patiences to try")
    add("--global-batch", type=_choices(int), metavar="B,C", help="global batch sizes to try")
    add("--workers", type=int, help="Ray Train workers per trial (one per GPU)")
    add("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs")
    add("--cpus-per-worker", type=float)
    add("--max-concurrent-trials", type=int, help="default: what the cluster's resources hold")
    add("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    add("--reduction-factor", type=float, help="ASHA: 1/factor of the trials go on per rung")
    add("--perturbation-interval", type=int, help="PBT: epochs between perturbations")
    add("--pbt-synch", action="store_true", default=None,
        help="PBT: synchronous steps (every trial waits for the population)")  # fmt: skip
    add("--max-failures", dest="trial_max_failures", type=int,
        help="restarts of a failed trial (default 2)")  # fmt: skip
    add("--seed", type=_non_negative, help="seeds the sampling of trials")
    add("--name", help="names the search; an interrupted one continues with --resume")
    add("--resume", action="store_true", help="continue the search named by --name")
    add("--storage-path", help="Tune's experiment and trial checkpoints: folder or s3://...")
    add("--tracking-uri", type=_tracking_uri, help="MLflow server (http://...) or sqlite:/// "
        "database (served by a local mlflow server for the search); default: "
        "MLFLOW_TRACKING_URI or local")  # fmt: skip
    add("--experiment", help="MLflow experiment (default vgg-ray)")
    add("--best-config", help="where to write the best config (YAML for train --config)")


def search_config(args: argparse.Namespace):
    """Profile, then YAML file, then each option given on the command line."""

    from vgg_ray.config import TrainConfig
    from vgg_ray.data import StreamConfig
    from vgg_ray.tune import PROFILES, SearchConfig, SearchSpace

    profile = args.profile or ("paper" if args.manifest else "demo")
    config = PROFILES[profile](args.arch or "A")
    if args.config:
        config = SearchConfig.from_dict(_yaml_mapping(args.config, "search"), config)
    given = _given(args)

    def of(cls: type, *, skip: set[str] = set()) -> dict[str, Any]:  # noqa: B006 (not mutated)
        """The options given that are fields of `cls` (each option has one home: the search's
        own first, then the space's, then the training run's, then its data's)."""
        return {k: given[k] for k in (_field_names(cls) - skip) & set(given)}

    search, space = of(SearchConfig, skip={"train", "space"}), of(SearchSpace)
    train_options = of(TrainConfig, skip={"data"} | set(search) | set(space))
    data = replace(config.train.data, **of(StreamConfig, skip=set(search) | set(train_options)))
    train = replace(config.train, data=data, **train_options)
    config = replace(config, train=train, space=replace(config.space, **space), **search)
    if not config.train.data.manifest:
        from vgg_ray.demo import ensure_demo_shards

        print("vgg-ray: no --manifest given: using the generated demo data set", flush=True)
        manifest = ensure_demo_shards()
        config = replace(config, train=replace(train, data=replace(data, manifest=manifest)))
    return config.validate()


def _tune(args: argparse.Namespace) -> None:
    from vgg_ray.tune import search

    search(search_config(args), resume=args.resume)


def tune_main(argv: Sequence[str]) -> int:
    """Entry point of jobs/tune_schedule.py: `vgg-ray tune`."""
    parser = Parser(
        prog="tune_schedule.py",
        description="Search learning-rate schedules for a VGG net with Ray Tune.",
    )
    add_tune_options(parser)
    args = parser.parse_args(argv)
    args.command, args.run = "tune", _tune
    return _dispatch(args)


def _prepare_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("src", help="folder holding train/<wnid>/*.JPEG and optionally val/")
    add("dest", help="output folder or s3://bucket/prefix")
    add("--val-labels", metavar="FILE", help="labels for flat val/: LOC_val_solution.csv "
        "or 'filename wnid' lines")  # fmt: skip
    add("--class-names", metavar="FILE", help="LOC_synset_mapping.txt-style class names")
    add("--boxes", metavar="PATH", action="append", help="bounding boxes (localisation): "
        "LOC_train_solution.csv, or a folder of PASCAL-VOC XML (Annotations/CLS-LOC); repeat "
        "for several. A Kaggle --val-labels file gives the val boxes too")  # fmt: skip
    _s3_option(add)
    add("--shard-size", type=_size, help="target shard size (default 256MB)")
    add("--row-group-rows", type=int, help="rows per Parquet row group (default 256)")
    add("--workers", type=int, help="worker processes (default: CPU count)")
    add("--seed", type=_non_negative, help="shuffle and stats-sample seed (default 0)")
    add("--stats-sample", type=_at_least_one, help="images for mean RGB and PCA (default 10000)")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bar on stderr (e.g. in logs)")  # fmt: skip
    from vgg_ray.prepare import PrepareConfig

    add_field_options(parser, PrepareConfig)


def _verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="manifest.json or its folder (local or s3://)")
    parser.add_argument("--s3-endpoint", type=_s3_endpoint, help="S3-compatible endpoint URL")


def _demo_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", help="folder to write train/, val/ and class names into")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=25)
    parser.add_argument("--seed", type=_non_negative, default=0)
    parser.add_argument("--oddities", action="store_true", help="add CMYK, PNG, truncated, ...")


def _stack_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("action", choices=["up", "down", "status", "env"])
    add("--state-dir", help="pids, logs, MLflow database (default: $VGG_RAY_HOME/stack)")
    add("--s3-port", type=int, help="S3 endpoint (default 9000)")
    add("--mlflow-port", type=int, help="MLflow server (default 5000)")
    add("--ray-port", type=int, help="Ray GCS (default 6379)")
    add("--dashboard-port", type=int, help="Ray dashboard and job API (default 8265)")
    add("--client-port", type=int, help="Ray Client server (default 10001)")
    add("--agent-port", type=int, help="Ray dashboard agent (default 52365)")
    add("--num-cpus", type=_at_least_one, help="logical CPUs of the Ray head (default: at least 4)")
    add("--bucket", help="bucket created on the S3 endpoint (default vgg-ray)")
    add("--no-token-auth", dest="token_auth", action="store_false", default=None,
        help="Ray without token authentication (loopback only anyway)")  # fmt: skip
    from vgg_ray.stack import StackConfig

    add_field_options(parser, StackConfig, skip={"host"})


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", dest="models", action="append", metavar="SOURCE",
        help="checkpoint (folder, state.pt, s3://), runs:/<id>, run id, models:/name/version or "
        "models:/name@alias; repeat for an ensemble")  # fmt: skip
    add("--mode", dest="modes", action="append", choices=list(EVAL_MODES),
        help="repeatable; default: all four")  # fmt: skip
    add("--scales", action="append", type=_scale_set, metavar="Q[,Q...]",
        help="test scales, e.g. 256,384,512; repeatable; default: the paper's per net")  # fmt: skip
    add("--no-members", dest="members", action="store_false", default=None,
        help="with several models, only the ensemble's rows")  # fmt: skip
    _inference_options(add, tables=True)
    from vgg_ray.evaluate_job import EvaluateConfig

    add_field_options(parser, EvaluateConfig)


def _inference_options(add: Callable, *, tables: bool = False) -> None:
    """What every job that runs nets over images takes (evaluate, localise, features): the
    actor pool, S3, MLflow; with `tables`, --no-mlflow for the tables it logs."""
    _actor_options(add)
    _s3_option(add)
    _tracking_option(add)
    if tables:
        add("--no-mlflow", dest="log_to_mlflow", action="store_false", default=None,
            help="log nothing to MLflow; the tables are written to --output only")  # fmt: skip


def _localise_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", dest="models", action="append", metavar="SOURCE",
        help="localisation net (`vgg-ray train --regression pcr`): checkpoint, runs:/<id>, run "
        "id or models:/; repeat for their fusion")  # fmt: skip
    add("--classifier", metavar="SOURCE", help="classification net rating protocol 2's boxes "
        "(its top-5 classes); without it, protocol 1 only")  # fmt: skip
    add("--protocol", dest="protocols", action="append", type=int, choices=[1, 2],
        help="1: centre crop, ground-truth class (Table 8); 2: dense, top-5 (Table 9); "
        "repeatable; default both (1 without --classifier)")  # fmt: skip
    add("--scales", action="append", type=_scale_set, metavar="Q[,Q...]",
        help="protocol 2: rows at these test scales too, e.g. 352,384 (besides each net's S); "
        "repeatable")  # fmt: skip
    _inference_options(add, tables=True)
    from vgg_ray.localisation import LocaliseConfig

    add_field_options(parser, LocaliseConfig)


def _features_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", dest="models", action="append", metavar="SOURCE",
        help="checkpoint, runs:/<id>, run id, models:/name/version|@alias (an ensemble: its "
        "members), or a torchvision VGG state_dict; repeat to stack several nets")  # fmt: skip
    add("--scales", type=_scale_set, metavar="Q[,Q...]",
        help="scales Q, e.g. 256,384,512 (default: these, scaled to the net's crop)")  # fmt: skip
    add("--aggregate", choices=list(FEATURE_AGGREGATES))
    add("--shard-size", type=_at_least_one)
    _inference_options(add)
    from vgg_ray.features_job import FeaturesConfig

    add_field_options(parser, FeaturesConfig)


def _probe_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--features", action="append", metavar="FOLDER",
        help="features written by `vgg-ray features` (local or s3://); repeatable")  # fmt: skip
    add("--test", action="append", metavar="FOLDER",
        help="test features; repeatable (default: a split of --features)")  # fmt: skip
    add("--classifier", choices=["svm", "logreg"])
    add("--c-values", type=_positive_floats, metavar="C[,C...]")
    add("--train-per-class", type=_at_least_one)
    add("--splits", type=_at_least_one)
    add("--no-mlflow", dest="log_to_mlflow", action="store_false", default=None,
        help="log nothing to MLflow; the results are written to --output only")  # fmt: skip
    _s3_option(add)
    _tracking_option(add)
    from vgg_ray.probe import ProbeConfig

    add_field_options(parser, ProbeConfig)


def _positive_floats(text: str) -> tuple[float, ...]:
    """ "0.1,1,10": positive numbers."""
    try:
        values = tuple(float(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers like 0.1,1,10: {text!r}") from None
    if not all(v > 0 for v in values):  # NaN too
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return values


def _register_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--run", dest="runs", action="append", metavar="RUN",
        help="training run id or runs:/<id>; repeatable")  # fmt: skip
    _tracking_option(add)
    add("--s3-endpoint", type=_s3_endpoint, help="S3-compatible endpoint URL, for a manifest "
        "on S3")  # fmt: skip
    add("--scales", type=_scale_set, metavar="Q[,Q...]", help="a localisation model's default "
        "test scales (default: the net's S)")  # fmt: skip
    from vgg_ray.registry import RegisterConfig

    add_field_options(parser, RegisterConfig, skip={"alias"})  # champion: only promote


def _register_ensemble_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--member", dest="members", action="append", metavar="SOURCE",
        help="models:/vgg-D@champion, models:/vgg-D/3, runs:/<id>, run id or checkpoint; "
        "repeatable")  # fmt: skip
    add("--mode", choices=list(EVAL_MODES), help="default predict mode (default single)")
    add("--scales", type=_scale_set, metavar="Q[,Q...]",
        help="default predict test scales (default: the paper's per net)")  # fmt: skip
    _tracking_option(add)
    _s3_option(add)
    from vgg_ray.registry import EnsembleConfig

    add_field_options(parser, EnsembleConfig, skip={"alias"})


def _promote_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("name", help="registered model, e.g. vgg-DE")
    add("--mode", choices=list(EVAL_MODES), help="evaluation mode of both (default dense)")
    add("--scales", type=_scale_set, metavar="Q[,Q...]",
        help="test scales for both (default: the paper's per net)")  # fmt: skip
    _actor_options(add)
    add("--no-mlflow", dest="log_evaluations", action="store_false", default=None,
        help="do not log the evaluations' tables to MLflow (evidence tags still are)")  # fmt: skip
    _tracking_option(add)
    _s3_option(add)
    from vgg_ray.registry import PromoteConfig

    add_field_options(parser, PromoteConfig)


def _rollback_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model, e.g. vgg-DE")
    _tracking_option(parser.add_argument)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vgg-ray", description="Train and evaluate the VGG family on Ray.")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for name, help_text, add_options, run in _commands():
        command = commands.add_parser(name, help=help_text)
        if add_options:
            add_options(command)
        command.set_defaults(run=run)
    return parser


def _commands() -> list[tuple[str, str, Callable | None, Callable]]:
    """Every `vgg-ray` command: (name, help, the function adding its options, what it runs)."""
    return [
        ("train", "train a net on Ray (the paper's recipe)", add_train_options, _train),
        ("reproduce", REPRODUCE_HELP, add_reproduce_options, _reproduce),
        ("models", "the six nets of Table 1: layers, size, cost", None, _models),
        (
            "prepare",
            "an ImageNet-style tree into Parquet shards + manifest (docs/data.md)",
            _prepare_options,
            _prepare,
        ),
        (
            "verify",
            "check every shard's size and sha256 against the manifest",
            _verify_options,
            _verify,
        ),
        ("demo-data", "write the small generated demo tree", _demo_data_options, _demo_data),
        (
            "stack",
            "one-machine Ray head + S3 endpoint + MLflow server (docs/cluster.md)",
            _stack_options,
            _stack,
        ),
        (
            "evaluate",
            "the paper's test protocol: dense, multi-crop, multi-scale, ensembles",
            _evaluate_options,
            _evaluate,
        ),
        (
            "localise",
            "localisation nets' Tables 8 and 9: centre crop, dense + merged boxes (Appendix A)",
            _localise_options,
            _localise,
        ),
        (
            "features",
            "the paper's image descriptors of an image set, as Parquet (Appendix B)",
            _features_options,
            _features,
        ),
        (
            "probe",
            "a linear SVM on extracted features: accuracy, mean class recall, mAP",
            _probe_options,
            _probe,
        ),
        ("tune", "search lr schedules with Ray Tune (docs/tune.md)", add_tune_options, _tune),
        (
            "register",
            "register trained nets from their MLflow runs (docs/registry.md)",
            _register_options,
            _register,
        ),
        (
            "register-ensemble",
            "register an ensemble (D+E, Table 6) as one pyfunc model",
            _register_ensemble_options,
            _register_ensemble,
        ),
        (
            "promote",
            "evaluate @challenger vs @champion; move @champion only if better",
            _promote_options,
            _promote,
        ),
        (
            "rollback",
            "move @champion back to the version it replaced",
            _rollback_options,
            _rollback,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # A fresh SQLite store announces its table creation on stderr; an error must stay one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already printed as one line
        return exit.code if isinstance(exit.code, int) else 2
    return _dispatch(args)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a command as Ctrl-C does: runs marked, servers stopped


def _dispatch(args: argparse.Namespace) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.run(args) or 0
    except ConfigError as error:  # redacted: a URL's password never comes back
        print(f"vgg-ray {args.command}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vgg-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
