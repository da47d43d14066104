"""Schedule search with Ray Tune: many runs of the training plane, one per trial.

    search(demo_search())   # the embedded default: 4 trials of net A on the demo data

Each trial is a Tune driver function (`vgg_ray.trial.run_trial`) that builds and fits the run's
TorchTrainer (Ray Train V2 pattern), so a trial can span several GPUs. A Train callback on the
controller hands each epoch's metrics and checkpoint to the driver function, which reports them
to Tune (`ray.tune.report`): ASHA stops trials on them, PBT clones trials from their checkpoints, a
failed trial restarts from its latest one, and `Tuner.restore` resumes an interrupted search.

A trial's Train run starts from `ray.tune.get_checkpoint()` when Tune gives one (its own latest
after a failure or a resume, a donor's after a PBT exploit) with the trial's current config: a
new base lr and weight decay take effect from the next epoch (vgg_ray.schedules).

MLflow: one parent run for the search, one child run per trial (tag `mlflow.parentRunId`), all
written through one tracking server; a sqlite:/// tracking URI gets a local `mlflow server` for
the duration of the search (DESIGN.md: many writers never go straight into one SQLite file).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

from ray import tune

from vgg_ray.config import (
    TrainConfig,
    check_value,
    checked_fields,
    default_home,
    demo,
    field_types,
    paper,
)
from vgg_ray.errors import ConfigError, require
from vgg_ray.schedules import SCHEDULES
from vgg_ray.stack import serve_sqlite
from vgg_ray.storage import absolute
from vgg_ray.tracking import DIVERGED_TAG, resolve_uri, runs_tagged
from vgg_ray.tracking import experiment_id as named_experiment
from vgg_ray.trial import SEARCH_TAG, TRIAL_ID_TAG, run_trial, trial_config

log = logging.getLogger("vgg_ray.tune")
SCHEDULERS = ("asha", "pbt")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """What a trial's config is drawn from. A range (low, high) is sampled log-uniformly and
    low == high fixes the value; a choice is drawn uniformly from its values."""

    lr: tuple[float, float] = (1e-3, 1e-1)
    """Initial (base) learning rate; the paper hand-tuned 1e-2."""
    weight_decay: tuple[float, float] = (1e-5, 1e-3)
    """L2 penalty; the paper's 5e-4 is inside the default range."""
    schedule: tuple[str, ...] = SCHEDULES
    """Schedule families (vgg_ray.schedules)."""
    lr_factor: tuple[float, ...] = (0.1, 0.2, 0.5)
    """Decay factor of the plateau and step schedules (paper: 0.1)."""
    lr_patience: tuple[int, ...] = (1, 2, 3)
    """Epochs without improvement before a plateau decay (paper: 2)."""
    global_batch: tuple[int, ...] = (128, 256, 512)
    """Images per optimizer step over all workers (paper: 256)."""

    RANGES = ("lr", "weight_decay")

    def validate(self, base: TrainConfig) -> SearchSpace:
        for name in self.RANGES:
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"search space: {name} range is empty: {low} > {high}")
            if name == "lr" and low <= 0:
                raise ConfigError(f"search space: lr must be > 0, got {low}")
            if low < 0 or (low == 0 < high):
                raise ConfigError(
                    f"search space: {name} is sampled on a log scale: its range needs "
                    f"0 < low <= high (or 0:0 for none), got {low}:{high}"
                )
        for item in dataclasses.fields(self):
            if item.name not in self.RANGES and not getattr(self, item.name):
                raise ConfigError(f"search space: the choice of {item.name} is empty")
        for name in self.schedule:
            if name not in SCHEDULES:
                raise ConfigError(
                    f"search space: unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}"
                )
        # Every combination must make a valid run: check each value against the base config.
        for name in ("lr_factor", "lr_patience", "global_batch"):
            for value in getattr(self, name):
                try:
                    replace(base, **{name: value}).validate()
                except ConfigError as error:
                    raise ConfigError(f"search space: {name} {value}: {error}") from None
        return self

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: a sampler per searched field, a constant per fixed one."""
        from ray import tune

        space: dict[str, Any] = {}
        for name in self.RANGES:
            low, high = getattr(self, name)
            space[name] = low if low == high else tune.loguniform(low, high)
        for item in dataclasses.fields(self):
            if item.name not in self.RANGES:
                values = list(getattr(self, item.name))
                space[item.name] = values[0] if len(values) == 1 else tune.choice(values)
        return space


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One schedule search: a base training config, a space, a Tune scheduler."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """What every trial starts from; the space's fields replace its values."""
    space: SearchSpace = field(default_factory=SearchSpace)
    scheduler: str = "asha"
    """"asha" (stops poor trials early) or "pbt" (clones good trials into poor ones, perturbing
    lr and weight decay)."""
    num_samples: int = 8
    """Trials (PBT: the population size)."""
    metric: str = "val_top1_error"
    """What trials are ranked by (minimised), as reported each epoch."""
    max_concurrent_trials: int = 0
    """0: as many as the cluster's CPUs and GPUs hold (one trial = `train.workers` workers)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2
    """ASHA: 1/reduction_factor of the trials go on at each rung."""
    perturbation_interval: int = 2
    """PBT: epochs between exploit/explore steps."""
    pbt_synch: bool = False
    """PBT: the synchronous variant: at each step every trial waits for the whole population
    (each restarts from its checkpoint), so every step perturbs. Asynchronous PBT compares a
    trial only with those that have reported by then, and may not perturb at all when trials
    run at very different speeds."""
    trial_max_failures: int = 2
    """Restarts of a failed trial (from its latest checkpoint) before it counts as errored."""
    seed: int | None = 0
    """Seeds the sampling of trial configs and PBT's perturbations; None: random."""
    name: str = ""
    """Names the search in Tune and MLflow; an interrupted search resumes by name."""
    storage_path: str = ""
    """Tune's experiment and the trials' checkpoints; "" = <home>/searches."""
    best_config: str = ""
    """Where the best trial's config is written (YAML that the train jobs' --config reads);
    "" = <storage>/<name>-best.yaml (<home>/searches/... for an s3:// storage)."""

    def validate(self) -> SearchConfig:
        checks = [
            (
                self.scheduler in SCHEDULERS,
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}",
            ),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.max_concurrent_trials >= 0, "max_concurrent_trials must be >= 0"),
            (self.grace_period >= 1, f"grace period must be >= 1, got {self.grace_period}"),
            (self.reduction_factor > 1, "reduction factor must be > 1"),
            (self.perturbation_interval >= 1, "perturbation interval must be >= 1"),
            (self.trial_max_failures >= -1, "trial max failures must be >= 0 (-1: no limit)"),
            (bool(self.metric), "metric must be named"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        require(checks)
        if self.scheduler == "pbt" and self.num_samples < 2:
            raise ConfigError("PBT needs a population: num_samples must be >= 2")
        self.train.validate()
        self.space.validate(self.train)
        if self.train.regression and "top" in self.metric:  # a localisation net has no top-k
            raise ConfigError(f"a localisation net reports no {self.metric}: search with "
                              "--metric val_loc_error (or val_loss)")  # fmt: skip
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: SearchConfig | None = None) -> SearchConfig:
        """`values` (e.g. a YAML file) over `base`: `train` and `space` merge field by field."""
        base = base or cls()
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {str(k) for k in set(values) - known}
        space = values.pop("space", None) or {}
        overrides = values.pop("train", None) or {}
        for key, given in (("space", space), ("train", overrides)):
            if not isinstance(given, dict):
                raise ConfigError(f"config: {key} must be a mapping of options, got {given!r}")
        unknown |= {f"space.{k}" for k in set(space) - set(SearchSpace.__dataclass_fields__)}
        if unknown:
            raise ConfigError(f"unknown search option(s): {', '.join(sorted(unknown))}")
        train = base.train.to_dict()
        overrides = dict(overrides)
        data = overrides.pop("data", None) or {}  # not a mapping: TrainConfig.from_dict says so
        train["data"] = {**train["data"], **data} if isinstance(data, dict) else data
        train.update(overrides)
        space_values = {}
        for key, value in space.items():  # each value or value of a list, as its field's type
            item_type = typing.get_args(field_types(SearchSpace)[key])[0]
            items = value if isinstance(value, list | tuple) else [value]
            space_values[key] = tuple(check_value(item_type, v, f"space.{key}") for v in items)
        for name in SearchSpace.RANGES:  # a single value fixes a range
            if name in space_values and len(space_values[name]) == 1:
                space_values[name] = space_values[name] * 2
            if name in space_values and len(space_values[name]) != 2:
                raise ConfigError(f"search space: {name} is a range: give [low, high] or a value")
        return replace(
            base,
            **checked_fields(cls, values),
            train=TrainConfig.from_dict(train, "train."),
            space=replace(base.space, **space_values),
        )


def demo_search(arch: str = "A", **overrides: Any) -> SearchConfig:
    """The embedded default: 4 trials of 4 epochs on the demo data, net A at 1/16 width (the
    cheapest net), batches the demo set fits; a few minutes on a 2-core laptop."""
    train = demo(arch, epochs=4, step_size=2, warmup_epochs=1, cpus_per_worker=0.5)
    space = SearchSpace(lr=(3e-3, 5e-2), global_batch=(16, 32), lr_patience=(1, 2))
    values: dict[str, Any] = dict(train=train, space=space, num_samples=4, perturbation_interval=1)
    values.update(overrides)
    return SearchConfig(**values)


def paper_search(arch: str = "A", **overrides: Any) -> SearchConfig:
    """Around the paper's recipe at full size (use with a manifest of ImageNet shards)."""
    return SearchConfig(**{"train": paper(arch), "num_samples": 16, **overrides})


PROFILES = {"demo": demo_search, "paper": paper_search}


@dataclass(frozen=True)
class SearchSummary:
    """Where a finished search left its results."""

    name: str
    mlflow_run_id: str
    tracking_uri: str
    experiment_path: str
    best_config_path: str
    best_trial_id: str
    best_metrics: dict[str, float]
    rows: list[dict[str, Any]]
    """The results table: one row per trial."""


# ------------------------------------------------------------------------------ search side


def _tracking(config: SearchConfig) -> contextlib.AbstractContextManager[str]:
    """Trials log from many processes: a search needs a tracking server; a sqlite:/// store
    (the embedded default) is served by a local `mlflow server` for the search's duration."""
    uri = resolve_uri(config.train.tracking_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        return contextlib.nullcontext(uri)
    if not uri.startswith("sqlite:///"):
        raise ConfigError(
            f"a search needs an http(s) MLflow tracking server or a sqlite:/// database (served "
            f"for the search by a local mlflow server), got {uri!r}"
        )
    return serve_sqlite(uri)


def _concurrency(config: SearchConfig) -> int:
    """Trials at once: as many as the cluster's CPUs and GPUs hold."""
    import ray

    from vgg_ray.train_job import gpus_per_worker

    if config.max_concurrent_trials:
        return config.max_concurrent_trials
    train = config.train
    resources = ray.cluster_resources()
    # each trial: its workers, plus a CPU for its Ray Data read/decode tasks
    per_trial_cpu = train.workers * train.cpus_per_worker + train.data.read_cpus
    fits = int(resources.get("CPU", 1) // per_trial_cpu)
    gpus = gpus_per_worker(train)
    if gpus:
        fits = min(fits, int(resources.get("GPU", 0) // (gpus * train.workers)))
    return max(1, min(fits, config.num_samples))


def _scheduler(config: SearchConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if config.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epochs_done",
            max_t=config.train.epochs,
            grace_period=min(config.grace_period, config.train.epochs),
            reduction_factor=config.reduction_factor,
        )
    mutations = {}
    for name in SearchSpace.RANGES:
        low, high = getattr(config.space, name)
        if low < high:
            mutations[name] = tune.loguniform(low, high)
    if not mutations:
        raise ConfigError("PBT perturbs lr and weight decay: give one of them a range")
    return PopulationBasedTraining(
        time_attr="epochs_done",
        perturbation_interval=config.perturbation_interval,
        hyperparam_mutations=mutations,
        synch=config.pbt_synch,
        log_config=True,  # pbt_global.txt / pbt_policy_*.txt in the experiment folder
    )


def _search_storage(config: SearchConfig, home: Path) -> tuple[Any, str, str]:
    """(filesystem or None, Tune's storage path, the trials' Train storage path)."""
    storage = config.storage_path or str(home / "searches")
    if storage.startswith("s3://"):
        from vgg_ray.storage import open_storage

        filesystem, path = open_storage(storage, s3_endpoint=config.train.data.s3_endpoint)
        return filesystem, path, f"{storage.rstrip('/')}/{config.name}-trials"
    path = Path(storage).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return None, str(path), str(path / f"{config.name}-trials")


def _parent_run(client, experiment_id: str, config: SearchConfig, *, resume: bool) -> str:
    from mlflow.entities import Param

    if resume:
        found = runs_tagged(client, [experiment_id], {SEARCH_TAG: config.name,
                            "vgg_ray.role": "search"})  # fmt: skip
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=config.name,
                            tags={SEARCH_TAG: config.name, "vgg_ray.role": "search",
                                  "arch": config.train.arch})  # fmt: skip
    params = {k: v for k, v in config.to_dict().items() if k not in ("train", "space")}
    params.update({f"space.{k}": v for k, v in config.to_dict()["space"].items()})
    params.update({f"train.{k}": v for k, v in config.train.flat().items()})
    client.log_batch(run.info.run_id,
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()])  # fmt: skip
    return run.info.run_id


_ACTIVE: dict[str, dict[str, Any]] = {}
"""Per search name, where its MLflow runs are: filled by `search` in this process. A restored
Tuner brings back its callbacks as they were pickled; looking this up at call time keeps them
pointing at the tracking server of this session."""


class TrialStatus(tune.Callback):
    """On the search driver: sets each trial's child run status as Tune decides it."""

    def __init__(self, name: str):
        self.name = name

    def _run(self, trial):
        from mlflow.tracking import MlflowClient

        where = _ACTIVE.get(self.name)
        if where is None:
            return None, None
        client = MlflowClient(where["tracking_uri"])
        found = runs_tagged(client, [where["experiment_id"]], {TRIAL_ID_TAG: trial.trial_id,
                            "mlflow.parentRunId": where["parent_run_id"]})  # fmt: skip
        return client, (found[0].info.run_id if found else None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        client, run_id = self._run(trial)
        if run_id:
            done = (trial.last_result or {}).get("epochs_done", 0)
            stopped = done < _ACTIVE[self.name]["epochs"]
            client.set_tag(run_id, "vgg_ray.stopped_early", str(stopped).lower())
            client.set_terminated(run_id, "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        client, run_id = self._run(trial)
        if run_id:
            client.set_tag(run_id, "vgg_ray.retried", "true")

    def on_trial_error(self, iteration, trials, trial, **info):
        client, run_id = self._run(trial)
        if run_id:
            client.set_terminated(run_id, "FAILED")


def resolve(config: SearchConfig) -> SearchConfig:
    """Fill the embedded defaults: the search's name."""
    return replace(config, name=config.name or f"search-{datetime.now():%Y%m%d-%H%M%S}")


def search(
    config: SearchConfig,
    *,
    resume: bool = False,
    driver: Callable[[dict[str, Any], dict[str, Any]], None] = run_trial,
) -> SearchSummary:
    """Run (or with `resume`, continue) one schedule search; the function `vgg-ray tune` and
    jobs/tune_schedule.py call. `driver` is a trial's Tune driver function (tests wrap it).
    Ctrl-C (or SIGUSR1) ends the search with its state saved; `resume` continues it."""
    from mlflow.tracking import MlflowClient

    from vgg_ray import runtime
    from vgg_ray.train_job import preflight

    config = resolve(config).validate()
    home = default_home()
    filesystem, storage, trials_storage = _search_storage(config, home)
    experiment_path = f"{storage.rstrip('/')}/{config.name}"
    exists = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if exists and not resume:
        raise ConfigError(f"search {config.name!r} already exists in {storage}; pass --resume to "
                          "continue it, or another --name")  # fmt: skip
    if resume and not exists:
        raise ConfigError(f"no search {config.name!r} in {storage} to resume")
    data = config.train.data  # trials run in their own working directories
    config = replace(config, train=replace(config.train, data=replace(
        data, manifest=absolute(data.manifest))))  # fmt: skip

    preflight(config.train)  # the data, the init, the config: before a server or Ray starts
    runtime.connect()
    with _tracking(config) as tracking_uri:
        client = MlflowClient(tracking_uri)
        experiment_id = named_experiment(client, config.train.experiment)
        parent_run_id = _parent_run(client, experiment_id, config, resume=resume)
        concurrency = _concurrency(config)
        print(
            f"vgg-ray tune: search {config.name!r}: {config.num_samples} trials of net "
            f"{config.train.arch} ({config.scheduler}, {concurrency} at a time); MLflow run "
            f"{parent_run_id} at {tracking_uri}",
            flush=True,
        )
        context = {
            "train": config.train.to_dict(),
            "trials_storage": trials_storage,
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
            "name": config.name,
        }
        # The driver function only waits on its TorchTrainer, whose workers hold the resources
        # (Tune refuses a trial of no resources at all).
        trainable = tune.with_resources(
            tune.with_parameters(driver, context=context), {"CPU": 0.01}
        )
        _ACTIVE[config.name] = dict(
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            epochs=config.train.epochs,
        )
        try:
            if resume:
                tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True,
                                           storage_filesystem=filesystem)  # fmt: skip
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=config.space.param_space(),
                    tune_config=tune.TuneConfig(
                        metric=config.metric,
                        mode="min",
                        scheduler=_scheduler(config),
                        search_alg=_searcher(config, concurrency),
                        num_samples=config.num_samples,
                        reuse_actors=False,  # a trial's process ends with its Train run
                    ),
                    run_config=tune.RunConfig(
                        name=config.name,
                        storage_path=storage,
                        storage_filesystem=filesystem,
                        failure_config=tune.FailureConfig(max_failures=config.trial_max_failures),
                        # PBT warns below 3: a donor's checkpoint must outlive its next ones
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                        callbacks=[TrialStatus(config.name)],
                        # A trial ends with its last epoch, before a scheduler decides on it:
                        # PBT would otherwise clone a finished trial into one with no epochs left.
                        stop={"epochs_done": config.train.epochs},
                        verbose=1,
                    ),
                )
            # A trial that diverges in its first epoch ends without a result; Tune's check that
            # every result holds the metric would fail the whole search over it.
            with mock.patch.dict(os.environ, TUNE_DISABLE_STRICT_METRIC_CHECKING="1"):
                grid = tuner.fit()
        except BaseException as error:
            status = "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
            for run in client.search_runs(  # trials cut off with the search end with it
                [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                "AND attributes.status = 'RUNNING'",
            ):  # fmt: skip
                client.set_terminated(run.info.run_id, status)
            client.set_terminated(parent_run_id, status)
            raise
        return _finish(config, grid, client, parent_run_id, tracking_uri, experiment_path, home)


def _searcher(config: SearchConfig, concurrency: int):
    """Random search over the space, seeded so a search's trials can be drawn again. It caps
    the trials at once itself: Tune ignores `TuneConfig.max_concurrent_trials` for it."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrency)


def _finish(
    config: SearchConfig, grid, client, parent_run_id: str, tracking_uri: str,
    experiment_path: str, home: Path,
) -> SearchSummary:  # fmt: skip
    """Results table and best config, logged on the parent run."""
    import tempfile

    metric, rows, results = config.metric, [], {}
    diverged = {
        run.data.tags.get(TRIAL_ID_TAG)
        for run in runs_tagged(
            client,
            [client.get_run(parent_run_id).info.experiment_id],
            {"mlflow.parentRunId": parent_run_id, DIVERGED_TAG: "true"},
        )  # fmt: skip
    }
    for result in grid:
        last = result.metrics or {}
        history = result.metrics_dataframe
        values = [] if history is None or metric not in history else history[metric].dropna()
        epochs = int(last.get("epochs_done", 0))
        status = "finished" if epochs >= config.train.epochs else "stopped early"
        trial = last.get("trial_id") or Path(result.path).name
        # `trial` is the id, or (no epoch reported) the trial's folder name, which holds it
        status = "diverged" if any(d and d in trial for d in diverged) else status
        results[trial] = result
        rows.append({
            "trial": trial,
            "status": "error" if result.error else status,
            "epochs": epochs,
            # a trial that failed before it started has no config
            **{k: (result.config or {}).get(k) for k in SearchSpace.__dataclass_fields__},
            f"last_{metric}": last.get(metric, math.nan),
            f"best_{metric}": float(min(values)) if len(values) else math.nan,
        })  # fmt: skip
    rows.sort(key=lambda r: math.inf if math.isnan(r[f"best_{metric}"]) else r[f"best_{metric}"])
    if not rows or math.isnan(rows[0][f"best_{metric}"]):
        client.set_terminated(parent_run_id, "FAILED")
        counts = Counter(row["status"] for row in rows)
        ended = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        raise ConfigError(f"search {config.name!r}: no trial reported a result ({ended}); see "
                          f"the trials under {experiment_path}")  # fmt: skip
    best = rows[0]
    best_result = results[best["trial"]]
    if config.best_config:
        best_path = Path(config.best_config)
    elif "://" in experiment_path or config.storage_path.startswith("s3://"):
        best_path = home / "searches" / f"{config.name}-best.yaml"
    else:
        best_path = Path(f"{experiment_path}-best.yaml")
    best_path.parent.mkdir(parents=True, exist_ok=True)
    best_train = trial_config(config.train, best_result.config)
    best_path.write_text(best_config_yaml(best_train, source=f"{config.name}, {best['trial']}"))

    with tempfile.TemporaryDirectory() as directory:
        table = Path(directory) / "results.csv"
        with table.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (Path(directory) / "results.md").write_text(_markdown(rows))
        client.log_artifact(parent_run_id, str(table))
        client.log_artifact(parent_run_id, str(Path(directory) / "results.md"))
    client.log_artifact(parent_run_id, str(best_path))
    client.log_metric(parent_run_id, f"best_{metric}", best[f"best_{metric}"])
    client.set_tag(parent_run_id, "best_trial", best["trial"])
    client.set_terminated(parent_run_id, "FINISHED")
    job = f"jobs/train_{config.train.arch.replace('-', '_')}.py"
    print(
        f"{_markdown(rows)}vgg-ray tune: best trial {best['trial']}: {metric} "
        f"{best[f'best_{metric}']:.3f}\n  best config: {best_path} (train it: {job} --config "
        f"{best_path})\n  MLflow run {parent_run_id} at {tracking_uri}",
        flush=True,
    )
    best_metrics = {k: v for k, v in (best_result.metrics or {}).items()
                    if isinstance(v, int | float)}  # fmt: skip
    return SearchSummary(config.name, parent_run_id, tracking_uri, experiment_path,
                         str(best_path), best["trial"], best_metrics, rows)  # fmt: skip


def best_config_yaml(config: TrainConfig, *, source: str = "") -> str:
    """A TrainConfig as the YAML that `vgg-ray train --config` reads, without where a run goes
    (run_name, storage_path, tracking_uri: the new run's own)."""
    import yaml

    values = config.to_dict()
    for name in ("run_name", "storage_path", "tracking_uri"):
        values.pop(name)
    values["data"]["scale"] = list(values["data"]["scale"])  # YAML has no tuples
    header = f"# best config of Tune search {source}\n" if source else ""
    return header + yaml.safe_dump(values, sort_keys=False)


def _markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"
