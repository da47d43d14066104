"""Everything MLflow, in one place: the tracking URI and its local default, clients and
experiments, runs and registered versions named by a model source, the tags every run carries,
logging a trained net, and the metrics of a run, which never stop training.

Rank 0 holds a `Tracker`; every other rank a `NullTracker`, so the loop has no `if rank == 0`.
Metrics are queued and sent in batches; while the tracking server is unreachable they stay queued
(training goes on and says so once), and reach the run when the server is back. What is still
queued when a checkpoint is written travels in it (`unsent`): a restarted worker sends it again,
and after the last checkpoint the driver delivers it (`deliver`) before the run is FINISHED.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from vgg_ray.errors import ConfigError

log = logging.getLogger("vgg_ray.tracking")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id, as a model source may give one
DIVERGED_TAG = "vgg_ray.diverged"
"""Set on the MLflow run of a training run or Tune trial that stopped as diverged."""


def configure_uploads() -> None:
    """Large artifacts (VGG-E's weights are about 550 MB in fp32) go to S3 in parts where the
    tracking server supports it: an `mlflow server --artifacts-destination s3://...` hands out
    presigned part URLs, and MLflow 3.17 asks its /server-info whether it can, unless
    MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD forces the answer. A part that fails is retried alone,
    and no single request has to carry half a gigabyte through the proxy. MLflow's default
    threshold (500 MB) would leave a VGG-D member (about 530 MB) one bad request away from
    starting over; 64 MB files and up go in parts here. Values already set are kept."""
    os.environ.setdefault("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(64 * 2**20))
    os.environ.setdefault("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(16 * 2**20))


def server_environment(**extra: str) -> dict[str, str]:
    """The environment of an `mlflow server` vgg-ray starts: this one, without MLflow's job
    runner (seven worker processes for GenAI jobs vgg-ray never submits; about 30 CPU-seconds
    at every start, a third of a search's start-up on a laptop)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **extra}


def check_reachable(tracking_uri: str, *, timeout_s: float = 5.0) -> None:
    """ConfigError within seconds when an MLflow server does not answer. MLflow's own client
    retries with backoff for minutes before it gives up; that patience is right for uploads in
    the middle of a run, wrong for a typo in --tracking-uri at its start."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # it answers (a proxy in front may not route /health): the client will tell more
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"cannot reach MLflow at {tracking_uri}: {reason}") from None


def open_client(tracking_uri: str):
    """An MlflowClient on `tracking_uri` (its registry too), the folder of a local sqlite
    database made, a server checked to answer within seconds."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_reachable(tracking_uri)
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def resolve_uri(tracking_uri: str) -> str:
    """The tracking URI a command uses: the one given, else MLFLOW_TRACKING_URI, else the
    embedded default, a SQLite database in the default home."""
    from vgg_ray.config import default_home

    return (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{default_home() / 'mlflow.db'}")  # fmt: skip


def run_tags(config: Any) -> dict[str, str]:
    """The tags every training run and trial carries (a `TrainConfig`): what ran, from which
    commit, on which stack, over which data."""
    import subprocess
    from pathlib import Path

    import ray
    import torch

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


def get_run(client, run_id: str):
    """The MLflow run `run_id`; ConfigError naming the store when there is none."""
    try:
        return client.get_run(run_id)
    except Exception as error:
        raise ConfigError(f"no MLflow run {run_id} at {client.tracking_uri}: "
                          f"{str(error).splitlines()[0][:200]}") from None  # fmt: skip


def runs_tagged(client, experiment_ids: list[str], tags: dict[str, str], **search: Any) -> list:
    """The runs of `experiment_ids` that carry every tag in `tags` (an exact match each);
    `search` goes to `search_runs` (order_by, max_results, ...). How runs are found again: a
    training run by its name, a search's and trials' by their ids, a chain's by its name."""
    query = " AND ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return client.search_runs(list(experiment_ids), filter_string=query, **search)


def source_run_id(source: str) -> str | None:
    """The run id a model source names (`runs:/<id>[/path]` or a bare run id that is not a
    path); None for anything else (a checkpoint, a `models:/` URI)."""
    from pathlib import Path

    if source.startswith("runs:/"):
        return source.removeprefix("runs:/").partition("/")[0]
    if RUN_ID.match(source) and not Path(source).exists():
        return source
    return None


def version_by_alias(client, name: str, alias: str):
    """The version holding `alias`; ConfigError naming what exists when there is none."""
    try:
        model = client.get_registered_model(name)
    except Exception:
        raise ConfigError(f"no registered model {name!r} at {client.tracking_uri}") from None
    if alias not in model.aliases:
        known = ", ".join(f"@{a} (version {v})" for a, v in sorted(model.aliases.items()))
        raise ConfigError(f"registered model {name!r} has no alias @{alias} (it has: "
                          f"{known or 'no aliases'})")  # fmt: skip
    return client.get_model_version_by_alias(name, alias)


def model_version(client, uri: str):
    """The version a `models:/name/version` or `models:/name@alias` URI names."""
    spec = uri.removeprefix("models:/")
    if "@" in spec:
        return version_by_alias(client, *spec.split("@", 1))
    name, _, number = spec.rpartition("/")
    try:
        return client.get_model_version(name, number)
    except Exception:
        raise ConfigError(f"no registered model {uri}") from None


def use_store(tracking_uri: str) -> None:
    """Point MLflow's process-wide URIs (tracking and registry) at one store: `models:/` and
    `runs:/` downloads resolve through them, whatever client a caller holds."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing. On a local sqlite:/// store its
    artifacts go beside the database (<folder>/mlartifacts), not into ./mlruns of whatever
    folder the first run happened to start in."""
    from pathlib import Path

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def model_requirements(*packages: str) -> list[str]:
    """Pinned pip requirements of a logged model: the pickled net is a `vgg_ray.models.VGG`.
    Named, not inferred: MLflow's inference reloads the model in a subprocess (~10 s a model)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("vgg-ray", "torch", "torchvision", *packages)]


def log_net(state: dict[str, Any]) -> None:
    """Log a trained net (a checkpoint's state) to the active MLflow run as `model`: an MLflow
    PyTorch model with signature and input example, for MLflow's own tools, that carries the
    weights-only state vgg-ray loads it from (`checkpoint.load_logged_state`), never the pickle."""
    import tempfile
    from pathlib import Path

    import mlflow.pytorch
    import torch

    from vgg_ray import checkpoint as ckpt

    state = ckpt.net_state(state)
    crop = state.get("config", {}).get("data", {}).get("crop", 224)
    configure_uploads()
    with tempfile.TemporaryDirectory() as directory:
        mlflow.pytorch.log_model(
            ckpt.model_from_state(state).eval(),
            name="model",
            input_example=torch.zeros(1, 3, crop, crop).numpy(),
            serialization_format="pickle",
            pip_requirements=model_requirements(),
            extra_files=[
                str(ckpt.save_state(directory, state)),
                str(Path(directory) / ckpt.DIGEST_FILE),
            ],
            metadata={"classes": list(state["classes"]), "arch": state["arch"]},
        )


class NullTracker:
    """What non-zero ranks hold: every call does nothing."""

    run_id: str | None = None
    dropped = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> int:
        return 0

    def unsent(self) -> list[tuple[str, float, int, int]]:
        return []

    def requeue(self, values: list[tuple[str, float, int, int]]) -> None:
        pass


def deliver(client, run_id: str, values: list[tuple[str, float, int, int]]) -> None:
    """Send metric values a worker could not (`Tracker.unsent`), in order, with MLflow's own
    patient retries (minutes): what is called at the end of a run, when waiting is right."""
    from mlflow.entities import Metric

    metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in values]
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)


class Tracker(NullTracker):
    """Logs to one MLflow run, buffering through outages of the tracking server."""

    def __init__(self, tracking_uri: str, run_id: str, *, max_buffered: int = 100_000):
        from mlflow.tracking import MlflowClient

        # In the rank-0 worker only: MLflow's own HTTP retries back off for minutes per call;
        # the tracker retries across steps instead, so one call must fail fast. (The driver's
        # model upload keeps MLflow's patient defaults.)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.pending: list = []
        self.max_buffered = max_buffered
        self.dropped = 0
        self.outage_since: float | None = None
        # While the server is down, a send is tried again only after this moment (backing off
        # 5 s doubling to 60 s): each failed send blocks for MLflow's own retries, seconds.
        self.retry_at = 0.0
        self.retry_delay = 5.0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) > self.max_buffered:  # bounded memory through a very long outage
            self.dropped += len(self.pending) - self.max_buffered
            self.pending = self.pending[-self.max_buffered :]
        if time.monotonic() >= self.retry_at:
            self.flush()

    def flush(self) -> int:
        """Send what is queued; return how many metric values are still waiting."""
        while self.pending:
            batch = self.pending[:1000]  # MLflow's log_batch limit
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as error:
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log.warning(
                        "MLflow tracking unreachable (%s); training goes on, metrics are "
                        "buffered and sent when it is back",
                        str(error).splitlines()[0][:200],
                    )
                self.retry_at = time.monotonic() + self.retry_delay
                self.retry_delay = min(2 * self.retry_delay, 60.0)
                return len(self.pending)
            del self.pending[: len(batch)]
        if self.outage_since is not None:
            log.warning(
                "MLflow tracking is back after %.0f s; buffered metrics sent",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
        self.retry_at, self.retry_delay = 0.0, 5.0
        return 0

    def unsent(self) -> list[tuple[str, float, int, int]]:
        """What is queued, as plain values a weights-only checkpoint can carry."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self.pending]

    def requeue(self, values: list[tuple[str, float, int, int]]) -> None:
        """Queue again what a checkpoint carried unsent (sent at least once: a value may arrive
        twice, never not at all)."""
        from mlflow.entities import Metric

        self.pending = [Metric(*value) for value in values] + self.pending
