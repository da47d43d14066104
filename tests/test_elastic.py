"""Elastic, preemptible training on a real multi-node Ray cluster on loopback (a head and two
worker nodes, each node room for one training worker): a node lost mid-epoch, the run going on
with the worker that remains; capacity returning and the run growing back; a node drained for
preemption by a SIGTERM to its training worker. Every training image exactly once per epoch
throughout (a ledger every worker writes through the test-only trace hook), and the same result
as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_shards
from mlflow.tracking import MlflowClient

from vgg_ray import checkpoint as ckpt
from vgg_ray.config import TrainConfig, demo
from vgg_ray.data import TRACE, EpochOrder
from vgg_ray.manifest import load_manifest

TRAINER_CPUS = 3  # a worker node's CPUs: one training worker each, never one on the head


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from vgg_ray import runtime

    own = runtime.own_temp_dir()
    nodes = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 2, "temp_dir": str(own), "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        # A node that stops answering is declared dead in ~3 s, not Ray's default ~30 s.
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 1000},
    })  # fmt: skip
    runtime.record_address(own)
    for _ in range(2):
        nodes.add_node(num_cpus=TRAINER_CPUS)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """3 classes, 96 training images: 12 steps of 8 an epoch."""
    return make_shards(tmp_path_factory.mktemp("data"), classes=3, train_per_class=32,
                       val_per_class=8)  # fmt: skip


def tiny(manifest: str, tmp_path: Path, **overrides) -> TrainConfig:
    """Net A at 1/16 width on 32 px crops, no dropout: the weights are then a function of the
    steps' images alone (dropout masks would come from each worker's generator)."""
    config = demo("A", epochs=2, global_batch=8, lr=0.01, log_every_steps=1, dropout=0.0)
    data = replace(config.data, manifest=manifest, scale=(36, 44), eval_scale=40,
                   read_cpus=0.25)  # fmt: skip
    values = dict(data=data, storage_path=str(tmp_path / "checkpoints"), run_name="run",
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                  cpus_per_worker=TRAINER_CPUS, checkpoint_every_steps=2)  # fmt: skip
    return replace(config, **{**values, **overrides})


def _steps_done(config: TrainConfig) -> int:
    """The step of the run's newest whole checkpoint (0: none yet)."""
    folder = Path(config.storage_path) / config.run_name
    done = [int(p.name.split("-")[3]) for p in folder.glob("epoch-*-step-*")
            if (p / ckpt.DIGEST_FILE).exists()]  # fmt: skip
    return max(done, default=0)


def _training_actors() -> list:
    """The training workers alive now (Ray's actor states)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if "RayTrainWorker" in a.class_name]  # fmt: skip


def _training_nodes(nodes) -> list:
    """The cluster's worker nodes that host a training worker now."""
    busy = {a.node_id for a in _training_actors()}
    return [n for n in nodes.worker_nodes if n.node_id in busy]


def _training_worker_pid(node) -> int:
    """The process id of the training worker on `node`."""
    return next(a.pid for a in _training_actors() if a.node_id == node.node_id)


def _ledger(trace: Path) -> dict[int, dict[int, set[str]]]:
    """epoch -> step -> the keys trained on in it, over every attempt of every worker."""
    ledger: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for log in trace.glob("trained-*.log"):
        for line in log.read_text().splitlines():
            epoch, step, key = line.split(" ", 2)
            ledger[int(epoch)][int(step)].add(key)
    return ledger


def test_an_elastic_run_loses_a_node_grows_back_and_is_preempted_training_each_image_once(
    cluster, manifest, tmp_path, monkeypatch, capfd
):
    """--workers 1-2 on two nodes: a node is killed after step 6 (the run goes on with one
    worker), a node returns (the run grows back to two), then a training worker gets a SIGTERM,
    as a spot node's shutdown sends (the worker drains its node for preemption, the run
    checkpoints at once and restarts without the node, charged to max_preemptions: the one
    failure allowed went on the lost node; then the node goes, as a shutdown ends). The ledger
    shows every training image exactly once per epoch; the result equals an uninterrupted
    run's within float tolerance."""
    from vgg_ray.train_job import train

    baseline = train(tiny(manifest, tmp_path / "baseline", workers=1, epochs=3))

    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(TRACE, str(trace))
    # A worker group start that counted the draining node gives up in 20 s, not Ray's 60 s
    # (Ray Train hands this from the driver to its controller).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    # Ray Train's default 2-s poll of its workers (conftest shortens it for the other tests)
    # paces this run: a report every 2 steps waits for it, so the run lasts long enough for a
    # node to return and the group to grow before it ends.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    config = tiny(manifest, tmp_path / "elastic", workers=2, min_workers=1, epochs=3,
                  max_failures=1, max_preemptions=1, elastic_check_s=3.0,
                  sigterm_notice_s=5.0)  # fmt: skip
    events: list[str] = []

    def script() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and _steps_done(config) < 6:  # step 4's registered
            time.sleep(0.1)
        lost = _training_nodes(cluster)[-1]
        cluster.remove_node(lost, allow_graceful=False)  # a node lost outright
        events.append("lost")
        while time.monotonic() < deadline and _steps_done(config) < 14:
            time.sleep(0.1)
        cluster.add_node(num_cpus=TRAINER_CPUS)  # capacity back
        events.append("added")
        while time.monotonic() < deadline and len(_training_nodes(cluster)) < 2:
            time.sleep(0.2)
        events.append("grown")
        # A spot node's shutdown: a SIGTERM to its training worker, which Ray knows nothing of.
        reclaimed = _training_nodes(cluster)[-1]
        pid = _training_worker_pid(reclaimed)
        while time.monotonic() < deadline and not (trace / f"trained-{pid}.log").exists():
            time.sleep(0.05)  # in its training loop (a SIGTERM while it starts is not caught)
        os.kill(pid, signal.SIGTERM)
        events.append("sigterm")
        run = Path(config.storage_path) / config.run_name
        while time.monotonic() < deadline and not any(run.glob("*-preempted/state.sha256")):
            time.sleep(0.1)  # the checkpoint at the next step boundary polled
        # The worker drained its node: Ray restarts the run without it at the notice's deadline
        # and charges it to max_preemptions (max_failures went on the node lost above).
        while time.monotonic() < deadline and reclaimed in _training_nodes(cluster):
            time.sleep(0.2)
        # Then the node goes, as a spot node's shutdown ends (Ray's own `ray start --block` stops
        # its node after draining on a SIGTERM). Until it goes, Ray Train's elastic sizing still
        # counts the draining node and its worker group waits for a second worker there.
        cluster.remove_node(reclaimed, allow_graceful=True)
        events.append("restarted without it")

    # Nodes are added and removed from the main thread (Ray's node handles set signal
    # handlers); the run trains in another.
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(summary=train(config)), daemon=True)
    trainer.start()
    script()
    trainer.join(400)
    summary = result["summary"]
    assert events == ["lost", "added", "grown", "sigterm", "restarted without it"]
    out = capfd.readouterr()
    assert "1 of 2 workers lost; continuing on 1 at epoch" in out.out + out.err
    # The worker's line, on the console or, where the drained node's log forwarding stopped
    # before it, in the worker's logs (`ray logs`): Ray forwards a node's output best-effort.
    # Its stderr file (moved into logs/old/ once the worker is dead) and Ray Train's record of
    # its log lines (logs/train/), written at once.
    logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
    files = [*logs.rglob("worker-*.err"), *logs.rglob("ray-train-app-worker-*.log")]
    logged = out.out + out.err + "".join(f.read_text(errors="replace") for f in files)
    assert "got a SIGTERM: its node drains for preemption in 5 s" in logged

    # Every image once per epoch, whatever the worker count at each step.
    order = {epoch: EpochOrder(load_manifest(manifest), "train", seed=config.seed, epoch=epoch,
                               window_rows=config.data.shuffle_buffer,
                               global_batch=config.global_batch, max_workers=2)
             for epoch in range(3)}  # fmt: skip
    for epoch, steps in _ledger(trace).items():
        assert sorted(steps) == list(range(order[epoch].steps))
        keys = [key for step in steps.values() for key in step]
        assert len(keys) == len(set(keys)) == order[epoch].rows, epoch
        for step, trained in steps.items():
            start, stop = order[epoch].step_span(step)
            assert len(trained) == stop - start

    # The same steps on the same images: equal to the uninterrupted run's but for summation
    # order (each step's gradient is summed over 1 or 2 workers): 1e-3 relative after 36 steps.
    state = ckpt.load_state(sorted(Path(summary.checkpoint_path).glob("epoch-*"))[-1])
    reference = ckpt.load_state(sorted(Path(baseline.checkpoint_path).glob("epoch-*"))[-1])
    assert state["loop"]["step"] == reference["loop"]["step"] == 36
    for got, want in zip(state["loop"]["history"], reference["loop"]["history"], strict=True):
        for name in ("train_loss", "val_loss", "val_top1_error"):
            assert got[name] == pytest.approx(want[name], rel=1e-3, abs=1e-5), name
    workers = MlflowClient(config.tracking_uri).get_metric_history(summary.mlflow_run_id, "workers")
    assert [m.value for m in sorted(workers, key=lambda m: m.timestamp)][:3] == [2.0, 1.0, 2.0]
