"""`vgg-ray evaluate`: the paper's test protocol (`vgg_ray.evaluate`) over a split's shards with
Ray Data batch inference, results as tables in MLflow.

```
nets (checkpoint | runs:/ | run id | models:/) --load, check classes--> ray.put
val pieces --read_records (CPU tasks: JPEG bytes)--> EvalActor pool (GPU, else CPU): decode,
    every protocol's top-5 per image --> driver: Tally --> table.md/.csv, per_class.csv, MLflow
```
Each actor holds every net (an ensemble's soft-max average needs all of them per image) and
returns only the top-5 class indices per image and protocol, so what reaches the driver is
tiny whatever the class count. Counts are summed on the driver: the result is the same for any
batch size and actor count.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from vgg_ray import tracking
from vgg_ray.data import epoch_order, read_records
from vgg_ray.errors import ConfigError, require, user_error
from vgg_ray.evaluate import (
    MODES,
    Evaluator,
    NetInfo,
    Protocol,
    ResultRow,
    Tally,
    per_class_csv,
    protocols,
    result_rows,
    table_csv,
    table_markdown,
)
from vgg_ray.manifest import Manifest, check_shards, load_manifest, shard_sizes
from vgg_ray.models import VGG, vgg_for_state_dict
from vgg_ray.transforms import PAPER_SCALE, ColorStats, decode_cpu, decode_gpu

JobConfig = TypeVar("JobConfig")  # a job's config: a dataclass with tracking_uri and output


@dataclass(frozen=True, kw_only=True)
class Inference:
    """Where a job that runs trained nets over images computes (evaluate, localise, features):
    Ray Data's read tasks and actor pool (`batch_inference`)."""

    actors: int = 0
    """Inference actors; 0 = one per GPU of the cluster, else one per 2 CPUs."""
    gpus_per_actor: float | None = None
    """None: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each inference actor holds."""
    read_cpus: float = 0.5
    """Logical CPUs of each reading task (they only read bytes)."""
    batch_size: int = 32
    """Images per Ray batch handed to an actor."""
    max_crops: int = 64
    """Inputs per forward pass (memory only; results do not depend on it)."""
    bf16: bool | None = None
    """bf16 autocast; None: on GPU actors."""

    def inference_checks(self) -> list[tuple[bool, str]]:
        """The (condition, message) pairs of these options, for `errors.require`."""
        return [
            (self.actors >= 0, "actors must be >= 0"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.max_crops >= 1, f"max crops must be >= 1, got {self.max_crops}"),
            (self.cpus_per_actor > 0 and self.read_cpus > 0, "CPUs per actor/task must be > 0"),
        ]

    @property
    def actor_options(self) -> dict[str, Any]:
        """What every inference actor's constructor takes from these options."""
        return {"max_crops": self.max_crops, "bf16": self.bf16,
                "threads": max(1, int(self.cpus_per_actor))}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Inference):
    """One evaluation: which nets, on which data, under which protocols, on what compute."""

    models: tuple[str, ...] = ()
    """Each a vgg-ray checkpoint (folder, state.pt, s3://), `runs:/<id>`, a run id, or
    `models:/name/version` / `models:/name@alias`. Several: also their ensemble."""
    manifest: str = ""
    """The shards' manifest (local or s3://); "" = the one the first net was trained on."""
    split: str = "val"
    """The manifest's split to evaluate."""
    s3_endpoint: str | None = None
    """For data or checkpoints on S3; default AWS_ENDPOINT_URL(_S3) or AWS."""
    modes: tuple[str, ...] = MODES
    """Any of single, dense, multicrop, dense+multicrop (Sect. 3.2)."""
    scales: tuple[tuple[int, ...], ...] = ()
    """Test scale sets Q, each applied to every mode; () = the paper's defaults per net: Q = S
    (or (Smin+Smax)/2) for single, {S-32, S, S+32} (or {Smin, mid, Smax}) for the others."""
    members: bool = True
    """With several nets: also a row per net, besides the ensemble's."""
    only_rows: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Keep only these (mode, test scales) rows of modes x scales; () = every row."""
    max_images: int = 0
    """Evaluate only the split's first N images (0: all)."""
    tracking_uri: str = ""
    """MLflow; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    experiment: str = "vgg-ray"
    """For runs this job creates (ensembles, nets without a training run)."""
    log_to_mlflow: bool = True
    """Log the tables to MLflow: to the nets' training runs, or a new run for an ensemble."""
    output: str = ""
    """Local folder for table.md, table.csv, per_class.csv; "" = <home>/evaluations/<time>."""
    progress_every: int = 1000
    """Print a progress line every this many images."""

    def validate(self) -> EvaluateConfig:
        checks = [
            (bool(self.models), "no model given: pass --model (a checkpoint, run or models:/)"),
            (bool(self.modes), "no evaluation mode given"),
            (all(m in MODES for m in self.modes),
             f"unknown mode in {self.modes}; choose from {', '.join(MODES)}"),
            (all(s and all(q >= 1 for q in s) for s in self.scales),
             f"test scales must be positive integers, got {self.scales}"),
            (self.max_images >= 0, "max_images must be >= 0"),
            *self.inference_checks(),
            (self.progress_every >= 1, "progress_every must be >= 1"),
        ]  # fmt: skip
        require(checks)
        return self


@dataclass(frozen=True)
class EvaluationResult:
    rows: list[ResultRow]
    output: str  # the local folder holding the tables
    mlflow_runs: dict[str, str] = field(default_factory=dict)  # run id -> what was logged there
    skipped: int = 0  # records that did not decode
    mlflow_tables: str = ""  # the artifact folder of this evaluation in each run, "" if unlogged


# --- loading nets --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedNet:
    model: VGG
    info: NetInfo


def _stats(values: dict | None) -> ColorStats | None:
    if not values:
        return None
    return ColorStats(
        mean_rgb=tuple(values["mean_rgb"]),
        eigval=tuple(values["eigval"]),
        eigvec=tuple(tuple(row) for row in values["eigvec"]),
    )


def info_from_state(state: dict, source: str, run_id: str | None) -> NetInfo:
    config = state.get("config", {})
    data = config.get("data", {})
    return NetInfo(
        name=state["arch"],
        crop=int(data.get("crop", 224)),
        train_scale=tuple(int(s) for s in data.get("scale", PAPER_SCALE)),
        normalize=data.get("normalize", "paper"),
        stats=_stats(state.get("data_stats")),
        classes=tuple(state.get("classes", ())),
        source=source,
        run_id=run_id,
        manifest=data.get("manifest", ""),
        regression=config.get("regression", ""),
        finetune=config.get("finetune", "all"),
    )


def _client(tracking_uri: str):
    """A client pinned to `tracking_uri` for tracking and registry, also set for the fluent API:
    `models:/` and `runs:/` downloads (`checkpoint.load_logged_state`) resolve through MLflow's
    process-wide URIs, which may still name another store."""
    from vgg_ray.tracking import open_client, use_store

    client = open_client(tracking_uri)
    if tracking_uri:
        use_store(tracking_uri)
    return client


def _checkpoint_run(state: dict, tracking_uri: str) -> str | None:
    """The MLflow run a training checkpoint came from: tag `vgg_ray.run_name` in its
    experiment. None when there is none (or MLflow is unreachable: evaluation goes on)."""
    config = state.get("config", {})
    if not config.get("run_name"):
        return None
    try:
        client = _client(tracking_uri)
        experiment = client.get_experiment_by_name(config.get("experiment", "vgg-ray"))
        if experiment is None:
            return None
        tags = {"vgg_ray.run_name": config["run_name"]}
        runs = tracking.runs_tagged(client, [experiment.experiment_id], tags, max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception:  # a checkpoint without a reachable run is still evaluated
        return None


def _mlflow_model(uri: str, run, source: str) -> LoadedNet:
    """A net logged by vgg-ray (`runs:/<id>/<path>` or `models:/`), from the weights-only state
    it carries: a model is never unpickled."""
    from vgg_ray.checkpoint import load_logged_state, model_from_state

    state = load_logged_state(uri)
    info = info_from_state(state, source, run.info.run_id if run is not None else None)
    return LoadedNet(model_from_state(state).eval(), info)


def load_net(source: str, *, tracking_uri: str, s3_endpoint: str | None = None) -> LoadedNet:
    """One net from a checkpoint path, `runs:/<id>[/path]`, a run id, or a `models:/` URI; or
    from a plain state_dict file (torchvision's vgg11/13/16/19[_bn] weights: their input
    normalisation, 224 crops)."""
    from vgg_ray.checkpoint import load_trained

    if source.startswith("models:/"):
        client = _client(tracking_uri)
        version = tracking.model_version(client, source)
        run = client.get_run(version.run_id) if version.run_id else None
        return _mlflow_model(source, run, source)
    run_id = tracking.source_run_id(source)
    path = source.removeprefix("runs:/").partition("/")[2] if source.startswith("runs:/") else ""
    if run_id is None:  # a checkpoint
        model, state = load_trained(source, s3_endpoint=s3_endpoint)
        if model is None and "model" in state:  # a plain state_dict: torchvision's weights
            name, model = vgg_for_state_dict(state["model"], source)
            return LoadedNet(model.eval(), NetInfo(name=name, normalize="torchvision",
                                                   source=source))  # fmt: skip
        if model is None or "arch" not in state:
            raise ConfigError(f"{source} carries no net description (arch, classes): evaluate a "
                              "vgg-ray checkpoint, run or registered model")  # fmt: skip
        return LoadedNet(
            model.eval(), info_from_state(state, source, _checkpoint_run(state, tracking_uri))
        )
    run = tracking.get_run(_client(tracking_uri), run_id)
    checkpoint = run.data.tags.get("best_checkpoint")
    if not path and checkpoint:  # the full state: carries the data statistics too
        model, state = load_trained(checkpoint, s3_endpoint=s3_endpoint)
        if model is not None:
            return LoadedNet(model.eval(), info_from_state(state, source, run_id))
    return _mlflow_model(f"runs:/{run_id}/{path or 'model'}", run, source)


def check_classes(net: LoadedNet, manifest: Manifest) -> None:
    """ConfigError unless the net's outputs are the manifest's classes, in order."""
    check_wnids(net, manifest)
    count, expected = net.model.num_classes, len(manifest.classes)
    if count != expected:
        raise ConfigError(
            f"model {net.info.source} has {count} classes but manifest {manifest.uri} has "
            f"{expected}: it was trained on another data set"
        )


def check_wnids(net: LoadedNet, manifest: Manifest) -> None:
    """ConfigError unless the classes the net was trained on are the manifest's, in order."""
    if net.info.classes and tuple(net.info.classes) != manifest.wnids:
        if len(net.info.classes) != len(manifest.wnids):
            raise ConfigError(f"model {net.info.source} has {len(net.info.classes)} classes but "
                              f"manifest {manifest.uri} has {len(manifest.wnids)}: it was "
                              "trained on another data set")  # fmt: skip
        first = next(i for i, (a, b) in enumerate(zip(net.info.classes, manifest.wnids,
                                                      strict=True)) if a != b)  # fmt: skip
        raise ConfigError(
            f"model {net.info.source}'s classes differ from manifest {manifest.uri}'s (index "
            f"{first}: {net.info.classes[first]} vs {manifest.wnids[first]})"
        )


def load_nets(config: EvaluateConfig) -> tuple[list[LoadedNet], Manifest]:
    """The nets, checked against the manifest (the given one, or the first net's)."""
    nets = [load_net(s, tracking_uri=config.tracking_uri, s3_endpoint=config.s3_endpoint)
            for s in config.models]  # fmt: skip
    for net in nets:
        if net.info.regression:
            raise ConfigError(f"model {net.info.source} is a localisation net (Appendix A): "
                              "evaluate it with `vgg-ray localise`")  # fmt: skip
    uri = config.manifest or nets[0].info.manifest
    if not uri:
        raise ConfigError(f"no --manifest given and {config.models[0]} does not name the data "
                          "it was trained on")  # fmt: skip
    manifest = load_manifest(uri, s3_endpoint=config.s3_endpoint)
    shards = manifest.shards(config.split)  # an unknown or empty split fails here, before work
    # The split's shards there, of their size and readable, before Ray starts: a truncated
    # one is one line naming it, not a failed Ray Data task minutes in.
    check_shards(dataclasses.replace(manifest, splits={config.split: shards}))
    # Names: the arch, made unique within the ensemble ("D", "E", "D#2").
    seen: dict[str, int] = {}
    for i, net in enumerate(nets):
        info = net.info
        seen[info.name] = seen.get(info.name, 0) + 1
        if seen[info.name] > 1:
            info = dataclasses.replace(info, name=f"{info.name}#{seen[info.name]}")
        if info.stats is None:  # no statistics in the net's metadata: the data set's
            info = dataclasses.replace(info, stats=manifest.stats)
        nets[i] = LoadedNet(net.model, info)
        check_classes(nets[i], manifest)
    return nets, manifest


# --- the Ray side --------------------------------------------------------------------------


def actor_device(threads: int) -> torch.device:
    """A batch-inference actor's device: its GPU where Ray gave it one (Ray sets
    CUDA_VISIBLE_DEVICES for GPU actors), else the CPU with `threads` threads (not the whole
    node's cores in every actor)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(threads)
    return torch.device("cpu")


def decode_on(device: torch.device, data: list[bytes]) -> list[torch.Tensor | None]:
    """JPEG bytes to uint8 RGB tensors on `device` (nvjpeg on a GPU); None where one fails."""
    return decode_gpu(data, device) if device.type == "cuda" else decode_cpu(data)


class EvalActor:
    """A Ray Data actor: holds every net on its device; per batch, decodes the JPEGs there and
    returns each protocol's top-5 per image (label -1 where a record did not decode)."""

    def __init__(self, nets_ref: list, rows: list[Protocol], max_crops: int, bf16: bool | None,
                 threads: int):  # fmt: skip
        import ray

        nets: list[LoadedNet] = ray.get(nets_ref[0])
        self.device = actor_device(threads)
        on_gpu = self.device.type == "cuda"
        self.evaluator = Evaluator(
            [n.model for n in nets], [n.info for n in nets], rows, device=self.device,
            max_crops=max_crops, bf16=on_gpu if bf16 is None else bf16, channels_last=on_gpu,
        )  # fmt: skip
        self.k = min(5, self.evaluator.num_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = list(batch["image"])
        images = decode_on(self.device, data)
        good = [i for i, image in enumerate(images) if image is not None]
        top_k = np.full((len(data), len(self.evaluator.rows), self.k), -1, np.int64)
        if good:
            top_k[good] = self.evaluator.top_k([images[i] for i in good])
        label = np.where([image is not None for image in images], batch["label"], -1)
        return {"key": batch["key"], "label": label.astype(np.int64), "top_k": top_k}


def read_kwargs(manifest: Manifest, *, boxes: bool = False) -> dict[str, Any]:
    """`read_records`' arguments for the manifest's shards (with `boxes`: their boxes too)."""
    return {"manifest_uri": manifest.uri, "s3_endpoint": manifest.s3_endpoint,
            "base": manifest.base, "sizes": shard_sizes(manifest),
            "classes": len(manifest.classes), "boxes": boxes}  # fmt: skip


def _pieces(
    manifest: Manifest, split: str, max_images: int, *, boxed: bool = False
) -> list[dict[str, Any]]:
    """The split's first `max_images` (0: all) in manifest order, as read tasks (`boxed`: of
    its shards with boxes)."""
    order = epoch_order(manifest, split, seed=0, epoch=0, training=False, boxed=boxed)
    pieces, left = [], max_images or sum(p.stop - p.start for p in order)
    for piece in order:
        if left <= 0:
            break
        take = min(left, piece.stop - piece.start)
        pieces.append({**piece.__dict__, "stop": piece.start + take})
        left -= take
    return pieces


def actor_pool(actors: int, gpus_per_actor: float | None) -> tuple[int, float]:
    """(actors, GPUs each) for batch inference on the connected cluster: by default one actor
    per GPU where there are GPUs, else one per 2 CPUs (the rest read and decode)."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = (1 if cluster_gpus >= 1 else 0) if gpus_per_actor is None else gpus_per_actor
    if actors:
        return actors, gpus
    if gpus:
        return max(1, int(cluster_gpus // gpus)), gpus
    return max(1, int(ray.cluster_resources()["CPU"]) // 2), gpus


def batch_inference(
    items: list[dict[str, Any]],
    read: Callable,
    read_kwargs: dict[str, Any],
    actor: type,
    actor_kwargs: dict[str, Any],
    options: Inference,
    pool: tuple[int, float],
) -> Iterator[dict[str, np.ndarray]]:
    """The batch-inference pipeline of every job that runs trained nets over images (evaluate,
    localise, features): `items`, one read task each, -> `read` (CPU tasks) -> a pool of
    `actor`s (`pool`: how many, GPUs each; `actor_pool`), built with `actor_kwargs` and the
    `options`' actor options -> numpy batches, in no fixed order."""
    import ray
    import ray.data

    actors, gpus = pool
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, num_cpus=options.read_cpus, fn_kwargs=read_kwargs,
    ).map_batches(
        actor, batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus, num_cpus=options.cpus_per_actor,
        fn_constructor_kwargs={**actor_kwargs, **options.actor_options},
    )  # fmt: skip
    dataset.context.enable_progress_bars = False
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


class Progress:
    """One line "<job>: done/total images[, extra], rate img/s" every `every` images and at the
    end, on stdout (what `ray job logs` shows)."""

    def __init__(self, job: str, total: int, every: int):
        self.job, self.total, self.every = job, total, every
        self.done, self.started, self.next = 0, time.perf_counter(), every

    def add(self, count: int, extra: str = "") -> None:
        self.done += count
        if self.done >= self.next or self.done == self.total:
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            extra = f", {extra}" if extra else ""
            print(f"vgg-ray {self.job}: {self.done}/{self.total} images{extra}, {rate:.1f} img/s",
                  flush=True)  # fmt: skip
            self.next = (self.done // self.every + 1) * self.every


def run_inference(
    config: EvaluateConfig, nets: list[LoadedNet], rows: list[Protocol], manifest: Manifest
) -> tuple[Tally, int, dict[str, np.ndarray]]:
    """The Ray Data pipeline; returns the tally, the undecodable count and per-image top-k
    (key -> (rows, k)), the last for tests and debugging."""
    import ray

    from vgg_ray import runtime

    runtime.connect()
    actors, gpus = pool = actor_pool(config.actors, config.gpus_per_actor)
    pieces = _pieces(manifest, config.split, config.max_images)
    total = sum(p["stop"] - p["start"] for p in pieces)
    print(f"vgg-ray evaluate: {total} images of split {config.split!r}, {len(rows)} protocol(s), "
          f"{actors} actor(s) with {gpus} GPU each", flush=True)  # fmt: skip
    actor_kwargs = {"nets_ref": [ray.put(nets)], "rows": rows}
    batches = batch_inference(pieces, read_records, read_kwargs(manifest), EvalActor,
                              actor_kwargs, config, pool)  # fmt: skip
    tally = Tally(len(rows), len(manifest.classes))
    per_image: dict[str, np.ndarray] = {}
    skipped = 0
    progress = Progress("evaluate", total, config.progress_every)
    for batch in batches:
        good = batch["label"] >= 0
        skipped += int((~good).sum())
        tally.add(batch["label"][good], batch["top_k"][good])
        for key, top_k, ok in zip(batch["key"], batch["top_k"], good, strict=True):
            if ok:
                per_image[str(key)] = top_k
        progress.add(len(batch["label"]))
    return tally, skipped, per_image


# --- outputs -------------------------------------------------------------------------------


def _write_tables(directory: Path, tally: Tally, results: list[ResultRow], manifest: Manifest,
                  only: list[int]) -> None:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    chosen = [results[i] for i in only]
    (directory / "table.md").write_text(table_markdown(chosen))
    (directory / "table.csv").write_text(table_csv(chosen))
    (directory / "per_class.csv").write_text(
        per_class_csv(tally, results, manifest.wnids, manifest.names, only=only)
    )


def tables_folder(config: EvaluateConfig, when: datetime) -> str:
    """This evaluation's artifact folder in each run it logs to, e.g.
    `evaluation/20250131T120000.123Z-val-single-dense`: a run evaluated again (another
    protocol, a promotion) keeps every earlier table beside the new one."""
    stamp = f"{when:%Y%m%dT%H%M%S}.{when.microsecond // 1000:03d}Z"
    modes = "-".join(m.replace("+", "_") for m in config.modes)  # "+" is a space in a URL query
    return f"evaluation/{stamp}-{config.split}-{modes}"


def _log_mlflow(config: EvaluateConfig, nets: list[LoadedNet], tally: Tally,
                results: list[ResultRow], manifest: Manifest,
                folder: str) -> dict[str, str]:  # fmt: skip
    """Each net's own rows to its training run; ensemble rows and nets without a run to a new
    `evaluate-*` run; the tables under `folder` in each. Returns run id -> what went there."""
    from vgg_ray.tracking import experiment_id as named_experiment

    client = _client(config.tracking_uri)
    targets: dict[str, list[int]] = {}
    new_rows: list[int] = []
    for index, row in enumerate(results):
        run_id = nets[row.members[0]].info.run_id if len(row.members) == 1 else None
        if run_id:
            targets.setdefault(run_id, []).append(index)
        else:
            new_rows.append(index)
    if new_rows:
        ensemble = len(nets) > 1
        name = "evaluate-ensemble" if ensemble else f"evaluate-{nets[0].info.name}"
        experiment_id = None
        first_run = next((n.info.run_id for n in nets if n.info.run_id), None)
        if first_run:
            experiment_id = client.get_run(first_run).info.experiment_id
        if experiment_id is None:  # on a local sqlite store, its artifacts beside the database
            experiment_id = named_experiment(client, config.experiment)
        tags = {"vgg_ray.evaluate.members": " + ".join(n.info.source for n in nets)}
        for i, net in enumerate(nets):
            tags[f"member_{i}"] = net.info.source
            if net.info.run_id:
                tags[f"member_{i}_run"] = net.info.run_id
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        targets[run.info.run_id] = new_rows
    notes = {}
    for run_id, indices in targets.items():
        import mlflow.entities

        now = int(time.time() * 1000)
        metrics = []
        for index in indices:
            r = results[index]
            prefix = "eval_" if len(r.members) == 1 else "eval_ensemble_"
            metrics += [
                mlflow.entities.Metric(f"{prefix}{r.key}_top1_error", r.top1_error, now, 0),
                mlflow.entities.Metric(f"{prefix}{r.key}_top5_error", r.top5_error, now, 0),
            ]
        # Two single-net rows can share a key only for the same net twice: keep one of each.
        unique = {m.key: m for m in metrics}
        client.log_batch(run_id, metrics=list(unique.values()), synchronous=True)
        with tempfile.TemporaryDirectory() as directory:
            _write_tables(Path(directory), tally, results, manifest, indices)
            client.log_artifacts(run_id, directory, folder)
        if run_id not in (n.info.run_id for n in nets):
            client.set_terminated(run_id, "FINISHED")
        notes[run_id] = f"{len(indices)} row(s) in {folder}"
    return notes


def resolve(config: JobConfig, folder: str = "evaluations") -> JobConfig:
    """`config` (a job's, with `tracking_uri` and `output`) with the embedded defaults filled:
    the tracking URI, and the output folder <home>/<folder>/<time>."""
    from vgg_ray.config import default_home
    from vgg_ray.tracking import resolve_uri

    output = config.output or str(default_home() / folder / f"{datetime.now():%Y%m%d-%H%M%S}")
    return dataclasses.replace(config, tracking_uri=resolve_uri(config.tracking_uri), output=output)


def evaluate(config: EvaluateConfig) -> EvaluationResult:
    """The whole job: load and check the nets, run the protocols over the split, write and log
    the tables. The function `vgg-ray evaluate` and jobs/evaluate.py call."""
    config = resolve(config).validate()
    if config.tracking_uri.startswith("sqlite:///"):
        Path(config.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    nets, manifest = load_nets(config)
    infos = [n.info for n in nets]
    rows = protocols(infos, config.modes, config.scales, members=config.members)
    if config.only_rows:
        keep = {(mode, tuple(scales)) for mode, scales in config.only_rows}
        rows = [row for row in rows if (row.mode, row.scales[0]) in keep]
    try:
        tally, skipped, _ = run_inference(config, nets, rows, manifest)
    except Exception as error:  # a shard broken since the check, storage down past its limit
        if cause := user_error(error):  # the ConfigError inside Ray's wrapping, if any
            raise ConfigError(cause) from None
        raise
    if tally.total == 0:
        raise ConfigError(f"no image of split {config.split!r} could be decoded")
    results = result_rows(tally, rows, infos)
    output = Path(config.output)
    _write_tables(output, tally, results, manifest, list(range(len(results))))
    folder = tables_folder(config, datetime.now(UTC)) if config.log_to_mlflow else ""
    runs = _log_mlflow(config, nets, tally, results, manifest, folder) if folder else {}
    print(table_markdown(results), flush=True)
    print(
        f"vgg-ray evaluate: tables in {output}"
        + (f"; {skipped} record(s) did not decode" if skipped else "")
        + (f"; logged to MLflow run(s) {', '.join(runs)} under {folder}/" if runs else ""),
        flush=True,
    )
    return EvaluationResult(results, str(output), runs, skipped, folder if runs else "")
