"""Fault injection: what a run survives, and how it fails when it cannot.

- a training worker SIGKILLed mid-epoch, twice in one run: restarts from the latest checkpoint,
  every epoch counted once, final metrics equal to an uninterrupted run's;
- the S3 endpoint going away mid-run: a short outage is waited out, a long one stops the run
  with a one-line error, and the run resumes from its checkpoint once storage is back;
- bad data: a truncated shard, a shard that is not what the manifest says, garbage records,
  labels out of range;
- the MLflow server stopping mid-run: training goes on, the metrics logged meanwhile arrive.

All on a real local Ray, moto's S3 server and `mlflow server`, with a 1/16-width net A on 32 px
crops of a few hundred tiny images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_workers

from vgg_ray import checkpoint as ckpt
from vgg_ray.cli import main
from vgg_ray.config import TrainConfig, demo
from vgg_ray.data import read_records
from vgg_ray.errors import ConfigError
from vgg_ray.manifest import load_manifest, shard_sizes, verify_shards
from vgg_ray.tracking import server_environment

OUTAGE_LIMIT_S = 10  # storage reads give up after ~7.5 s of backoff (0.5 + 1 + 2 + 4)
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------ helpers


def prepare_tree(root: Path, dest: str, *, s3_endpoint: str | None = None, train: int = 32,
                 val: int = 4) -> str:  # fmt: skip
    """3 classes of generated images prepared into shards (small row groups): the manifest."""
    from vgg_ray.demo import make_demo_tree
    from vgg_ray.prepare import PrepareConfig, prepare

    tree = make_demo_tree(root / "tree", classes=3, train_per_class=train, val_per_class=val,
                          size=(36, 44))  # fmt: skip
    config = PrepareConfig(src=str(tree), dest=dest, shard_size=32 * 1024, row_group_rows=8,
                           workers=1, progress=False, s3_endpoint=s3_endpoint)  # fmt: skip
    return prepare(config).manifest


def tiny(manifest: str, tmp_path: Path, **overrides) -> TrainConfig:
    """Net A at 1/16 width on 32 px crops; 96 training images, batch 8: 12 steps an epoch."""
    config = demo("A", epochs=2, global_batch=8, lr=0.01, log_every_steps=1)
    data = replace(config.data, manifest=manifest, scale=(36, 44), eval_scale=40,
                   read_cpus=0.5)  # fmt: skip
    values = dict(data=data, storage_path=str(tmp_path / "checkpoints"),
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cpus_per_worker=0.5,
                  run_name="run", checkpoint_every_steps=2)  # fmt: skip
    values.update(overrides)
    return replace(config, **values)


def latest_state(summary) -> dict:
    return ckpt.load_state(sorted(Path(summary.checkpoint_path).glob("epoch-*"))[-1])


def when(condition: Callable[[], bool], action: Callable[[], None], *,
         timeout_s: float = 300) -> threading.Thread:  # fmt: skip
    """Run `action` in a thread as soon as `condition()` holds (polled every 50 ms)."""

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def checkpoint_exists(config: TrainConfig, epoch: int, step: int) -> Callable[[], bool]:
    path = Path(config.storage_path) / config.run_name / f"epoch-{epoch:04d}-step-{step:08d}"
    return lambda: (path / ckpt.DIGEST_FILE).exists()  # written last: the checkpoint is whole


class Proxy:
    """A TCP relay in front of the S3 server that can play dead: while down it accepts each
    connection and closes it at once (an endpoint restarting behind its load balancer), and
    counts them, so a test knows the clients really met the outage."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down = threading.Event()
        self.turned_away = 0
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            if self.down.is_set():
                self.turned_away += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self.lock:
            self.open.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
        s.close()

    def go_down(self) -> None:
        self.down.set()
        for s in list(self.open):
            self._drop(s)

    def come_back(self) -> None:
        self.down.clear()


class MlflowServer:
    """`mlflow server` on a SQLite store, which a test can stop and start on the same port."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (the server holds it)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        env=server_environment(),
                                        start_new_session=True)  # fmt: skip
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the server's workers
            self.process.wait()


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """A local Ray of this test process (never a cluster someone left running). The S3
    fixture's credentials and the storage outage limit are in the environment before Ray
    starts, so its workers inherit them."""
    import ray

    from vgg_ray import runtime

    os.environ["VGG_RAY_S3_OUTAGE_LIMIT_S"] = str(OUTAGE_LIMIT_S)
    runtime.start_local(num_cpus=4)
    yield
    ray.shutdown()
    os.environ.pop("VGG_RAY_S3_OUTAGE_LIMIT_S", None)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    return prepare_tree(root, str(root / "shards"))


# ------------------------------------------------------------------------------ bad data


def _pieces(manifest, split: str = "train") -> dict:
    """Every row group of a split as the batch a read task gets."""
    import numpy as np

    rows = []
    for shard in manifest.shards(split):
        start = shard.first_index
        for group, count in enumerate(shard.row_groups):
            rows.append((shard.path, group, 0, count, start))
            start += count
    columns = ("path", "row_group", "start", "stop", "first_index")
    return {c: np.array([r[i] for r in rows]) for i, c in enumerate(columns)}


def _read(manifest, split: str = "train") -> dict:
    from vgg_ray import data

    data._parquet.cache_clear()  # the tests rewrite shards under the same names
    return read_records(_pieces(manifest, split), manifest_uri=manifest.uri, s3_endpoint=None,
                        base=manifest.base, sizes=shard_sizes(manifest),
                        classes=len(manifest.classes))  # fmt: skip


def _copy(manifest_path: str, dest: Path) -> Path:
    import shutil

    shutil.copytree(Path(manifest_path).parent, dest)
    return dest


def test_truncated_shard_is_named(manifest, tmp_path):
    root = _copy(manifest, tmp_path / "shards")
    loaded = load_manifest(str(root))
    shard = loaded.shards("train")[1].path
    data = (root / shard).read_bytes()
    (root / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"shard .*{shard} is \d+ bytes but the manifest says"):
        _read(loaded)
    # A manifest without sizes (older writers) still names it: Parquet's footer is gone.
    raw = json.loads((root / "manifest.json").read_text())
    for entry in raw["splits"]["train"]["shards"]:
        entry["bytes"] = 0
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=rf"shard .*{shard} \(row group 0\) is unreadable"):
        _read(load_manifest(str(root)))


def test_shard_not_matching_its_checksum_is_named(manifest, tmp_path, capsys):
    root = _copy(manifest, tmp_path / "shards")
    loaded = load_manifest(str(root))
    assert verify_shards(loaded) == []
    assert main(["verify", str(root)]) == 0
    shard = loaded.shards("train")[0].path
    data = bytearray((root / shard).read_bytes())
    image = pq.ParquetFile(root / shard).metadata.row_group(0).column(0)  # the JPEG bytes
    data[image.data_page_offset + image.total_compressed_size // 2] ^= 0xFF  # same size
    (root / shard).write_bytes(bytes(data))
    assert verify_shards(loaded) == [f"{shard}: sha256 does not match the manifest"]
    capsys.readouterr()
    assert main(["verify", str(root)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "1 of" in line and shard in line and "sha256" in line
    # Training reads check each page's CRC32 (prepare writes them): an error naming the shard,
    # not silently wrong pixels or labels.
    with pytest.raises(ConfigError, match=rf"shard .*{shard} \(row group \d+\) is unreadable"):
        _read(loaded)


def _with_bad_records(manifest: str, dest: Path) -> tuple[Path, set[str]]:
    """A copy whose first training shard holds 2 garbage images and 2 labels out of range,
    written with right checksums (as a buggy writer would): returns it and the keys of the
    records with bad labels."""
    root = _copy(manifest, dest)
    raw = json.loads((root / "manifest.json").read_text())
    entry = raw["splits"]["train"]["shards"][0]
    table = pq.read_table(root / entry["path"])
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    keys = table.column("key").to_pylist()
    images[0], images[3] = b"\xff\xd8garbage", os.urandom(300)
    labels[1], labels[5] = 7, -2  # 3 classes
    table = table.set_column(0, "image", pa.array(images, pa.binary()))
    table = table.set_column(1, "label", pa.array(labels, pa.int32()))
    pq.write_table(table, root / entry["path"], row_group_size=8, write_page_checksum=True)
    data = (root / entry["path"]).read_bytes()
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(raw))
    return root, {keys[1], keys[5]}


def test_bad_records_and_labels_are_marked_for_skipping(manifest, tmp_path):
    root, bad_labels = _with_bad_records(manifest, tmp_path / "shards")
    rows = _read(load_manifest(str(root)))
    # Labels out of range become -1 here; garbage bytes are found (and counted) at decode.
    assert {str(k) for k, label in zip(rows["key"], rows["label"], strict=True) if label < 0} == (
        bad_labels
    )


# ------------------------------------------------------------------------------ tracking


def test_a_damaged_or_incomplete_checkpoint_is_refused_naming_its_file(tmp_path):
    from vgg_ray.models import build_vgg

    model = build_vgg("A", num_classes=3, width=1 / 16)
    state = {"arch": "A", "width": 1 / 16, "classes": ["a", "b", "c"], "config": {},
             "model": model.state_dict()}  # fmt: skip
    ckpt.save_state(tmp_path, state)
    path = tmp_path / ckpt.STATE_FILE
    assert ckpt.load_trained(str(tmp_path))[1]["arch"] == "A"  # intact: loads
    # 64 random bytes into the tensor data, the size unchanged: torch.load alone accepts this
    data = bytearray(path.read_bytes())
    offset = len(data) // 2
    data[offset : offset + 64] = np.random.default_rng(0).bytes(64)
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # (what went unnoticed before digests)
    for source in (tmp_path, path):  # the folder, or its state.pt named directly
        with pytest.raises(ConfigError, match=f"checkpoint {path} is damaged"):
            ckpt.load_trained(str(source))
    (tmp_path / ckpt.DIGEST_FILE).unlink()  # a save that never finished
    with pytest.raises(ConfigError, match="is incomplete: it has no state.sha256"):
        ckpt.load_state(tmp_path)


def test_the_newest_intact_checkpoint_is_found_past_damaged_ones(tmp_path):
    """What a resume continues from (checked on the driver) and a restarted worker loads."""
    import pyarrow.fs
    from ray.train import Checkpoint

    names = ["epoch-0001-step-00000006", "epoch-0002-step-00000008", "epoch-0002-step-00000012"]
    for step, name in enumerate(names):
        (tmp_path / name).mkdir()
        ckpt.save_state(tmp_path / name, {"loop": {"step": step}})
    local = pyarrow.fs.LocalFileSystem()
    assert ckpt.newest_intact(local, str(tmp_path)) == names[-1]
    (tmp_path / names[-1] / ckpt.STATE_FILE).write_bytes(b"\0" * 64)  # damaged
    (tmp_path / names[1] / ckpt.DIGEST_FILE).unlink()  # incomplete
    assert ckpt.newest_intact(local, str(tmp_path)) == names[0]
    latest = Checkpoint(str(tmp_path / names[-1]), local)
    assert ckpt.load_newest_intact(latest)["loop"]["step"] == 0
    (tmp_path / names[0] / ckpt.STATE_FILE).write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match=f"{names[0]}.*damaged.*{ckpt.NOTHING_INTACT}"):
        ckpt.newest_intact(local, str(tmp_path))


def test_tracker_reports_what_it_could_not_send(tmp_path):
    """No server at all: nothing raises, and every value waits to be sent (a checkpoint
    carries them: `unsent`)."""
    from vgg_ray.tracking import Tracker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker(f"http://127.0.0.1:{port}", "0" * 32)
    started = time.monotonic()
    for step in range(20):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
    # One send is tried, then backed off: 20 steps do not each wait for MLflow's retries.
    assert time.monotonic() - started < 30
    assert tracker.flush() == 40 and len(tracker.unsent()) == 40


# ------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_bad_records_are_skipped_and_counted_in_training(ray_cluster, manifest, tmp_path):
    from vgg_ray.train_job import train

    root, _ = _with_bad_records(manifest, tmp_path / "bad")
    summary = train(tiny(str(root), tmp_path, epochs=1, checkpoint_every_steps=0))
    assert summary.metrics["skipped_records"] == 4  # 2 garbage images + 2 labels out of range
    state = latest_state(summary)
    assert state["loop"]["step"] == 12  # stand-ins keep the batches full

    # A shard truncated while the run goes on stops it with one line naming it (and how to go
    # on), after its retries; `vgg-ray train` prints it as `vgg-ray train: error: ...`, exit 2.
    # (a val shard, cut once the checkpoint of step 4 is whole: validation reads it after)
    shard = load_manifest(str(root)).shards("val")[0].path
    data = (root / shard).read_bytes()
    config = tiny(str(root), tmp_path, epochs=1, run_name="truncated", max_failures=0,
                  checkpoint_every_steps=4)  # fmt: skip
    when(checkpoint_exists(config, 0, 4), lambda: (root / shard).write_bytes(data[:-100]))
    with pytest.raises(ConfigError, match=rf"shard .*{shard} is .* bytes.*--resume"):
        train(config)
    # Truncated before the run starts: the driver's pre-flight names it, in seconds.
    with pytest.raises(ConfigError, match=rf"{shard} is \d+ bytes, the manifest says"):
        train(replace(config, run_name="truncated-before"))
    assert not (Path(config.storage_path) / "truncated-before").exists()


def test_a_run_folder_without_checkpoints_is_dropped_one_with_them_kept(tmp_path):
    """What a run that failed before its first checkpoint leaves: nothing to block its name."""
    from vgg_ray.train_job import _drop_if_no_checkpoint

    config = TrainConfig(storage_path=str(tmp_path), run_name="early")
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert _drop_if_no_checkpoint(config) and not (tmp_path / "early").exists()
    assert _drop_if_no_checkpoint(config)  # no folder at all: nothing to resume either
    (tmp_path / "early" / "epoch-0001-step-00000012").mkdir(parents=True)
    assert not _drop_if_no_checkpoint(config) and (tmp_path / "early").exists()


@pytest.mark.slow
def test_a_diverging_run_stops_at_once_keeping_its_last_good_weights(ray_cluster, manifest,
                                                                     tmp_path):  # fmt: skip
    """lr 1e8: the first step is finite and throws the weights far off; every later gradient is
    NaN. Those steps are skipped (the 2 workers agree on each, or DDP would hang); after 3 in a
    row the run stops with one line, without spending its restarts on a run that would diverge
    the same way, and its checkpoint holds the weights from before the streak."""
    from mlflow.tracking import MlflowClient

    from vgg_ray.train_job import train

    config = tiny(manifest, tmp_path, workers=2, epochs=1, lr=1e8, max_nonfinite_steps=3,
                  checkpoint_every_steps=0, max_failures=3)  # fmt: skip
    with pytest.raises(ConfigError, match=r"run 'run' diverged: 3 steps in a row had a "
                       r"non-finite gradient .* in \S+-diverged: continue with --resume "
                       r"--run-name run and a lower --lr"):  # fmt: skip
        train(config)

    (folder,) = (tmp_path / "checkpoints" / "run").glob("epoch-*")
    assert folder.name == "epoch-0000-step-00000001-diverged"
    state = ckpt.load_state(folder)
    assert (state["loop"]["step"], state["loop"]["batch_in_epoch"]) == (1, 1)
    assert all(t.isfinite().all() for t in state["model"].values())

    client = MlflowClient(config.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(config.experiment).experiment_id],
        filter_string="tags.`vgg_ray.run_name` = 'run'",
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["vgg_ray.diverged"].endswith(folder.name)
    # One attempt only: a restart would have logged step 1 again.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")]
    assert steps == [1, 2, 3]
    (norm,) = [m for m in client.get_metric_history(run.info.run_id, "grad_norm") if m.step == 1]
    assert 0 < norm.value < float("inf")


@pytest.mark.slow
def test_worker_killed_twice_mid_epoch_resumes_and_matches(ray_cluster, manifest, tmp_path):
    """SIGKILL a Ray Train worker (of 2) when the checkpoint of step 4 (epoch 0) appears and
    again at step 16 (epoch 1): the run restarts from its latest checkpoint each time and ends
    exactly where an uninterrupted run with the same seed ends."""
    from mlflow.tracking import MlflowClient

    from vgg_ray.train_job import train

    baseline = train(tiny(manifest, tmp_path / "baseline", workers=2, checkpoint_every_steps=4))

    config = tiny(manifest, tmp_path / "faulty", workers=2, max_failures=3,
                  checkpoint_every_steps=4)  # fmt: skip
    killed: list[int] = []

    def kill() -> None:
        workers = train_workers()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        killed.append(workers[-1])

    first = when(checkpoint_exists(config, 0, 4), kill)
    later = when(lambda: len(killed) == 1 and checkpoint_exists(config, 1, 16)(), kill)
    summary = train(config)
    first.join(1)
    later.join(1)
    assert len(killed) == 2 and killed[0] != killed[1]

    state = latest_state(summary)
    assert [h["epoch"] for h in state["loop"]["history"]] == [0, 1]  # none skipped or twice
    assert state["loop"]["step"] == 24
    reference = latest_state(baseline)["loop"]["history"]
    for got, want in zip(state["loop"]["history"], reference, strict=True):
        # Same seed: same data order, augmentation, dropout; the epoch's sums survive a
        # mid-epoch restart. Only float summation order may differ: 1e-4 relative.
        for name in ("train_loss", "train_top1_error", "val_loss", "val_top1_error"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    # Every checkpoint left is whole and loads with weights_only.
    for folder in Path(summary.checkpoint_path).glob("epoch-*"):
        assert ckpt.load_state(folder)["loop"]["step"] > 0
    client = MlflowClient(config.tracking_uri)
    # MLflow gets metrics at least once: an epoch logged just before a failure that beat its
    # checkpoint is logged again after the restart, at the same step with the same value.
    values: dict[int, list[float]] = {}
    for metric in client.get_metric_history(summary.mlflow_run_id, "train_loss"):
        values.setdefault(metric.step, []).append(metric.value)
    assert sorted(values) == [0, 1]
    for step, logged in values.items():
        assert max(logged) - min(logged) <= 1e-4 * abs(reference[step]["train_loss"]), logged


@pytest.mark.slow
def test_s3_outage_is_waited_out_or_fails_clearly_and_resumes(ray_cluster, s3, tmp_path):
    from vgg_ray.train_job import train

    direct = prepare_tree(tmp_path, s3.uri("outage"), s3_endpoint=s3.endpoint)
    proxy = Proxy(int(s3.endpoint.rsplit(":", 1)[1]))
    data = lambda config: replace(config.data, s3_endpoint=proxy.endpoint)  # noqa: E731
    config = tiny(direct, tmp_path, checkpoint_every_steps=4)
    config = replace(config, data=data(config))

    # Short: down for 2.5 s from the last step of epoch 0 (its checkpoint "epoch-0000-step-12",
    # before validation and epoch 1 read): reads back off and training goes on.
    def blip() -> None:
        proxy.go_down()
        time.sleep(2.5)
        proxy.come_back()

    watcher = when(checkpoint_exists(config, 0, 12), blip)
    summary = train(config)
    watcher.join(5)
    assert proxy.turned_away > 0  # the clients did meet the outage
    state = latest_state(summary)
    assert [h["epoch"] for h in state["loop"]["history"]] == [0, 1]
    assert state["loop"]["step"] == 24

    # Long: down from the same point until the run gives up (one restart allowed).
    config = replace(config, run_name="long", max_failures=1)
    when(checkpoint_exists(config, 0, 12), proxy.go_down)
    with pytest.raises(ConfigError, match=r"(unreachable|cannot reach).*--resume --run-name long"):
        train(config)
    proxy.come_back()
    resumed = latest_state(train(config, resume=True))
    assert [h["epoch"] for h in resumed["loop"]["history"]] == [0, 1]
    assert resumed["loop"]["step"] == 24


@pytest.mark.slow
def test_mlflow_outage_metrics_arrive_when_it_is_back(ray_cluster, manifest, tmp_path):
    """Two outages of the tracking server (a relay in front of it plays dead): one mid-run,
    after which the worker sends its queue, and one spanning the end of training, where the
    last checkpoint carries what is unsent and the driver delivers it before FINISHED."""
    from mlflow.tracking import MlflowClient

    from vgg_ray.train_job import train

    server = MlflowServer(tmp_path)
    server.start()
    relay = Proxy(server.port)
    outages: list[tuple[float, float]] = []

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 300
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    def outage(start: Callable[[], bool], end: Callable[[], bool]) -> None:
        wait_for(start)
        began = time.time()
        relay.go_down()
        wait_for(end)
        time.sleep(3)
        relay.come_back()
        outages.append((began, time.time()))

    try:
        config = tiny(manifest, tmp_path, tracking_uri=relay.endpoint, epochs=3,
                      checkpoint_every_steps=4)  # fmt: skip
        mid_run = (checkpoint_exists(config, 0, 4), lambda: True)
        # from step 28 of 36 until the last checkpoint is whole: training ends while it is down
        at_the_end = (checkpoint_exists(config, 2, 28), checkpoint_exists(config, 3, 36))
        watcher = threading.Thread(target=lambda: [outage(*o) for o in (mid_run, at_the_end)],
                                   daemon=True)  # fmt: skip
        watcher.start()
        summary = train(config)
        watcher.join(60)
        assert len(outages) == 2 and relay.turned_away > 0
        client = MlflowClient(server.uri)
        steps = client.get_metric_history(summary.mlflow_run_id, "train_loss_step")
        assert {m.step for m in steps} == set(range(1, 37))  # every step, none lost
        for began, ended in outages:  # logged while the server was away, and they reached it
            assert [m for m in steps if began * 1000 < m.timestamp < ended * 1000]
        epochs = client.get_metric_history(summary.mlflow_run_id, "train_loss")
        assert sorted(m.step for m in epochs) == [0, 1, 2]
        assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    finally:
        server.stop()
