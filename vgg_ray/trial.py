"""One trial of a schedule search: the Tune driver function that runs one training run.

`run_trial` builds the trial's TorchTrainer (the training plane's, `train_job.build_trainer`)
and fits it in a thread while it reports each epoch to Tune from its own: a Train callback on
the controller (`ForwardEpochs`) hands the epochs over through a Ray queue. The trial's MLflow
run is a child of the search's (`_child_run`), the same run on every restart.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from ray import tune
from ray.train import UserCallback

from vgg_ray import checkpoint as ckpt
from vgg_ray.config import TrainConfig
from vgg_ray.tracking import DIVERGED_TAG, run_tags, runs_tagged

TRIAL_ID_TAG = "vgg_ray.trial_id"
SEARCH_TAG = "vgg_ray.search"


class ForwardEpochs(UserCallback):
    """Train callback (on the Train controller): hands each epoch-end report to the trial's
    driver function through a Ray queue. Mid-epoch checkpoints are left out: Tune ranks epochs.

    Ray's own TuneReportCallback forwards metrics only; PBT and trial restarts need Tune to
    hold checkpoints, and only the driver function can report those (`ray.tune.report`)."""

    def __init__(self, reports):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "val_top1_error" in metrics[0]:
            self.reports.put((metrics[0], checkpoint))


def trial_config(base: TrainConfig, params: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The base training config with a trial's sampled values."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return replace(base, **{k: v for k, v in params.items() if k in fields}, **overrides)


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """Tune driver function of one trial: fit the trial's TorchTrainer, report its epochs.

    Runs again after a failure, a PBT exploit or a resumed search; each run is a fresh Train
    run that starts from the checkpoint Tune gives (`ray.tune.get_checkpoint()`)."""
    from ray.util.queue import Queue

    from vgg_ray.train_job import build_trainer

    trial_id = tune.get_context().get_trial_id()
    start = tune.get_checkpoint()
    config = trial_config(
        TrainConfig.from_dict(context["train"]),
        params,
        # A fresh Train run per attempt: Train's own resume would prefer the run's latest
        # checkpoint over the donor's that PBT hands over.
        run_name=f"{trial_id}-{uuid.uuid4().hex[:6]}",
        storage_path=context["trials_storage"],
        tracking_uri=context["tracking_uri"],
    ).validate()
    start_epoch = 0
    if start is not None:
        with start.as_directory() as directory:
            start_epoch = ckpt.load_state(directory)["loop"]["epoch"]
    run_id = _child_run(context, trial_id, config, params, start, start_epoch)

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(config, run_id, callbacks=[ForwardEpochs(reports)],
                            start_checkpoint=start)  # fmt: skip
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the driver thread, which raises it
            outcome["error"] = error

    # fit() blocks until training ends; meanwhile this thread reports each epoch to Tune (a
    # Tune report must come from the driver function's own thread). Daemon: when Tune stops
    # the trial (ASHA), the trial's process ends and takes the Train run with it.
    fitting = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    fitting.start()
    _report_epochs(fitting, reports)
    if "error" in outcome:
        raise outcome["error"]
    _end(config, run_id, outcome["result"])


def _report_epochs(fitting: threading.Thread, reports) -> None:
    """Each epoch the Train callback queued, reported to Tune, until `fitting` ends."""
    from ray.util.queue import Empty

    while True:
        alive = fitting.is_alive()  # read before get(): a last report is never missed
        try:
            metrics, checkpoint = reports.get(timeout=1.0)
        except Empty:
            if alive:
                continue
            return
        tune_checkpoint = None
        if checkpoint is not None:
            tune_checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        tune.report({**metrics, "epochs_done": metrics["epoch"] + 1},
                    checkpoint=tune_checkpoint)  # fmt: skip


def _end(config: TrainConfig, run_id: str, result) -> None:
    """A trial's fit done: what the workers could not send reaches its run before Tune marks
    it FINISHED; a diverged trial ends here, tagged, not as an error (a retry would diverge
    the same way)."""
    from mlflow.tracking import MlflowClient

    from vgg_ray.train_job import deliver_unsent

    if result.checkpoint is not None:
        deliver_unsent(config, run_id, ckpt.load_newest_intact(result.checkpoint),
                       result.checkpoint)  # fmt: skip
    if (result.metrics or {}).get("diverged"):
        MlflowClient(config.tracking_uri).set_tag(run_id, DIVERGED_TAG, "true")


def _child_run(
    context: dict[str, Any], trial_id: str, config: TrainConfig, params: dict[str, Any],
    start, start_epoch: int,
) -> str:  # fmt: skip
    """The trial's MLflow run, nested under the search's; the same run on every restart."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(context["tracking_uri"])
    experiment_id = context["experiment_id"]
    found = runs_tagged(client, [experiment_id], {TRIAL_ID_TAG: trial_id,
                        "mlflow.parentRunId": context["parent_run_id"]})  # fmt: skip
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {**run_tags(config), "mlflow.parentRunId": context["parent_run_id"],
                TRIAL_ID_TAG: trial_id, SEARCH_TAG: context["name"]}  # fmt: skip
        run_id = client.create_run(experiment_id, run_name=trial_id, tags=tags).info.run_id
        params_out = {k: str(v)[:6000] for k, v in config.flat().items() if k != "run_name"}
        client.log_batch(run_id, params=[Param(k, v) for k, v in params_out.items()])
    # Params cannot change in MLflow; a PBT trial's values do: log them at each start.
    now = int(time.time() * 1000)
    values = {f"trial_{k}": float(v) for k, v in params.items() if isinstance(v, int | float)}
    values["start_epoch"] = start_epoch
    client.log_batch(run_id, metrics=[Metric(k, v, now, start_epoch) for k, v in values.items()])
    client.set_tag(run_id, "schedule", config.schedule)
    if start is not None:
        client.set_tag(run_id, "vgg_ray.start_checkpoint", start.path)
    return run_id
