"""Security: credentials never leave the environment, checkpoints never run code when loaded,
and a manifest cannot make readers open files outside its folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vgg_ray import checkpoint as ckpt
from vgg_ray.errors import ConfigError
from vgg_ray.manifest import load_manifest


class _Payload:
    """What a hostile checkpoint carries: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoints_load_weights_only(tmp_path):
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"arch": "A", "model": _Payload(marker)}, hostile / ckpt.STATE_FILE)
    # with a digest that matches (an attacker can write one): the weights-only load refuses it
    sha = hashlib.sha256((hostile / ckpt.STATE_FILE).read_bytes()).hexdigest()
    (hostile / ckpt.DIGEST_FILE).write_text(f"{sha}  {ckpt.STATE_FILE}\n")
    shutil.copy(hostile / ckpt.STATE_FILE, tmp_path / "hostile.pt")  # a foreign file: no digest
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        ckpt.load_state(hostile)
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        ckpt.load_trained(str(hostile / ckpt.STATE_FILE))  # the --init path
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        ckpt.load_trained(str(tmp_path / "hostile.pt"))
    assert not marker.exists()
    # A real checkpoint's contents (tensors, numbers, strings, lists, dicts) load fine.
    ckpt.save_state(tmp_path, {"model": {"w": torch.ones(2)}, "loop": {"history": [{"a": 1.0}]}})
    assert ckpt.load_state(tmp_path)["loop"]["history"] == [{"a": 1.0}]


def test_shard_paths_cannot_leave_the_manifest_folder(tmp_path):
    from vgg_ray.demo import make_demo_tree
    from vgg_ray.prepare import PrepareConfig, prepare

    tree = make_demo_tree(tmp_path / "tree", classes=2, train_per_class=2, val_per_class=1,
                          size=(32, 36))  # fmt: skip
    manifest = prepare(PrepareConfig(src=str(tree), dest=str(tmp_path / "shards"), workers=1,
                                     progress=False)).manifest  # fmt: skip
    raw = json.loads(Path(manifest).read_text())
    escapes = ["../../etc/passwd", "/etc/passwd", "train/../../x.parquet", "..", "s3://x/y",
               "..\\..\\x.parquet", ""]  # fmt: skip
    for path in escapes:
        raw["splits"]["train"]["shards"][0]["path"] = path
        (tmp_path / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ConfigError, match="shard path"):
            load_manifest(str(tmp_path))


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """Started after the S3 fixture exported its fake keys, so the workers hold them too."""
    import ray

    from vgg_ray import runtime

    runtime.start_local(num_cpus=4)
    yield ray._private.worker._global_node.get_session_dir_path()
    ray.shutdown()


def _files(root: Path):
    return (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.slow
def test_no_credential_in_mlflow_logs_or_checkpoints(ray_cluster, s3, tmp_path, capfd,
                                                     monkeypatch):  # fmt: skip
    """A run reading shards from and checkpointing to S3 with keys in the environment: the keys
    are in no MLflow param, tag, metric name or artifact (the whole store is scanned, database
    included), no checkpoint, no Ray log of the session, nothing printed."""
    import boto3
    from mlflow.tracking import MlflowClient

    from vgg_ray.config import demo
    from vgg_ray.demo import make_demo_tree
    from vgg_ray.evaluate_job import load_net
    from vgg_ray.prepare import PrepareConfig, prepare
    from vgg_ray.train_job import train

    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    assert all(len(s) >= 16 for s in secrets)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    tree = make_demo_tree(tmp_path / "tree", classes=2, train_per_class=8, val_per_class=2,
                          size=(36, 40))  # fmt: skip
    manifest = prepare(PrepareConfig(src=str(tree), dest=s3.uri("secure"), workers=1,
                                     progress=False, s3_endpoint=s3.endpoint)).manifest  # fmt: skip
    config = demo("A", epochs=1, global_batch=8, log_every_steps=1, checkpoint_every_steps=1)
    config = replace(
        config,
        data=replace(config.data, manifest=manifest, s3_endpoint=s3.endpoint, scale=(36, 40),
                     eval_scale=36, read_cpus=0.5),
        storage_path=s3.uri("secure-checkpoints"), run_name="secure", cpus_per_worker=0.5,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    summary = train(config)

    # Evaluating the run goes through its checkpoint (weights_only), never the pickled MLflow
    # model: it works with MLflow's pickle loading switched off.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    net = load_net(summary.mlflow_run_id, tracking_uri=config.tracking_uri,
                   s3_endpoint=s3.endpoint)  # fmt: skip
    assert net.model.num_classes == 2

    client = MlflowClient(config.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    texts = [*run.data.params, *run.data.params.values(), *run.data.tags,
             *run.data.tags.values(), *run.data.metrics]  # fmt: skip
    assert run.data.params and run.data.tags and run.data.metrics
    leaks = [t for t in texts for s in secrets if s in t]
    scanned = list(_files(tmp_path))  # the SQLite store, ./mlruns artifacts and logged model
    assert any(p.name == "MLmodel" for p in scanned) and (tmp_path / "mlflow.db") in scanned
    scanned += list(_files(Path(ray_cluster)))  # every log of this Ray session
    leaks += [str(p) for p in scanned for s in secrets if s.encode() in p.read_bytes()]
    s3_client = boto3.client("s3", endpoint_url=s3.endpoint)
    objects = s3_client.list_objects_v2(Bucket=s3.bucket, Prefix="secure-checkpoints/")
    keys = [o["Key"] for o in objects["Contents"]]
    assert any(k.endswith(ckpt.STATE_FILE) for k in keys)
    for key in keys:
        body = s3_client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        leaks += [key for s in secrets if s.encode() in body]
    printed = capfd.readouterr()
    leaks += [stream for stream in (printed.out, printed.err) for s in secrets if s in stream]
    assert leaks == []


def test_redact_hides_the_user_info_of_every_url():
    from vgg_ray.errors import redact

    text = ("cannot reach http://user:hunter2@10.0.0.1:9000 nor HTTPS://tok@h/x; "
            "s3://bucket/key@v, models:/vgg-D@champion and a@b.c stay as they are")  # fmt: skip
    assert redact(text) == (
        "cannot reach http://***@10.0.0.1:9000 nor HTTPS://***@h/x; "
        "s3://bucket/key@v, models:/vgg-D@champion and a@b.c stay as they are"
    )
    assert redact("'http://u:p@ss:w@host/a@b'") == "'http://***@host/a@b'"  # an unescaped "@"
    assert redact("sqlite:///runs/a@b.db") == "sqlite:///runs/a@b.db"  # no authority: nothing
