"""The training plane's driver: one run of the paper's recipe on Ray Train, tracked in MLflow.

`train(config)` checks everything it can on the driver first (`preflight`), opens the MLflow
run, fits a `TorchTrainer` whose workers run `vgg_ray.train.train_worker`, then logs the model,
the best checkpoint and the curves, and delivers what the workers could not send. Every train
job, `vgg-ray train`, the chain (`reproduce`) and each Tune trial (`build_trainer`) start here.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from vgg_ray import checkpoint as ckpt
from vgg_ray.config import TrainConfig, default_home, init_note
from vgg_ray.data import TRACE
from vgg_ray.errors import ConfigError, user_error
from vgg_ray.manifest import check_shards, load_manifest
from vgg_ray.models import INITS, build_vgg, head_size
from vgg_ray.steps import objective
from vgg_ray.storage import absolute
from vgg_ray.tracking import (
    DIVERGED_TAG,
    check_reachable,
    experiment_id,
    log_net,
    open_client,
    resolve_uri,
    run_tags,
    runs_tagged,
    use_store,
)
from vgg_ray.train import RANK, SCORE, initial_weights, train_worker, val_errors_line


@dataclass(frozen=True)
class TrainSummary:
    """Where a finished run left its results."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: str
    best_checkpoint: str
    metrics: dict[str, float]


_FITTING_INITS: set[tuple] = set()  # (init, net) pairs `check_init` has passed in this process


def check_init(config: TrainConfig, classes: int) -> None:
    """On the driver, before any worker starts: `config.init`'s weights load and fit the net
    (width, class count, layout). The net is built on the meta device: shapes, no memory. A
    pair already checked (the CLI's net A lookup, then `train`) is not loaded again."""
    key = (config.init, config.arch, config.width, config.batch_norm, classes, config.regression)
    if config.init in INITS or key in _FITTING_INITS:
        return
    if config.init.startswith(("models:/", "runs:/")) and config.tracking_uri:
        use_store(config.tracking_uri)  # resolved in the run's store, as the workers do
    with torch.device("meta"):
        model = build_vgg(config.arch, head_size(classes, config.regression), config.width,
                          "glorot", config.dropout, config.batch_norm)  # fmt: skip
    with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": as meant
        warnings.simplefilter("ignore", UserWarning)
        initial_weights(model, config)
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


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the embedded defaults: run name, checkpoint storage, tracking URI; a local manifest
    path made absolute (the workers run in working directories of their own)."""
    run_name = config.run_name or f"{config.arch}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = config.storage_path or str(default_home() / "checkpoints")
    tracking = resolve_uri(config.tracking_uri)
    data = replace(config.data, manifest=absolute(config.data.manifest))
    return replace(config, run_name=run_name, storage_path=storage, tracking_uri=tracking,
                   data=data)  # fmt: skip


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


def _run_folder(config: TrainConfig) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the run's own folder under the storage path."""
    import pyarrow.fs

    filesystem, path = _storage(config)
    return filesystem or pyarrow.fs.LocalFileSystem(), f"{path.rstrip('/')}/{config.run_name}"


def _check_resumable(config: TrainConfig) -> None:
    """Before a resume reaches the cluster: the run has a checkpoint that verifies (the one
    the workers will continue from, damaged newer ones named and skipped)."""
    try:
        ckpt.newest_intact(*_run_folder(config))
    except ConfigError as error:
        raise ConfigError(f"cannot resume run {config.run_name!r}: {error}: {NO_RESUME}") from None


NO_RESUME = ("start a new run (another --run-name), with --init from a checkpoint you trust to "
             "keep its weights")  # fmt: skip


def _drop_if_no_checkpoint(config: TrainConfig) -> bool:
    """Remove the folder of a run that failed before its first checkpoint (it holds nothing
    to resume, and would block the run's name); True if it did."""
    import pyarrow.fs

    filesystem, folder = _run_folder(config)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        if any(e.base_name.startswith("epoch-") for e in entries):
            return False
        if filesystem.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(folder)
    except OSError:  # storage away: the folder stays, and so does the advice to resume
        return False
    return True


def run_exists(config: TrainConfig) -> bool:
    """Whether run `config.run_name` has a folder in the storage path (what `--resume` needs)."""
    import pyarrow.fs

    filesystem, folder = _run_folder(config)
    return filesystem.get_file_info(folder).type != pyarrow.fs.FileType.NotFound


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
        runs = runs_tagged(client, [experiment], {"vgg_ray.run_name": config.run_name})
        if runs:
            return runs[0].info.run_id
    run = client.create_run(experiment, run_name=config.run_name,
                            tags={**run_tags(config), **tags})  # fmt: skip
    params = {k: str(v)[:6000] for k, v in config.flat().items()}
    client.log_batch(
        run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()]
    )
    return run.info.run_id


def gpus_per_worker(config: TrainConfig) -> float:
    """config.gpus_per_worker, or 1 when the cluster has a GPU for every worker, else 0."""
    import ray

    if config.gpus_per_worker is not None:
        return config.gpus_per_worker
    fewest = config.min_workers or config.workers  # an elastic run starts on what there is
    return 1 if ray.cluster_resources().get("GPU", 0) >= fewest else 0


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
    # (fewest, most): an elastic run, Ray Train resizing it with the capacity; else a fixed count
    workers = (config.min_workers, config.workers) if config.min_workers else config.workers
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "mlflow_run_id": run_id,
            "start_checkpoint": start_checkpoint,
            "trace": os.environ.get(TRACE, ""),  # test-only (vgg_ray.data.trace)
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            elastic_resize_monitor_interval_s=config.elastic_check_s,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=config.max_failures, max_preemption_failures=config.max_preemptions
            ),
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
    if config.regression:  # a localisation net trains and validates on the images with boxes
        for split in ("train", "val"):
            manifest.shards(split, boxed=True)
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
    _check_run_folder(config, resume=resume)
    if note := init_note(config):
        print(f"vgg-ray: {note}", flush=True)
    run_id = _mlflow_run(config, resume=resume, tags=tags or {})
    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    # A run that finished once and is continued keeps FINISHED if the continuation fails (a
    # damaged checkpoint must not rewrite the record of a completed run).
    finished_before = resume and client.get_run(run_id).info.status == "FINISHED"
    runtime.connect()
    gpus = gpus_per_worker(config)
    workers = f"{config.min_workers}-{config.workers}" if config.min_workers else config.workers
    print(
        f"vgg-ray: training net {config.arch} as run {config.run_name!r} "
        f"({workers} worker(s), {gpus} GPU each); MLflow run {run_id}",
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
        if cause := user_error(error):  # a bad shard, storage down past its limit, ...
            raise ConfigError(f"{cause}; {_how_to_go_on(config, cause, resume)}") from error
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


def _check_run_folder(config: TrainConfig, *, resume: bool) -> None:
    """A new run's name is free; a resumed one's run exists and has a checkpoint that verifies."""
    exists = run_exists(config)
    if exists and not resume:
        raise ConfigError(
            f"run {config.run_name!r} already exists in {config.storage_path}; "
            "pass --resume to continue it, or another --run-name"
        )
    if resume and not exists:
        raise ConfigError(f"no run {config.run_name!r} in {config.storage_path} to resume")
    if resume:
        _check_resumable(config)


def _how_to_go_on(config: TrainConfig, cause: str, resume: bool) -> str:
    """The second half of a failed run's line: what the user can do once the cause is fixed."""
    if ckpt.NOTHING_INTACT in cause:
        return NO_RESUME
    if not resume and _drop_if_no_checkpoint(config):
        return (f"run {config.run_name!r} stopped before its first checkpoint, so there is "
                "nothing to resume: once fixed, start it again")  # fmt: skip
    return (f"run {config.run_name!r} stopped at its latest checkpoint: once fixed, continue it "
            f"with --resume --run-name {config.run_name}")  # fmt: skip


def _checkpoint_uri(config: TrainConfig, checkpoint) -> str:
    """A Ray checkpoint's path as the user names it (Ray drops the s3:// of its filesystem)."""
    return f"s3://{checkpoint.path}" if config.storage_path.startswith("s3://") else checkpoint.path


def _mlflow_ui(tracking_uri: str, run_id: str) -> str:
    """Where a person looks at the run: the server's page, or the command that serves a file."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _best_intact(best_checkpoints: list) -> tuple[Any, dict[str, float], dict[str, Any]]:
    """(checkpoint, its metrics, its state) of the best-ranked checkpoint that verifies; one
    that does not is named and passed over."""
    # (runs begun before the rank was reported: by top-5 error alone)
    ranked = sorted(best_checkpoints,
                    key=lambda entry: entry[1][RANK if RANK in entry[1] else SCORE])  # fmt: skip
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

    best_checkpoint, best_metrics, best_state = _best_intact(result.best_checkpoints)
    # The last epoch is often the best: its state is then loaded (and verified) once.
    same = best_checkpoint.path == result.checkpoint.path
    latest = best_state if same else ckpt.load_newest_intact(result.checkpoint)
    history = latest["loop"]["history"]
    deliver_unsent(config, run_id, latest, result.checkpoint)
    best_uri = _checkpoint_uri(config, best_checkpoint)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.set_tag("best_checkpoint", best_uri)
        score = objective(config.regression).score
        mlflow.log_metric(f"best_{score}", best_metrics[score])
        with tempfile.TemporaryDirectory() as directory:
            mlflow.log_artifact(plot_history(history, Path(directory) / "curves.png"))
        log_net(best_state)
    final = history[-1] if history else {}
    print(
        f"vgg-ray: run {config.run_name!r} done: {val_errors_line(final) if final else ''}\n"
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
