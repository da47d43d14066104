"""Shared fixtures: a real S3 protocol server (moto) and a small ImageNet-style tree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

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

    os.environ["RAY_ADDRESS"] = ""  # never join a cluster a developer left running
    runtime.connect(num_cpus=4)
    yield
    ray.shutdown()


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

    from vgg_ray.data import load_manifest, read_records
    from vgg_ray.evaluate_job import _pieces
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
