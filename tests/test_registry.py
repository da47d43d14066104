"""The model registry against both stores (conftest `mlflow_store`): the embedded SQLite default
(artifacts beside the database) and a real `mlflow server` (artifacts proxied to a moto S3
server). Tiny nets registered from their runs, their ensemble as a pyfunc that predicts what the
evaluation protocol computes, gated promotion with evidence, rollback, and the clear errors."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shards, read_split

from vgg_ray.errors import ConfigError

CLASSES = 8  # more than 5, or every top-5 error is 0 and no promotion could be decided


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """8 classes, 12 training and 3 validation images each, 40-56 px."""
    return make_shards(tmp_path_factory.mktemp("registry-data"), classes=CLASSES,
                       train_per_class=12, val_per_class=3, row_group_rows=8,
                       shard_size=256 * 2**20)  # fmt: skip


def _split(manifest_uri: str, split: str) -> tuple[list[torch.Tensor], np.ndarray, list[bytes]]:
    images, labels, _, raw = read_split(manifest_uri, split)
    return images, np.array(labels), raw


def _checkpoint(directory: Path, manifest_uri: str, arch: str, *, steps: int, seed: int,
                classes: int = CLASSES) -> Path:  # fmt: skip
    """A tiny net trained for `steps` SGD steps, saved as vgg_ray.train saves it. steps=0: a
    net that ranks the classes in one fixed order whatever the image (top-5 error 3/8)."""
    from vgg_ray.checkpoint import save_state
    from vgg_ray.config import demo
    from vgg_ray.manifest import load_manifest
    from vgg_ray.models import build_vgg
    from vgg_ray.transforms import training

    manifest = load_manifest(manifest_uri)
    config = demo(arch, run_name=directory.name, width=1 / 16)
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, manifest=manifest_uri, scale=(36, 48)))  # fmt: skip
    torch.manual_seed(seed)
    model = build_vgg(arch, classes, 1 / 16, "kaiming")
    if steps:
        images, labels, _ = _split(manifest_uri, "train")
        preset = training(scale=(36, 48), crop=32, stats=manifest.stats)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        for step in range(steps):
            index = np.random.default_rng(seed * 1000 + step).choice(len(images), 32)
            x = preset([images[i] for i in index], epoch=step, indices=index.tolist())
            loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels[index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        with torch.no_grad():
            model.classifier[-1].weight.zero_()
            model.classifier[-1].bias.copy_(torch.arange(classes, 0, -1.0))
    directory.mkdir(parents=True)
    wnids = [f"n{i:08d}" for i in range(classes)]
    save_state(directory, {
        "arch": arch, "width": 1 / 16, "classes": list(manifest.wnids)[:classes] or wnids,
        "config": config.to_dict(), "data_stats": dataclasses.asdict(manifest.stats),
        "model": model.eval().state_dict(), "optimizer": {"not": "kept by the registry"},
    })  # fmt: skip
    return directory


@contextlib.contextmanager
def _fluent(tracking_uri: str):
    """MLflow's fluent API on `tracking_uri` for a module fixture, its globals put back after
    (the function-scoped `tracking_uri` fixture does this per test). Set directly, they write no
    MLFLOW_* variables that would outlive this."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             fluent._active_experiment_id)  # fmt: skip
    tracking_utils._tracking_uri = registry_utils._registry_uri = tracking_uri
    try:
        yield
    finally:
        (tracking_utils._tracking_uri, registry_utils._registry_uri,
         fluent._active_experiment_id) = saved  # fmt: skip


def _log_run(tracking_uri: str, checkpoint: Path) -> str:
    """An MLflow run as vgg_ray.train leaves it: params, tags, best_checkpoint, the model, in
    an experiment made as training makes it (on SQLite, artifacts beside the database)."""
    import mlflow

    from vgg_ray.checkpoint import load_state
    from vgg_ray.config import TrainConfig
    from vgg_ray.tracking import experiment_id, log_net, open_client

    state = load_state(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    experiment = experiment_id(open_client(tracking_uri), "registry-test")
    with (_fluent(tracking_uri),
          mlflow.start_run(experiment_id=experiment, run_name=config.run_name,
                           log_system_metrics=False) as run):  # fmt: skip
        mlflow.log_params({k: str(v) for k, v in config.flat().items()})
        mlflow.set_tags({"vgg_ray.run_name": config.run_name, "arch": config.arch,
                         "data_manifest": config.data.manifest,
                         "best_checkpoint": str(checkpoint)})  # fmt: skip
        mlflow.log_metrics({"val_top5_error": 0.25, "best_val_top5_error": 0.25})
        log_net(state)
    return run.info.run_id


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory) -> dict[str, Path]:
    """Two trained nets (A, B) and two that rank classes in a fixed order: trained once, for
    both stores."""
    root = tmp_path_factory.mktemp("nets")
    return {key: _checkpoint(root / key, data, arch, steps=steps, seed=seed)
            for key, arch, steps, seed in (("A", "A", 40, 1), ("B", "B", 40, 2),
                                           ("A0", "A", 0, 3), ("B0", "B", 0, 4))}  # fmt: skip


@pytest.fixture(scope="module")
def nets(mlflow_store, checkpoints) -> dict[str, object]:
    """The four checkpoints, and each as a training run in this store (`<key>_run`)."""
    return {
        **checkpoints,
        **{f"{key}_run": _log_run(mlflow_store, c) for key, c in checkpoints.items()},
    }


def _client(tracking_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _assert_artifacts_beside_the_store(client, run_id: str) -> None:
    """A run's artifacts are where the store keeps them: beside a local sqlite database
    (tracking.experiment_id), not in ./mlruns of whatever folder the command ran in; an mlflow
    server's in its proxied store."""
    uri, artifacts = client.tracking_uri, client.get_run(run_id).info.artifact_uri
    if uri.startswith("sqlite:///"):
        beside = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        assert artifacts.startswith(beside + "/"), artifacts
    else:
        assert artifacts.startswith("mlflow-artifacts:/"), artifacts


# --- registering -----------------------------------------------------------------------------


def test_register_nets_from_their_runs(tracking_uri, data, nets):
    from vgg_ray.registry import CHALLENGER, RegisterConfig, manifest_sha256, register_runs

    registered = register_runs(RegisterConfig(
        runs=(nets["A_run"], f"runs:/{nets['B_run']}"), tracking_uri=tracking_uri))  # fmt: skip
    assert [(r.name, r.version) for r in registered] == [("vgg-A", "1"), ("vgg-B", "1")]
    client = _client(tracking_uri)
    version = client.get_model_version_by_alias("vgg-A", CHALLENGER)
    assert str(version.version) == "1" and version.run_id == nets["A_run"]  # int on SQLite
    tags = version.tags
    assert tags["run_id"] == nets["A_run"] and tags["vgg_ray.kind"] == "net"
    assert tags["data_manifest"] == data
    assert tags["manifest_sha256"] == manifest_sha256(data) and len(tags["manifest_sha256"]) == 64
    assert tags["train_scale"] == "36-48" and tags["crop"] == "32"
    assert tags["metric.val_top5_error"] == "0.25"
    assert tags["best_checkpoint"] == str(nets["A"])


def test_ensemble_predicts_the_evaluation_protocols_mean_soft_max(tracking_uri, data, nets):
    import mlflow.pyfunc

    from vgg_ray.evaluate import Evaluator, protocols
    from vgg_ray.evaluate_job import EvaluateConfig, load_nets
    from vgg_ray.registry import EnsembleConfig, register_ensemble

    registered = register_ensemble(
        EnsembleConfig(
            members=("models:/vgg-A@challenger", "models:/vgg-B/1"), tracking_uri=tracking_uri
        )
    )
    assert (registered.name, registered.version) == ("vgg-AB", "1")
    assert registered.tags["member_run_ids"] == f"{nets['A_run']},{nets['B_run']}"
    _assert_artifacts_beside_the_store(_client(tracking_uri), registered.run_id)
    model = mlflow.pyfunc.load_model("models:/vgg-AB@challenger")
    assert model.metadata.metadata["classes"] == [f"n{i:08d}" for i in range(CLASSES)]
    # The members as the evaluation job loads them, and its protocol rows.
    loaded, _ = load_nets(EvaluateConfig(models=(str(nets["A"]), str(nets["B"])), manifest=data,
                                         tracking_uri=tracking_uri))  # fmt: skip
    infos, models = [n.info for n in loaded], [n.model for n in loaded]
    images, _, raw = _split(data, "val")
    images, raw = images[:5], raw[:5]
    pixels = [image.permute(1, 2, 0).numpy() for image in images]  # HWC, sizes differ

    for params in ({}, {"mode": "dense", "scales": [36, 44]}, {"mode": "dense+multicrop"}):
        mode = params.get("mode", "single")
        scale_sets = [tuple(params["scales"])] if "scales" in params else ()
        rows = protocols(infos, (mode,), scale_sets)  # A, B, then the A+B ensemble
        expected = Evaluator(models, infos, rows).posteriors(images)
        probs = model.predict(pixels, params=params)
        assert probs.shape == (5, CLASSES) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected[2].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, (expected[0] + expected[1]).numpy() / 2, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    # Encoded bytes decode to the same pixels; top5 gives class indices, best first.
    np.testing.assert_array_equal(model.predict(raw), model.predict(pixels))
    top5 = model.predict(pixels, params={"output": "top5"})
    np.testing.assert_array_equal(top5, np.argsort(-model.predict(pixels), axis=1)[:, :5])
    same_size = np.stack([np.zeros((40, 50, 3), np.uint8), np.full((40, 50, 3), 200, np.uint8)])
    assert model.predict(same_size).shape == (2, CLASSES)


def test_large_artifacts_go_up_in_parts_and_come_back_whole(mlflow_server, s3, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """The server's S3 multipart upload (no such thing on the SQLite store's local folder)."""
    import boto3
    import mlflow

    from vgg_ray.tracking import experiment_id

    # S3 parts are at least 5 MB (moto enforces it as S3 does): 11 MB in 5 MB parts = 3 parts.
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(2**20))
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(5 * 2**20))
    monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", raising=False)  # server decides
    payload = np.random.default_rng(0).bytes(11 * 2**20)
    (tmp_path / "big.bin").write_bytes(payload)
    client = _client(mlflow_server)
    experiment = experiment_id(client, "registry-test")
    run = client.create_run(experiment, run_name="multipart")
    client.log_artifact(run.info.run_id, str(tmp_path / "big.bin"), "weights")
    objects = boto3.client("s3", endpoint_url=s3.endpoint).list_objects_v2(
        Bucket=s3.bucket, Prefix=f"mlartifacts/{experiment}/{run.info.run_id}/"
    )["Contents"]
    (stored,) = [o for o in objects if o["Key"].endswith("weights/big.bin")]
    assert stored["Size"] == len(payload)
    assert stored["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    back = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="weights/big.bin", dst_path=str(tmp_path / "back"),
        tracking_uri=mlflow_server)  # fmt: skip
    assert Path(back).read_bytes() == payload


# --- promotion -------------------------------------------------------------------------------


def _promote(tracking_uri, data, **overrides):
    from vgg_ray.registry import PromoteConfig, promote

    values = dict(name="vgg-AB", tracking_uri=tracking_uri, mode="single", actors=1,
                  cpus_per_actor=0.5, batch_size=8, manifest=data)  # fmt: skip
    values.update(overrides)
    return promote(PromoteConfig(**values))


def _printed_tables(out: str) -> list[Path]:
    """The local table folders `vgg-ray evaluate` printed (`tables in <folder>;`)."""
    return [Path(m) for m in re.findall(r"vgg-ray evaluate: tables in (\S+?)(?:;|$)", out, re.M)]


@pytest.mark.slow
def test_promotion_moves_champion_only_for_a_better_challenger(ray_cluster, tracking_uri, data,
                                                               nets, capsys):  # fmt: skip
    import mlflow.pyfunc

    from vgg_ray.cli import main
    from vgg_ray.config import default_home
    from vgg_ray.registry import EnsembleConfig, manifest_sha256, register_ensemble, rollback

    client = _client(tracking_uri)

    def ensemble(*members, mode="single"):
        return register_ensemble(EnsembleConfig(members=members, name="vgg-AB", mode=mode,
                                                tracking_uri=tracking_uri)).version  # fmt: skip

    def champion() -> str:
        return str(client.get_model_version_by_alias("vgg-AB", "champion").version)

    # Version 1 (trained A+B, from the previous test) holds @challenger. Make a worse one the
    # first champion: versions 2 is the fixed-order nets, promoted with no champion yet.
    fixed = ensemble(str(nets["A0"]), f"runs:/{nets['B0_run']}")
    first = _promote(tracking_uri, data)
    assert first.promoted and first.challenger == fixed and first.champion is None
    assert first.challenger_top5_error == pytest.approx(3 / 8)  # classes 0-4 always in top-5
    tags = client.get_model_version("vgg-AB", fixed).tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.champion_top5_error"] == "none"
    assert champion() == fixed

    # The trained ensemble is better, in the mode it serves (`vgg-ray promote vgg-DE --mode
    # dense` over a champion in place): it takes @champion, and the evidence names both.
    trained = ensemble("models:/vgg-A/1", "models:/vgg-B/1", mode="dense")
    capsys.readouterr()
    code = main(["promote", "vgg-AB", "--mode", "dense", "--margin", "0.01", "--manifest", data,
                 "--actors", "1", "--cpus-per-actor", "0.5", "--batch-size", "8",
                 "--tracking-uri", tracking_uri])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert champion() == trained
    assert f"promoted vgg-AB version {trained} to champion" in out
    tags = client.get_model_version("vgg-AB", trained).tags
    assert tags["promotion.champion_version"] == fixed
    assert float(tags["promotion.challenger_top5_error"]) < 3 / 8 - 0.01
    assert float(tags["promotion.champion_top5_error"]) == pytest.approx(3 / 8)
    assert tags["promotion.protocol"].startswith("split=val mode=dense scales=paper")
    assert tags["promotion.challenger_test_scales"] == "36,42,48"  # Table 4's three scales
    assert "images=24" in tags["promotion.protocol"]
    assert tags["promotion.manifest_sha256"] == manifest_sha256(data)
    challenger_run = client.get_model_version("vgg-AB", trained).run_id
    champion_run = client.get_model_version("vgg-AB", fixed).run_id
    assert tags["promotion.run_ids"] == f"challenger={challenger_run} champion={champion_run}"
    assert tags["promotion.margin"] == "0.01"
    assert "challenger" not in client.get_registered_model("vgg-AB").aliases
    # The tables it printed are still there, under the home; MLflow holds them too, where the
    # evidence says.
    printed = _printed_tables(out)
    assert len(printed) == 2 and printed[0] != printed[1]
    for folder in printed:
        assert folder.is_relative_to(default_home()) and (folder / "table.md").is_file()
        assert "| dense | 36,42,48 |" in (folder / "table.md").read_text()
    runs = dict(p.split("=") for p in tags["promotion.evaluation_runs"].split())
    tables = dict(p.split("=") for p in tags["promotion.evaluation_tables"].split())
    for who in ("challenger", "champion"):
        assert tables[who].startswith("evaluation/") and tables[who].endswith("-val-dense")
        listed = {a.path for a in client.list_artifacts(runs[who], tables[who])}
        assert f"{tables[who]}/table.md" in listed
        _assert_artifacts_beside_the_store(client, runs[who])
    # It serves dense by default, as registered.
    model = mlflow.pyfunc.load_model("models:/vgg-AB@champion")
    image = np.random.default_rng(0).integers(0, 256, (44, 60, 3), dtype=np.uint8)
    served = model.predict([image])
    np.testing.assert_array_equal(served, model.predict([image], params={"mode": "dense"}))
    assert not np.allclose(served, model.predict([image], params={"mode": "single"}))

    # A worse challenger is refused with the numbers; @champion stays.
    worse = ensemble(str(nets["A0"]), str(nets["B0"]))  # no member has a run: a new experiment
    third = _promote(tracking_uri, data)
    assert not third.promoted and champion() == trained and third.champion == trained
    assert "refused" in third.summary() and "37.50%" in third.summary()
    tags = client.get_model_version("vgg-AB", worse).tags
    assert tags["promotion.decision"] == "refused"
    assert str(client.get_model_version_by_alias("vgg-AB", "challenger").version) == worse
    _assert_artifacts_beside_the_store(client, client.get_model_version("vgg-AB", worse).run_id)

    # Rollback: one command, back to the champion the trained ensemble replaced.
    assert rollback("vgg-AB", tracking_uri=tracking_uri) == (fixed, trained)
    assert champion() == fixed
    assert "rolled_back" in client.get_model_version("vgg-AB", trained).tags
    with pytest.raises(ConfigError, match="no previous champion"):
        rollback("vgg-AB", tracking_uri=tracking_uri)


# --- clear errors ----------------------------------------------------------------------------


def test_bad_members_runs_and_aliases_are_clear_errors(tracking_uri, data, nets, tmp_path):
    import mlflow
    import mlflow.pyfunc

    from vgg_ray.cli import main
    from vgg_ray.registry import EnsembleConfig, PromoteConfig, promote, register_ensemble

    def members(*sources, **overrides):
        return register_ensemble(EnsembleConfig(members=sources, tracking_uri=tracking_uri,
                                                **overrides))  # fmt: skip

    five = _checkpoint(tmp_path / "five", data, "A", steps=0, seed=0, classes=5)
    with pytest.raises(ConfigError, match=r"different class lists \(8 vs 5 classes\)"):
        members(str(nets["A"]), str(five))
    with pytest.raises(ConfigError, match="no MLflow run 0123456789abcdef0123456789abcdef"):
        members(str(nets["A"]), "runs:/0123456789abcdef0123456789abcdef")
    with pytest.raises(ConfigError, match=r"has no alias @gold \(it has: @challenger"):
        members("models:/vgg-A@gold")
    with pytest.raises(ConfigError, match="no registered model 'vgg-Z'"):
        members("models:/vgg-Z@champion")
    with pytest.raises(ConfigError, match="below net A's crop size 32"):
        members(str(nets["A"]), str(nets["B"]), scales=(24,))
    with pytest.raises(ConfigError, match="is an ensemble"):
        members("models:/vgg-AB/1")
    with pytest.raises(ConfigError, match="no registered model 'vgg-none'"):
        promote(PromoteConfig(name="vgg-none", tracking_uri=tracking_uri, manifest=data))
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/vgg-AB/1")
    with pytest.raises(ConfigError, match=r"uint8 \(H, W, 3\); got float32"):
        model.predict([np.zeros((40, 40, 3), np.float32)])
    with pytest.raises(ConfigError, match="unknown mode 'tencrop'"):
        model.predict([np.zeros((40, 40, 3), np.uint8)], params={"mode": "tencrop"})
    assert main(["rollback", "vgg-Z", "--tracking-uri", tracking_uri]) == 2
    assert main(["register", "--run", "0123456789abcdef0123456789abcdef",
                 "--tracking-uri", tracking_uri]) == 2  # fmt: skip


def test_the_gate_decides_on_top1_where_top5_cannot_separate():
    from vgg_ray.registry import gate

    def row(top1, top5):
        return dataclasses.make_dataclass("Row", ["top1_error", "top5_error"])(top1, top5)

    assert gate(row(0.3, 0.1), None, 0.0) == (True, "no champion")
    assert gate(row(0.3, 0.10), row(0.2, 0.12), 0.0) == (True, "top5_error")  # top-5 rules
    assert gate(row(0.3, 0.10), row(0.2, 0.105), 0.01) == (False, "top5_error")  # the margin
    # 4 classes: every top-5 error is 0; the better top-1 wins, by more than the margin
    assert gate(row(0.20, 0.0), row(0.30, 0.0), 0.05) == (True, "top1_error")
    assert gate(row(0.28, 0.0), row(0.30, 0.0), 0.05) == (False, "top1_error")


def test_a_promotion_history_of_int_versions_is_written_as_text(tmp_path):
    """The SQLite store (the embedded default) returns versions as int, an mlflow server as
    str: the champion history is text either way."""
    from mlflow.tracking import MlflowClient

    from vgg_ray.registry import PREVIOUS, _history, push_history

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("vgg-X")
    versions = [client.create_model_version("vgg-X", source=str(tmp_path)).version
                for _ in range(2)]  # fmt: skip
    assert all(isinstance(v, int) for v in versions)  # what `promote` crashed on
    for version in versions:
        push_history(client, "vgg-X", version)
    assert _history(client, "vgg-X") == ["1", "2"]
    assert client.get_registered_model("vgg-X").tags[PREVIOUS] == "2"
