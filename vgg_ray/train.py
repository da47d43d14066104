"""The training plane: the paper's recipe (Sect. 3.1) on Ray Train, tracked in MLflow.

`train(config)` runs on the driver: it opens the MLflow run, fits a `TorchTrainer` whose workers
run `train_worker` (a `Worker`: train epoch -> validate -> log -> checkpoint), then logs the
model, the best checkpoint and the curves. The worker is plain PyTorch; the few Ray calls
(`get_context`, `get_checkpoint`, `report`) stand at its edges.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vgg_ray import checkpoint as ckpt
from vgg_ray.config import TrainConfig, default_home, init_note
from vgg_ray.data import SplitStream, check_shards, load_manifest
from vgg_ray.errors import ConfigError
from vgg_ray.models import INITS, VGG, build_vgg, init_from_shallow
from vgg_ray.parallel import parallelize, unwrap
from vgg_ray.schedules import build_schedule
from vgg_ray.steps import evaluate_counts, train_step
from vgg_ray.tracking import (
    DIVERGED_TAG,
    NullTracker,
    Tracker,
    check_reachable,
    experiment_id,
    log_net,
    open_client,
    use_store,
)

log = logging.getLogger("vgg_ray.train")
SCORE = "val_top5_error"  # the paper's measure
# What the best checkpoints are kept by: top-5 error, ties broken by top-1 error. The weight is
# below one image in a million, so it only ever decides between equal top-5 errors (every
# epoch's on a data set of 5 classes or fewer, where top-5 error is 0).
RANK = "checkpoint_rank"
TIE_BREAK = 1e-6


@dataclass(frozen=True)
class TrainSummary:
    """Where a finished run left its results."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: str
    best_checkpoint: str
    metrics: dict[str, float]


# ---------------------------------------------------------------------------- worker side


def _grouped(batches: Iterator, size: int) -> Iterator[list]:
    """Micro-batches grouped into optimizer steps (the last step may have fewer)."""
    group: list = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


HEAD = "classifier.6."  # FC3: the class scores


def _initial_weights(model: VGG, config: TrainConfig) -> list[str]:
    """Apply `config.init` when it names trained weights; returns the layers it set."""
    if config.init in INITS:
        return []
    try:
        trained, state = ckpt.load_trained(config.init, s3_endpoint=config.data.s3_endpoint)
    except (OSError, RuntimeError, ValueError) as error:  # unreadable, not a torch file, ...
        raise ConfigError(
            f"cannot load init {config.init}: {str(error).splitlines()[0][:200]}"
        ) from error
    if trained is not None and _conv_layers(trained) < _conv_layers(model):
        return init_from_shallow(model, trained)  # Sect. 3.1: deep nets start from a trained A
    loaded = dict(state["model"])
    head = model.classifier[-1].weight
    if loaded.get(HEAD + "weight", head).shape[0] != head.shape[0]:
        # Fine-tuning on another class count (ImageNet's 1000 to one's own 10): every layer but
        # the last, which keeps its random init.
        loaded = {k: v for k, v in loaded.items() if not k.startswith(HEAD)}
    own_head = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD)}
    try:
        model.load_state_dict({**own_head, **loaded}, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"init {config.init}: weights do not fit net {config.arch} "
            f"(width {config.width}, {model.num_classes} classes): {str(error).splitlines()[0]}"
        ) from error
    return list(loaded)


_FITTING_INITS: set[tuple] = set()  # (init, net) pairs `check_init` has passed in this process


def check_init(config: TrainConfig, classes: int) -> None:
    """On the driver, before any worker starts: `config.init`'s weights load and fit the net
    (width, class count, layout). The net is built on the meta device: shapes, no memory. A
    pair already checked (the CLI's net A lookup, then `train`) is not loaded again."""
    key = (config.init, config.arch, config.width, config.batch_norm, classes)
    if config.init in INITS or key in _FITTING_INITS:
        return
    if config.init.startswith(("models:/", "runs:/")) and config.tracking_uri:
        use_store(config.tracking_uri)  # resolved in the run's store, as the workers do
    with torch.device("meta"):
        model = build_vgg(config.arch, classes, config.width, "glorot", config.dropout,
                          config.batch_norm)  # fmt: skip
    with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": as meant
        warnings.simplefilter("ignore", UserWarning)
        _initial_weights(model, config)
    _FITTING_INITS.add(key)


NET_A = "models:/vgg-A@champion"  # where a deep net of the paper profile looks for its net A


def registered_net_a(config: TrainConfig) -> str | None:
    """`NET_A` when the run's tracking store holds it and it fits `config`'s net (width, class
    count), else None. Looks only where a store already exists: a sqlite file that is there, a
    server that answers; a net A that does not fit is passed over with one line."""
    from mlflow.tracking import MlflowClient

    uri = resolve(config).tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    try:
        check_reachable(uri, timeout_s=2)  # shorter than open_client's: this is only a look
        MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("vgg-A", "champion")
    except Exception:  # no such model or alias, no server: the caller's default stands
        return None
    candidate = replace(config, init=NET_A, tracking_uri=uri)
    try:
        manifest = load_manifest(config.data.manifest, s3_endpoint=config.data.s3_endpoint)
        check_init(candidate, len(manifest.classes))
    except ConfigError as error:
        print(f"vgg-ray: {NET_A} does not fit net {config.arch} ({error}); not using it",
              flush=True)  # fmt: skip
        return None
    return NET_A


def _conv_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class Worker:
    """One Ray Train worker: the net, its optimizer and lr schedule, and the loop state that a
    checkpoint carries so a restart continues exactly (epoch, step, batch in epoch, history).

    Plain PyTorch; the Ray calls (`get_context`, `get_checkpoint`, `report`) stand at the edges.
    """

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        config = TrainConfig.from_dict(loop_config["config"])
        # One seed per run: it also draws the data order and augmentation.
        self.config = config = replace(config, data=replace(config.data, seed=config.seed))
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        on_gpu = self.device.type == "cuda"
        self.bf16 = config.bf16 if config.bf16 is not None else on_gpu
        self.channels_last = config.channels_last if config.channels_last is not None else on_gpu
        self.manifest = load_manifest(config.data.manifest, s3_endpoint=config.data.s3_endpoint)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        init = config.init if config.init in INITS else config.base_init
        model = build_vgg(config.arch, len(self.manifest.classes), config.width, init,
                          config.dropout, config.batch_norm)  # fmt: skip
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)  # fmt: skip
        # The paper's default: "divided by 10 when the validation set accuracy stopped
        # improving", 3 times. The schedule gives a multiplier on config.lr (vgg_ray.schedules).
        self.schedule = build_schedule(
            config.schedule, epochs=config.epochs, factor=config.lr_factor,
            patience=config.lr_patience, max_decays=config.lr_decays,
            step_size=config.step_size, warmup=config.warmup_epochs,
            classes=len(self.manifest.classes),
        )  # fmt: skip
        self.loop: dict[str, Any] = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "history": [],
                                     "best": math.inf}  # fmt: skip
        # The run's own latest checkpoint first (a worker failure, a resumed run); else the
        # checkpoint the run is told to start from (a Tune trial continuing a donor's or its own).
        own = ray.train.get_checkpoint()
        restored = own or loop_config.get("start_checkpoint")
        unsent: list = []
        if restored:
            state = ckpt.load_newest_intact(restored)
            self._load(model, state)
            if own:  # its unsent metrics are this run's (a donor's belong to the donor's run)
                unsent = state.get("unsent_metrics", [])
        else:
            if config.init.startswith(("models:/", "runs:/")):  # resolved in the run's store
                use_store(loop_config["tracking_uri"])
            _initial_weights(model, config)
        self.model = parallelize(model, self.device, channels_last=self.channels_last,
                                 compile=config.compile)  # fmt: skip
        self.tracker = (Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
                        if self.rank == 0 else NullTracker())  # fmt: skip
        self.tracker.requeue(unsent)

    def train(self) -> None:
        """Epochs from where the loop state says, each: train -> validate -> log -> checkpoint."""
        config, loop = self.config, self.loop
        for epoch in range(loop["epoch"], config.epochs):
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * self.schedule.multiplier(epoch)
            trained = self.train_epoch(epoch)
            if trained is None:  # diverged: train_epoch checkpointed the weights from before
                break
            metrics = self._metrics(epoch, trained, self.validate())
            self.schedule.update(1 - metrics["val_top1_error"])
            loop.update(epoch=epoch + 1, batch_in_epoch=0, epoch_sums=None,
                        best=min(loop["best"], metrics[SCORE]))  # fmt: skip
            loop["history"].append(metrics)
            self.tracker.log_metrics(metrics, step=epoch)
            if self.rank == 0:  # print() in a Ray Train worker can reach the driver twice
                log.info(
                    "epoch %d/%d: train loss %.3f, val error top-1 %.1f%% top-5 %.1f%%, "
                    "%.0f img/s, %.0f%% of step time waiting for data",
                    epoch + 1, config.epochs, metrics["train_loss"],
                    100 * metrics["val_top1_error"], 100 * metrics[SCORE],
                    metrics["images_per_s"], 100 * metrics["data_wait_share"],
                )  # fmt: skip
            self.report(metrics, is_epoch_end=True)
        # Nothing is sent after the last checkpoint: what it carries unsent, the driver delivers.
        if unsent := len(self.tracker.unsent()):
            log.warning("%d metric values could not be sent to MLflow yet; the driver will "
                        "deliver them", unsent)  # fmt: skip

    def train_epoch(self, epoch: int) -> list[float] | None:
        """One pass over this worker's share of the epoch. Returns the sums over all ranks:
        [rows, loss sum, top-1 correct, top-5 correct, data wait s, elapsed s, skipped], or None
        when the run diverged (`max_nonfinite_steps` skipped steps in a row)."""
        config, loop, device = self.config, self.loop, self.device
        stream = SplitStream(self.manifest, "train", config.data, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, batch_size=config.micro_batch,
                             device=device, training=True)  # fmt: skip
        self.model.train()
        skip = loop["batch_in_epoch"]  # > 0 only when resuming from a mid-epoch checkpoint
        # A mid-epoch checkpoint carries the epoch's sums so far over all ranks (rank 0 takes
        # them back), so the epoch's metrics after a restart count every batch exactly once.
        sums = loop.get("epoch_sums") if skip and self.rank == 0 else None
        seen, loss_sum, c1, c5, wait, before = sums or (0.0, 0.0, 0, 0, 0.0, 0.0)
        correct = torch.tensor([int(c1), int(c5)], dtype=torch.long, device=device)
        if not skip:
            loop["nonfinite_steps"] = 0  # steps skipped this epoch: the same on every rank
        started = tick = time.perf_counter() - before

        def sums_so_far() -> list[float]:  # this rank's; a checkpoint holds them over all ranks
            return [seen, loss_sum, *correct.tolist(), wait, time.perf_counter() - started]

        for micro_batches in _grouped(iter(stream), config.grad_accum):
            if skip:
                skip -= 1
                tick = time.perf_counter()
                continue
            if self.channels_last:
                micro_batches = [(x.contiguous(memory_format=torch.channels_last), y)
                                 for x, y in micro_batches]  # fmt: skip
            wait += time.perf_counter() - tick
            step = train_step(self.model, self.optimizer, micro_batches, bf16=self.bf16,
                              clip_grad_norm=config.clip_grad_norm)  # fmt: skip
            loop["step"] += 1
            loop["batch_in_epoch"] += 1
            if step.applied:
                rows = sum(len(y) for _, y in micro_batches)
                seen, loss_sum = seen + rows, loss_sum + step.loss * rows
                correct += step.correct
                loop["nonfinite_streak"] = 0
            else:  # skipped: not counted in the epoch's loss and accuracy
                loop["nonfinite_steps"] = loop.get("nonfinite_steps", 0) + 1
                loop["nonfinite_streak"] = streak = loop.get("nonfinite_streak", 0) + 1
                if streak >= config.max_nonfinite_steps:
                    self._stop_diverged(epoch, streak, sums_so_far())
                    return None
            if loop["step"] % config.log_every_steps == 0:
                self.tracker.log_metrics(
                    {"train_loss_step": step.loss, "grad_norm": step.grad_norm,
                     "lr": self.optimizer.param_groups[0]["lr"]},
                    step=loop["step"],
                )  # fmt: skip
            if config.checkpoint_every_steps and loop["step"] % config.checkpoint_every_steps == 0:
                loop["epoch_sums"] = self._sum_over_ranks(sums_so_far())
                self.report({"epoch": epoch, "step": loop["step"]}, is_epoch_end=False)
            tick = time.perf_counter()
        return self._sum_over_ranks([*sums_so_far(), stream.skipped])

    def _stop_diverged(self, epoch: int, streak: int, partial: list[float]) -> None:
        """Checkpoint the weights from before the streak of skipped steps (none of them changed
        the weights) and report the run as diverged. The streak's batches are handed back to the
        epoch, so a run continued with a lower lr trains on them."""
        loop = self.loop
        back = min(streak, loop["batch_in_epoch"])  # a streak may have begun last epoch
        loop["step"] -= back
        loop["batch_in_epoch"] -= back
        loop["nonfinite_steps"] -= back
        loop["nonfinite_streak"] = 0
        loop["epoch_sums"] = self._sum_over_ranks(partial)
        if self.rank == 0:
            log.error("epoch %d: %d steps in a row had a non-finite gradient; stopping the run",
                      epoch + 1, streak)  # fmt: skip
        self.report({"epoch": epoch, "step": loop["step"], "diverged": float(streak)},
                    is_epoch_end=False, suffix="-diverged")  # fmt: skip

    def validate(self) -> list[float]:
        """[rows, top-1 correct, top-5 correct, loss sum] over the whole val split, all ranks."""
        self.model.eval()
        val = SplitStream(self.manifest, "val", self.config.data, epoch=0, rank=self.rank,
                          world_size=self.world_size, batch_size=self.config.micro_batch,
                          device=self.device, training=False)  # fmt: skip
        counts = evaluate_counts(self.model, val, bf16=self.bf16).to(self.device)
        return _all_reduce(counts).tolist()

    def _metrics(self, epoch: int, train: list[float], val: list[float]) -> dict[str, float]:
        rows, loss_sum, c1, c5, wait, elapsed, skipped = train
        rows, val_rows = max(rows, 1.0), max(val[0], 1.0)
        return {
            "epoch": epoch,
            "step": self.loop["step"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / rows,
            "train_top1_error": 1 - c1 / rows,
            "train_top5_error": 1 - c5 / rows,
            "val_loss": val[3] / val_rows,
            "val_top1_error": 1 - val[1] / val_rows,
            SCORE: 1 - val[2] / val_rows,
            # elapsed is summed over ranks: their mean is the epoch's wall time
            "images_per_s": rows / max(elapsed / self.world_size, 1e-9),
            "data_wait_share": wait / max(elapsed, 1e-9),
            "skipped_records": skipped,
            "nonfinite_steps": self.loop.get("nonfinite_steps", 0),
        }

    def report(self, metrics: dict[str, float], *, is_epoch_end: bool, suffix: str = "") -> None:
        """Every rank calls this equally often (it is a collective); rank 0 writes the state."""
        import ray.train

        name = f"epoch-{self.loop['epoch']:04d}-step-{self.loop['step']:08d}{suffix}"
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                ckpt.save_state(directory, self._state())
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            rank = metrics[SCORE] + TIE_BREAK * metrics["val_top1_error"] if is_epoch_end else 2.0
            ray.train.report(
                # Mid-epoch checkpoints are not evaluated: ranked below any epoch's (Ray's
                # ranking cannot take inf), they are kept only while they are the latest.
                {**metrics, SCORE: metrics[SCORE] if is_epoch_end else 1.0, RANK: rank},
                checkpoint=checkpoint,
                checkpoint_dir_name=name,
            )

    def _state(self) -> dict[str, Any]:
        """A checkpoint: what a resume needs, and what later jobs need to use the net."""
        config = self.config
        return {
            "arch": config.arch, "width": config.width, "classes": list(self.manifest.wnids),
            "config": config.to_dict(), "data_stats": dataclasses.asdict(self.manifest.stats),
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "rng": ckpt.rng_state(), "loop": self.loop,
            # metric values rank 0 could not send yet, and those a full queue dropped (counted)
            "unsent_metrics": self.tracker.unsent(), "dropped_metrics": self.tracker.dropped,
        }  # fmt: skip

    def _load(self, model: VGG, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.loop = state["loop"]
        # The config wins over the optimizer state restored: a PBT trial continues another
        # trial's checkpoint with its own (perturbed) weight decay and base lr.
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config.weight_decay

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return _all_reduce(tensor).tolist()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker."""
    # Each epoch builds its own datasets; their INFO lines (execution plans, every report) would
    # bury the one progress line per epoch.
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    Worker(loop_config).train()


# ---------------------------------------------------------------------------- driver side


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the embedded defaults: run name, checkpoint storage, tracking URI."""
    import os

    home = default_home()
    run_name = config.run_name or f"{config.arch}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = config.storage_path or str(home / "checkpoints")
    tracking = (
        config.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{home / 'mlflow.db'}"
    )
    return replace(config, run_name=run_name, storage_path=storage, tracking_uri=tracking)


def _storage(config: TrainConfig):
    """(pyarrow filesystem or None, path) for Ray's RunConfig."""
    if config.storage_path.startswith("s3://"):
        from vgg_ray.storage import open_storage

        return open_storage(config.storage_path, s3_endpoint=config.data.s3_endpoint)
    path = Path(config.storage_path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, a read-only disk
        raise ConfigError(f"storage path {config.storage_path} is not a usable folder: "
                          f"{error.strerror or error}") from None  # fmt: skip
    return None, str(path)


def _check_resumable(config: TrainConfig) -> None:
    """Before a resume reaches the cluster: the run has a checkpoint that verifies (the one
    the workers will continue from, damaged newer ones named and skipped)."""
    import pyarrow.fs

    filesystem, path = _storage(config)
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        ckpt.newest_intact(filesystem, f"{path.rstrip('/')}/{config.run_name}")
    except ConfigError as error:
        raise ConfigError(f"cannot resume run {config.run_name!r}: {error}: {NO_RESUME}") from None


NO_RESUME = ("start a new run (another --run-name), with --init from a checkpoint you trust to "
             "keep its weights")  # fmt: skip


def _drop_if_no_checkpoint(config: TrainConfig) -> bool:
    """Remove the folder of a run that failed before its first checkpoint (it holds nothing
    to resume, and would block the run's name); True if it did."""
    import pyarrow.fs

    filesystem, path = _storage(config)
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    folder = f"{path.rstrip('/')}/{config.run_name}"
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        if any(e.base_name.startswith("epoch-") for e in entries):
            return False
        if filesystem.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(folder)
    except OSError:  # storage away: the folder stays, and so does the advice to resume
        return False
    return True


def _run_exists(filesystem, path: str, run_name: str) -> bool:
    import pyarrow.fs

    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    info = filesystem.get_file_info(f"{path.rstrip('/')}/{run_name}")
    return info.type != pyarrow.fs.FileType.NotFound


def _mlflow_run(config: TrainConfig, *, resume: bool, tags: dict[str, str]) -> str:
    """The run's id: the one tagged with this run name when resuming, else a new run."""
    import mlflow

    client = open_client(config.tracking_uri)
    mlflow.set_tracking_uri(config.tracking_uri)
    try:
        experiment = experiment_id(client, config.experiment)
    except Exception as error:
        raise ConfigError(
            f"cannot reach MLflow at {config.tracking_uri}: {str(error).splitlines()[0][:200]}"
        ) from error
    if resume:
        runs = client.search_runs(
            [experiment], filter_string=f"tags.`vgg_ray.run_name` = '{config.run_name}'"
        )
        if runs:
            return runs[0].info.run_id
    run = client.create_run(experiment, run_name=config.run_name,
                            tags={**_tags(config), **tags})  # fmt: skip
    params = {k: str(v)[:6000] for k, v in config.flat().items()}
    client.log_batch(
        run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()]
    )
    return run.info.run_id


def _tags(config: TrainConfig) -> dict[str, str]:
    import subprocess

    import ray

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "vgg_ray.run_name": config.run_name,
        "arch": config.arch,
        "git_commit": commit or "unknown",
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "data_manifest": config.data.manifest,
    }


def gpus_per_worker(config: TrainConfig) -> float:
    """config.gpus_per_worker, or 1 when the cluster has a GPU for every worker, else 0."""
    import ray

    if config.gpus_per_worker is not None:
        return config.gpus_per_worker
    return 1 if ray.cluster_resources().get("GPU", 0) >= config.workers else 0


def build_trainer(
    config: TrainConfig,
    run_id: str,
    *,
    callbacks: Sequence[Any] = (),
    start_checkpoint: Any = None,
):
    """The TorchTrainer of one run (config resolved and validated; Ray connected).

    `callbacks` (ray.train.UserCallback) run on the Train controller after each report: how a
    Tune trial forwards its epochs. `start_checkpoint` (a ray.train.Checkpoint) is where a run
    without checkpoints of its own starts: a Tune trial continuing its own or a donor's."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, storage_path = _storage(config)
    gpus = gpus_per_worker(config)
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": config.tracking_uri,
            "start_checkpoint": start_checkpoint,
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_best,
                checkpoint_score_attribute=RANK,
                checkpoint_score_order="min",
            ),
            callbacks=list(callbacks),
        ),
    )


def preflight(config: TrainConfig, *, resume: bool = False) -> tuple[TrainConfig, Any]:
    """Everything about a run that can be checked on the driver, in seconds, before any MLflow
    run, run folder or worker exists: the config (values and their combination), the storage
    path, the tracking server answering, the manifest and every shard it lists (size, footer),
    and the init's weights fitting the net. `train` and every Tune search call it first.
    Returns the resolved config and the manifest."""
    config = resolve(config).validate()
    check_reachable(config.tracking_uri)
    manifest = load_manifest(config.data.manifest, s3_endpoint=config.data.s3_endpoint)
    check_shards(manifest)
    if not resume:
        check_init(config, len(manifest.classes))
    _storage(config)
    return config, manifest


def train(
    config: TrainConfig, *, resume: bool = False, tags: dict[str, str] | None = None
) -> TrainSummary:
    """Train one net end to end; the function every train job and `vgg-ray train` call.
    `tags` go on a new MLflow run besides the usual ones (the chain's stage and lineage)."""
    import mlflow

    from vgg_ray import runtime

    config, manifest = preflight(config, resume=resume)
    exists = _run_exists(*_storage(config), config.run_name)
    if exists and not resume:
        raise ConfigError(
            f"run {config.run_name!r} already exists in {config.storage_path}; "
            "pass --resume to continue it, or another --run-name"
        )
    if resume and not exists:
        raise ConfigError(f"no run {config.run_name!r} in {config.storage_path} to resume")
    if resume:
        _check_resumable(config)
    if note := init_note(config):
        print(f"vgg-ray: {note}", flush=True)
    run_id = _mlflow_run(config, resume=resume, tags=tags or {})
    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    # A run that finished once and is continued keeps FINISHED if the continuation fails (a
    # damaged checkpoint must not rewrite the record of a completed run).
    finished_before = resume and client.get_run(run_id).info.status == "FINISHED"
    runtime.connect()
    gpus = gpus_per_worker(config)
    print(
        f"vgg-ray: training net {config.arch} as run {config.run_name!r} "
        f"({config.workers} worker(s), {gpus} GPU each); MLflow run {run_id}",
        flush=True,
    )
    trainer = build_trainer(config, run_id)
    try:
        result = trainer.fit()
    except BaseException as error:
        if not finished_before:
            client.set_terminated(
                run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            )
        how_to_go_on = (
            f"run {config.run_name!r} stopped at its latest checkpoint: once fixed, continue "
            f"it with --resume --run-name {config.run_name}"
        )
        if ckpt.NOTHING_INTACT in str(_user_error(error)):
            how_to_go_on = NO_RESUME
        elif not resume and _drop_if_no_checkpoint(config):
            how_to_go_on = (f"run {config.run_name!r} stopped before its first checkpoint, so "
                            "there is nothing to resume: once fixed, start it again")  # fmt: skip
        if cause := _user_error(error):  # a bad shard, storage down past its limit, ...
            raise ConfigError(f"{cause}; {how_to_go_on}") from error
        raise
    if streak := (result.metrics or {}).get("diverged"):
        where = _checkpoint_uri(config, result.checkpoint)
        client.set_tag(run_id, DIVERGED_TAG, where)
        client.set_terminated(run_id, "FAILED")
        raise ConfigError(
            f"run {config.run_name!r} diverged: {int(streak)} steps in a row had a non-finite "
            f"gradient (skipped); the weights from before them are in {where}: continue with "
            f"--resume --run-name {config.run_name} and a lower --lr or a --clip-grad-norm"
        )
    summary = _finish(config, result, run_id, manifest)
    client.set_terminated(run_id, "FINISHED")
    return summary


def _checkpoint_uri(config: TrainConfig, checkpoint) -> str:
    """A Ray checkpoint's path as the user names it (Ray drops the s3:// of its filesystem)."""
    return f"s3://{checkpoint.path}" if config.storage_path.startswith("s3://") else checkpoint.path


def _user_error(error: BaseException) -> str | None:
    """The message of the ConfigError behind a failed fit, if there is one: Ray wraps a
    worker's exception (and Ray Data a task's) in its own types, and the chain of causes
    survives only as the remote traceback's text."""
    import re

    todo, seen, texts = [error], set(), []
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError: the remote exception
        if isinstance(current, ConfigError) and not isinstance(cause, BaseException):
            return str(current.args[0]) if current.args else str(current)
        texts.append(str(current))
        failures = getattr(current, "worker_failures", None) or {}  # WorkerGroupError
        base = getattr(current, "_base_exc", None)  # Ray Train's UserExceptionWithTraceback
        todo += [current.__context__, current.__cause__, cause, base, *failures.values()]
    for text in texts:  # the first (innermost) one a traceback names
        if found := re.search(r"^\S*(?:ConfigError|StorageUnreachable): (.+)$", text, re.M):
            return found.group(1)
    return None


def _mlflow_ui(tracking_uri: str, run_id: str) -> str:
    """Where a person looks at the run: the server's page, or the command that serves a file."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _best_intact(best_checkpoints: list) -> tuple[Any, dict[str, float], dict[str, Any]]:
    """(checkpoint, its metrics, its state) of the best-ranked checkpoint that verifies; one
    that does not is named and passed over."""
    # (runs begun before the rank was reported: by top-5 error alone)
    ranked = sorted(best_checkpoints, key=lambda entry: entry[1].get(RANK, entry[1][SCORE]))
    problems = []
    for checkpoint, metrics in ranked:
        try:
            with checkpoint.as_directory() as directory:
                return checkpoint, metrics, ckpt.load_state(directory)
        except ConfigError as error:
            print(f"vgg-ray: passing over a kept checkpoint: {error}", flush=True)
            problems.append(str(error))
    raise ConfigError(f"no kept checkpoint of the run verifies: {'; '.join(problems)}")


def deliver_unsent(config: TrainConfig, run_id: str, state: dict[str, Any], where) -> None:
    """Send the metric values the last checkpoint carries unsent (the tracking server was away
    as training ended), waiting for the server as MLflow's client does. Undeliverable, the run
    is not marked FINISHED: one line says where the values wait and how to send them."""
    unsent, dropped = state.get("unsent_metrics") or [], state.get("dropped_metrics", 0)
    if not unsent and not dropped:
        return
    from mlflow.tracking import MlflowClient

    from vgg_ray.tracking import deliver

    client = MlflowClient(config.tracking_uri)  # no fail-fast check: here waiting is right
    try:
        deliver(client, run_id, unsent)
        if dropped:  # a full queue through a very long outage: the run says how many it lacks
            client.set_tag(run_id, "vgg_ray.dropped_metrics", str(dropped))
    except Exception as error:
        raise ConfigError(
            f"{len(unsent)} metric values of run {config.run_name!r} could not be delivered to "
            f"MLflow at {config.tracking_uri} ({str(error).splitlines()[0][:120]}); they are "
            f"kept in checkpoint {_checkpoint_uri(config, where)}, and the MLflow run is not "
            f"marked FINISHED: once MLflow is back, --resume --run-name {config.run_name} "
            "delivers them"
        ) from error
    print(f"vgg-ray: delivered {len(unsent)} metric values the workers could not send",
          flush=True)  # fmt: skip


def _finish(config: TrainConfig, result, run_id: str, manifest) -> TrainSummary:
    """Driver-side logging once training is done: best checkpoint, model, curves."""
    import mlflow

    from vgg_ray.plots import plot_history

    latest = ckpt.load_newest_intact(result.checkpoint)
    history = latest["loop"]["history"]
    deliver_unsent(config, run_id, latest, result.checkpoint)
    best_checkpoint, best_metrics, best_state = _best_intact(result.best_checkpoints)
    best_uri = _checkpoint_uri(config, best_checkpoint)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.set_tag("best_checkpoint", best_uri)
        mlflow.log_metric(f"best_{SCORE}", best_metrics[SCORE])
        with tempfile.TemporaryDirectory() as directory:
            mlflow.log_artifact(plot_history(history, Path(directory) / "curves.png"))
        log_net(best_state)
    final = history[-1] if history else {}
    print(
        f"vgg-ray: run {config.run_name!r} done: val error top-1 "
        f"{final.get('val_top1_error', 0):.3f}, top-5 {final.get(SCORE, 0):.3f}\n"
        f"  checkpoints: {config.storage_path.rstrip('/')}/{config.run_name}\n"
        f"  best checkpoint: {best_uri}\n"
        f"  MLflow run {run_id}: {_mlflow_ui(config.tracking_uri, run_id)}",
        flush=True,
    )
    return TrainSummary(
        config.run_name,
        run_id,
        config.tracking_uri,
        f"{config.storage_path.rstrip('/')}/{config.run_name}",
        best_uri,
        final,
    )
