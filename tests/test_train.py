"""The training plane on a real local Ray and a real MLflow store, through the real pipeline:
generated JPEGs -> prepare -> shards -> Ray Data stream -> Ray Train workers (DDP on CPU)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_shards, train_workers

from vgg_ray import checkpoint as ckpt
from vgg_ray.config import TrainConfig, demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """3 visually distinct classes, 48 training and 12 validation images each (40-56 px)."""
    return make_shards(tmp_path_factory.mktemp("data"), classes=3, train_per_class=48,
                       val_per_class=12)  # fmt: skip


def tiny(manifest: str, tmp_path: Path, **overrides) -> TrainConfig:
    config = demo("A", epochs=3, global_batch=24, lr=0.01, log_every_steps=2)
    data = replace(config.data, manifest=manifest, scale=(36, 48), eval_scale=40)
    values = dict(
        data=data,
        storage_path=str(tmp_path / "checkpoints"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        cpus_per_worker=0.5,
        run_name="tiny",
    )
    values.update(overrides)
    return replace(config, **values)


def _worker_environments(found: dict[int, bytes], watching: threading.Event) -> None:
    """While `watching` is set: the environment of each Ray Train worker of this process."""
    while watching.is_set():
        for pid in train_workers():
            with contextlib.suppress(OSError):
                found.setdefault(pid, Path(f"/proc/{pid}/environ").read_bytes())
        time.sleep(0.2)


def test_two_workers_train_and_the_run_is_tracked(ray_cluster, manifest, tmp_path):
    from mlflow.tracking import MlflowClient

    from vgg_ray.train_job import train

    config = tiny(manifest, tmp_path, workers=2, epochs=4)
    environments: dict[int, bytes] = {}
    watching = threading.Event()
    watcher = threading.Thread(target=_worker_environments, args=(environments, watching))
    watching.set()
    watcher.start()
    summary = train(config)
    watching.clear()
    watcher.join()
    # The torch collective of a local run keeps to loopback (docs/reliability.md, Security).
    assert len(environments) == 2
    assert all(b"GLOO_SOCKET_IFNAME=lo\0" in env for env in environments.values())
    client = MlflowClient(config.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)

    # The error falls: chance is 2/3 top-1 error on 3 classes.
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(history) == 4
    assert history[-1] < history[0]
    assert summary.metrics["val_top1_error"] < 0.6

    assert run.data.params["arch"] == "A" and run.data.params["workers"] == "2"
    assert run.data.params["data.scale"] == "(36, 48)"
    for metric in ("val_top5_error", "images_per_s", "data_wait_share", "lr", "train_top1_error"):
        assert metric in run.data.metrics
    assert run.data.tags["arch"] == "A" and run.data.tags["git_commit"]
    assert run.data.tags["best_checkpoint"] == summary.best_checkpoint
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "curves.png" in artifacts

    import mlflow.pytorch

    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)

    # Latest and best k checkpoints kept, each loadable with weights_only.
    kept = sorted(Path(summary.checkpoint_path).glob("epoch-*"))
    assert 1 <= len(kept) <= config.keep_best + 1
    state = ckpt.load_state(kept[-1])
    assert state["loop"]["epoch"] == 4 and len(state["loop"]["history"]) == 4


def test_a_local_ray_finds_itself_not_another_instance(ray_cluster):
    """Ray Train's placement-group cleaner looks its cluster up by the address record of the
    temp folder it inherits; with other Ray instances on the machine it must find ours, or it
    removes the run's placement group (vgg_ray.runtime.start_local)."""
    import ray

    @ray.remote(num_cpus=0)
    def the_cluster_a_task_finds() -> str:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die(None)

    own = ray.get_runtime_context().gcs_address
    assert ray.get(the_cluster_a_task_finds.remote()) == own


def test_one_and_two_workers_take_the_same_global_steps(ray_cluster, manifest, tmp_path):
    from vgg_ray.train_job import train

    results = {}
    for workers in (1, 2):
        config = tiny(manifest, tmp_path / str(workers), workers=workers, epochs=2,
                      run_name=f"w{workers}")  # fmt: skip
        summary = train(config)
        state = ckpt.load_state(sorted(Path(summary.checkpoint_path).glob("epoch-*"))[-1])
        results[workers] = (state["loop"]["step"], summary.metrics)
    # 144 training images, global batch 24: 6 steps an epoch whatever the worker count.
    assert results[1][0] == results[2][0] == 12
    assert results[1][1]["train_loss"] == pytest.approx(results[2][1]["train_loss"], rel=0.25)


def test_resume_continues_at_the_right_epoch_and_step(ray_cluster, manifest, tmp_path, capfd):
    from vgg_ray.errors import ConfigError
    from vgg_ray.train_job import train

    config = tiny(manifest, tmp_path, epochs=1, checkpoint_every_steps=4)
    first = train(config)
    with pytest.raises(ConfigError, match="already exists"):
        train(config)
    second = train(replace(config, epochs=2), resume=True)
    state = ckpt.load_state(sorted(Path(second.checkpoint_path).glob("epoch-*"))[-1])
    assert [h["epoch"] for h in state["loop"]["history"]] == [0, 1]
    assert state["loop"]["step"] == 12
    assert second.mlflow_run_id == first.mlflow_run_id

    # A damaged latest checkpoint: --resume continues from the newest one that verifies,
    # naming the one it skipped, and the finished run ends FINISHED again.
    from mlflow.tracking import MlflowClient

    kept = sorted(Path(second.checkpoint_path).glob("epoch-*"))
    latest = kept[-1] / ckpt.STATE_FILE
    data = bytearray(latest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    latest.write_bytes(bytes(data))
    third = train(replace(config, epochs=2), resume=True)
    printed = capfd.readouterr()
    assert f"skipping checkpoint {kept[-1].name}" in printed.out + printed.err
    state = ckpt.load_state(sorted(Path(third.checkpoint_path).glob("epoch-*"))[-1])
    assert [h["epoch"] for h in state["loop"]["history"]] == [0, 1]
    assert state["loop"]["step"] == 12
    client = MlflowClient(config.tracking_uri)
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"

    # Nothing intact left: one line on the driver (no cluster time), naming a damaged file and
    # what to do instead, and the finished run stays FINISHED.
    for folder in Path(third.checkpoint_path).glob("epoch-*"):
        (folder / ckpt.STATE_FILE).write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match=r"damaged.*no checkpoint of the run verifies: start a"):
        train(replace(config, epochs=2), resume=True)
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
