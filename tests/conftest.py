"""Shared fixtures: a real S3 protocol server (moto) and a small ImageNet-style tree."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# One intra-op thread in the test process, whichever tests are selected: the nets here are tiny,
# the 2 cores are shared with Ray's processes, and a float result (a net a fixture trains) must
# not depend on whether a module that set it was collected alongside.
torch.set_num_threads(1)

# Ray Train's controller takes a worker's report only when it polls (every 2 s by default) and
# a worker holds one report at a time: the tests' checkpoints every few tiny steps would wait
# out most of each poll (a 24-step run took twice as long). Set before any Ray starts, so its
# raylets hand it to every process, and Ray Train hands it from a driver to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

FAKE_ACCESS_KEY = "AKIAVGGRAYTESTKEY000"
FAKE_SECRET_KEY = "vgg-ray-test-secret-do-not-print"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # "http://127.0.0.1:PORT"
    bucket: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on loopback; boto3 and pyarrow speak real HTTP to it."""
    from moto.server import ThreadedMotoServer

    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY,
        AWS_EC2_METADATA_DISABLED="true",  # no 1 s metadata-service probe per client
        AWS_REGION="us-east-1",
    )
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="vgg-ray-test")
    try:
        yield S3Server(endpoint=endpoint, bucket="vgg-ray-test")
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> Path:
    """4 classes x (6 train + 2 val) tiny JPEGs plus every oddity (built once per session).

    Oddities: grayscale and CMYK JPEGs, a PNG named .JPEG, a truncated JPEG, an empty file,
    a wide and a tall image."""
    from vgg_ray.demo import make_demo_tree

    return make_demo_tree(
        tmp_path_factory.mktemp("demo") / "tree",
        classes=4,
        train_per_class=6,
        val_per_class=2,
        size=(32, 48),
        oddities=True,
    )


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module, with 4 logical CPUs (DESIGN.md: on 2 cores the training
    workers would otherwise starve Ray Data's tasks), shut down after the module."""
    import ray

    from vgg_ray import runtime

    runtime.start_local(num_cpus=4)  # never a cluster a developer (or another test) left running
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory) -> str:
    """`mlflow server` on loopback (what a cluster runs), started once per session by the first
    test that asks: SQLite store, artifacts proxied to the moto bucket. Test modules sharing it
    use their own model and experiment names."""
    import socket
    import subprocess
    import sys

    from vgg_ray.stack import _wait_http
    from vgg_ray.tracking import server_environment

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = server_environment(MLFLOW_S3_ENDPOINT_URL=s3.endpoint)
    log = root / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", s3.uri("mlartifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http("MLflow", f"{uri}/health", server.pid, log, 120)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module", params=["sqlite", "server"])
def mlflow_store(request, tmp_path_factory) -> str:
    """The registry and evaluation tests run against both stores (DESIGN.md): the embedded
    default a laptop user meets, `sqlite:///<dir>/mlflow.db` with artifacts beside it (it
    returns model versions as int), and an `mlflow server` (versions as str). Module-scoped:
    each module's tests build on one another's registrations, once per store."""
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite-store') / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(mlflow_store, monkeypatch, tmp_path) -> str:
    """`mlflow_store` for one test, with MLflow's process-wide state put back afterwards:
    `mlflow.set_tracking_uri` / `set_registry_uri` / `set_experiment` also write
    MLFLOW_TRACKING_URI / _REGISTRY_URI / _EXPERIMENT_ID, and these globals would otherwise carry
    one test's store into the next (or the other parameter's). The embedded default's home is
    the test's own folder."""
    with _mlflow_globals_restored(monkeypatch, tmp_path):
        yield mlflow_store


@pytest.fixture
def sqlite_uri(monkeypatch, tmp_path) -> str:
    """A fresh SQLite store of the test's own (the laptop default), MLflow's process-wide state
    put back afterwards as `tracking_uri` does, for tests that need one store only."""
    with _mlflow_globals_restored(monkeypatch, tmp_path):
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"


@contextmanager
def _mlflow_globals_restored(monkeypatch, tmp_path):
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             fluent._active_experiment_id)  # fmt: skip
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, as it was
    monkeypatch.setenv("VGG_RAY_HOME", str(tmp_path / "home"))
    # From nothing: code that leans on a leftover URI fails here, not only after another test.
    tracking_utils._tracking_uri = registry_utils._registry_uri = None
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        (tracking_utils._tracking_uri, registry_utils._registry_uri,
         fluent._active_experiment_id) = saved  # fmt: skip


def make_shards(
    root: Path,
    *,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    size: tuple[int, int] = (40, 56),
    row_group_rows: int = 16,
    shard_size: int = 64 * 1024,
) -> str:
    """A small generated data set prepared into shards under `root`; returns the manifest."""
    from vgg_ray.demo import make_demo_tree
    from vgg_ray.prepare import PrepareConfig, prepare

    tree = make_demo_tree(root / "tree", classes=classes, train_per_class=train_per_class,
                          val_per_class=val_per_class, size=size)  # fmt: skip
    config = PrepareConfig(src=str(tree), dest=str(root / "shards"), shard_size=shard_size,
                           row_group_rows=row_group_rows, workers=1, progress=False)  # fmt: skip
    return prepare(config).manifest


def read_split(manifest_uri: str, split: str) -> tuple[list, list[int], list[str], list[bytes]]:
    """A split's decoded images, labels, keys and JPEG bytes in manifest order, read without Ray:
    the reference the Ray jobs are checked against."""
    import numpy as np

    from vgg_ray.data import read_records
    from vgg_ray.evaluate_job import _pieces
    from vgg_ray.manifest import load_manifest
    from vgg_ray.transforms import decode_cpu

    manifest = load_manifest(manifest_uri)
    images, labels, keys, raw = [], [], [], []
    for piece in _pieces(manifest, split, 0):
        batch = {k: np.array([v]) for k, v in piece.items()}
        rows = read_records(batch, manifest_uri=manifest.uri, s3_endpoint=None, base=manifest.base)
        images += decode_cpu(list(rows["image"]))
        labels += rows["label"].tolist()
        keys += [str(k) for k in rows["key"]]
        raw += [bytes(b) for b in rows["image"]]
    return images, labels, keys, raw


def train_workers() -> list[int]:
    """Pids of this test process's Ray Train workers: only descendants of this process (other
    engineers' Ray clusters on the machine are never touched)."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    return sorted(pid for pid in mine if "TrainWorker" in titles.get(pid, ""))
