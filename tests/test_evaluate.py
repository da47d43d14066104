"""The paper's test protocol (Sect. 3.2): its geometry and averaging on tiny nets in plain torch,
then the Ray Data job end to end on a prepared demo set, logging to both MLflow stores (conftest
`mlflow_store`: the embedded SQLite default and an `mlflow server`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shards, read_split

from vgg_ray.errors import ConfigError
from vgg_ray.evaluate import (
    DenseNet,
    Evaluator,
    NetInfo,
    Protocol,
    Tally,
    grid_positions,
    protocols,
)
from vgg_ray.models import build_vgg
from vgg_ray.tracking import log_net


def _net(seed: int, *, classes: int = 3, width: float = 1 / 16):
    torch.manual_seed(seed)
    return build_vgg("A", classes, width, "glorot").eval()


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


SMALL = NetInfo(name="A", crop=32, train_scale=(36, 48))
WIDE = NetInfo(name="A", crop=224, train_scale=(256, 256))


# --- protocol geometry (plain torch) ----------------------------------------------------------


@pytest.mark.parametrize("crop,width", [(32, 1 / 16), (64, 1 / 16), (224, 1 / 32)])
def test_dense_form_at_the_crop_size_equals_the_net(crop, width):
    model = _net(0, width=width)
    x = torch.randn(2, 3, crop, crop)
    with torch.no_grad():
        scores = DenseNet(model, crop)(x)
        assert scores.shape == (2, 3, 1, 1)
        torch.testing.assert_close(scores[..., 0, 0], model(x), rtol=1e-5, atol=1e-6)
        if crop == 224:  # the paper's 7x7 conv: FC1's own weights, viewed as its kernel
            kernel = DenseNet(model, crop).fc1_kernel
            assert kernel.data_ptr() == model.classifier[0].weight.data_ptr()


def test_dense_at_a_224_input_equals_single_crop():
    """At Q = 224 on a square image, dense = the single centre crop (flip-averaged alike)."""
    model, image = _net(1, width=1 / 32), _image(224, 224)
    rows = [Protocol(members=(0,), mode=m, scales=((224,),)) for m in ("single", "dense")]
    evaluator = Evaluator([model], [WIDE], rows)
    single_image, dense = evaluator.posteriors([image])
    single_flipped, _ = evaluator.posteriors([image.flip(-1)])
    torch.testing.assert_close(dense, (single_image + single_flipped) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [(41, 57), (64, 48), (36, 36)])
def test_flipping_the_image_does_not_change_flip_averaged_scores(size):
    image = _image(*size, seed=3)
    dense = Evaluator([_net(2)], [SMALL], [Protocol(members=(0,), mode="dense",
                                                    scales=((36, 45, 52),))])  # fmt: skip
    torch.testing.assert_close(dense.posteriors([image]), dense.posteriors([image.flip(-1)]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_multicrop_grid_is_flip_symmetric_where_the_free_pixels_are_even():
    """Multi-crop is flip-invariant too when (rescaled side - crop) is even on both axes: with an
    odd count the centre column cannot sit in the middle (half a pixel off)."""
    rows = [Protocol(members=(0,), mode=m, scales=((36, 44, 52),))
            for m in ("multicrop", "dense+multicrop")]  # fmt: skip
    evaluator = Evaluator([_net(2)], [SMALL], rows)
    image = _image(40, 40, seed=4)
    torch.testing.assert_close(
        evaluator.posteriors([image]), evaluator.posteriors([image.flip(-1)]), rtol=1e-5, atol=1e-6
    )


def test_multicrop_uses_50_crops_per_scale_and_150_over_three():
    for scales, expected in (((40,), 50), ((36, 42, 48), 150)):
        evaluator = Evaluator([_net(0)], [SMALL], [Protocol(members=(0,), mode="multicrop",
                                                             scales=(scales,))])  # fmt: skip
        evaluator.posteriors([_image(40, 52)])
        assert evaluator.scorers[0].forwarded == expected
    assert grid_positions(10) == [0, 2, 5, 8, 10]  # mirror-symmetric: offset i + offset 4-i = 10
    assert grid_positions(7) == [0, 1, 3, 6, 7]


def test_ensemble_scores_are_the_mean_of_the_members_soft_max():
    infos = [SMALL, dataclasses.replace(SMALL, name="B", train_scale=(40, 40))]
    rows = protocols(infos, ("single", "dense", "multicrop", "dense+multicrop"))
    # (2 nets + their ensemble) x 5 rows: single, dense at one Q (Table 3) and three (Table 4),
    # multicrop, dense+multicrop
    assert len(rows) == 15
    assert [(r.mode, len(r.scales[0])) for r in rows[:5]] == [
        ("single", 1),
        ("dense", 1),
        ("dense", 3),
        ("multicrop", 3),
        ("dense+multicrop", 3),
    ]
    evaluator = Evaluator([_net(0), _net(1)], infos, rows)
    probs = evaluator.posteriors([_image(40, 50), _image(60, 44, seed=1)])
    for row in range(5):
        first, second, ensemble = probs[row], probs[5 + row], probs[10 + row]
        torch.testing.assert_close(ensemble, (first + second) / 2)
        assert not torch.allclose(first, second)
    torch.testing.assert_close(probs.sum(-1), torch.ones(15, 2))


def test_batching_does_not_change_scores():
    """Images of many sizes in one batch (dense groups them by size) vs one at a time."""
    images = [_image(h, w, seed=i) for i, (h, w) in
              enumerate([(40, 56), (56, 40), (40, 56), (48, 48), (37, 61), (40, 56)])]  # fmt: skip
    rows = protocols([SMALL], ("single", "dense", "multicrop", "dense+multicrop"))
    together = Evaluator([_net(0)], [SMALL], rows, max_crops=7)
    alone = Evaluator([_net(0)], [SMALL], rows, max_crops=64)
    batched = together.posteriors(images)
    one_by_one = torch.cat([alone.posteriors([image]) for image in images], dim=1)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-7)


def test_errors_equal_a_hand_computed_reference():
    tally = Tally(rows=2, classes=6)
    labels = np.array([0, 1, 2, 3])
    top_k = np.array([  # (images, rows, 5)
        [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]],  # row 0: top-1 hit; row 1: miss entirely
        [[0, 1, 2, 3, 4], [1, 0, 2, 3, 4]],  # row 0: top-5 only; row 1: top-1
        [[5, 4, 3, 1, 0], [2, 0, 1, 3, 4]],  # row 0: miss; row 1: top-1
        [[3, 0, 1, 2, 4], [0, 1, 2, 4, 3]],  # row 0: top-1; row 1: top-5 only
    ])  # fmt: skip
    tally.add(labels[:2], top_k[:2])  # in two batches, as from two actors
    tally.add(labels[2:], top_k[2:])
    assert tally.errors(0) == pytest.approx((0.5, 0.25))  # top-1 hits 2/4, top-5 3/4
    assert tally.errors(1) == pytest.approx((0.5, 0.25))
    assert tally.images.tolist() == [1, 1, 1, 1, 0, 0]
    assert tally.top1[1].tolist() == [0, 1, 1, 0, 0, 0]
    assert tally.top5[0].tolist() == [1, 1, 0, 1, 0, 0]


def test_bad_protocols_are_clear_errors():
    with pytest.raises(ConfigError, match="below net A's crop size 32"):
        protocols([SMALL], ("single",), [(28, 36)])
    with pytest.raises(ConfigError, match="multiple of 32"):
        protocols([dataclasses.replace(SMALL, crop=40)], ("dense",), [(48,)])
    with pytest.raises(ConfigError, match="unknown mode"):
        Protocol(members=(0,), mode="tencrop", scales=((48,),))


# --- the job: Ray Data, checkpoints, MLflow -----------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes, 16 training and 6 validation images each, 40-56 px (sizes vary)."""
    return make_shards(tmp_path_factory.mktemp("eval-data"), classes=3, train_per_class=16,
                       val_per_class=6, row_group_rows=5, shard_size=256 * 2**20)  # fmt: skip


def _rows(manifest_uri: str, split: str) -> tuple[list[torch.Tensor], np.ndarray, list[str]]:
    images, labels, keys, _ = read_split(manifest_uri, split)
    return images, np.array(labels), keys


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    """A tiny net A (crop 32), trained for a few dozen SGD steps, saved as training saves it."""
    from vgg_ray.checkpoint import save_state
    from vgg_ray.config import demo
    from vgg_ray.manifest import load_manifest
    from vgg_ray.transforms import training

    manifest = load_manifest(data)
    config = demo("A", run_name="", width=1 / 16)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, manifest=data, scale=(36, 48))
    )
    images, labels, _ = _rows(data, "train")
    preset = training(scale=(36, 48), crop=32, stats=manifest.stats)
    model = _net(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(30):
        index = np.random.default_rng(step).choice(len(images), 16, replace=False)
        x = preset([images[i] for i in index], epoch=step, indices=index.tolist())
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("checkpoint")
    save_state(directory, {
        "arch": "A", "width": 1 / 16, "classes": list(manifest.wnids),
        "config": config.to_dict(), "data_stats": dataclasses.asdict(manifest.stats),
        "model": model.eval().state_dict(),
    })  # fmt: skip
    return directory


def _config(checkpoint, data, tmp_path, **overrides):
    from vgg_ray.evaluate_job import EvaluateConfig

    values = dict(models=(str(checkpoint),), manifest=data, output=str(tmp_path / "out"),
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_to_mlflow=False,
                  actors=1, cpus_per_actor=0.5, progress_every=10)  # fmt: skip
    values.update(overrides)
    return EvaluateConfig(**values)


@pytest.mark.slow
def test_job_errors_equal_a_reference_computed_without_ray(ray_cluster, data, checkpoint,
                                                           tmp_path):  # fmt: skip
    from vgg_ray.checkpoint import load_trained
    from vgg_ray.evaluate_job import evaluate, load_nets
    from vgg_ray.transforms import evaluation

    config = _config(checkpoint, data, tmp_path, modes=("single", "dense"))
    result = evaluate(config)
    assert [(r.mode, r.test_scales) for r in result.rows] == [
        ("single", "42"),
        ("dense", "42"),
        ("dense", "36,42,48"),
    ]  # Tables 3 and 4: dense

    # Single crop by hand: rescale to Q = (36 + 48) / 2, centre 32 crop, the net's logits.
    model, state = load_trained(str(checkpoint))
    images, labels, _ = _rows(data, "val")
    preset = evaluation(scale=42, crop=32, stats=load_nets(config)[1].stats)
    with torch.no_grad():
        top = model.eval()(preset(images)).topk(3, dim=1).indices.numpy()
    top1 = 1 - np.mean(top[:, 0] == labels)
    assert result.rows[0].top1_error == pytest.approx(top1)
    assert result.rows[0].top5_error == 0.0  # 3 classes: top-5 always holds the label
    assert result.rows[0].images == len(labels) == 18

    # Dense: the same protocol run directly, without Ray.
    nets, _ = load_nets(config)
    rows = protocols([nets[0].info], ("dense",))
    top = Evaluator([nets[0].model], [nets[0].info], rows).top_k(images)
    for row in (0, 1):
        assert result.rows[1 + row].top1_error == pytest.approx(
            1 - np.mean(top[:, row, 0] == labels)
        )

    out = Path(result.output)
    assert "| A | [36;48] | dense | 36,42,48 |" in (out / "table.md").read_text()
    assert (out / "table.csv").read_text().splitlines()[0].startswith("nets,train_scale,mode")
    assert len((out / "per_class.csv").read_text().splitlines()) == 1 + 3 * 3  # rows x classes


@pytest.mark.slow
def test_results_do_not_depend_on_batch_size_or_actor_count(ray_cluster, data, checkpoint,
                                                            tmp_path):  # fmt: skip
    from vgg_ray.evaluate_job import load_nets, run_inference

    runs = []
    for batch_size, actors in ((1, 1), (5, 2)):
        config = _config(checkpoint, data, tmp_path, batch_size=batch_size, actors=actors,
                         max_crops=batch_size * 13)  # fmt: skip
        nets, manifest = load_nets(config)
        rows = protocols([n.info for n in nets])
        runs.append(run_inference(config, nets, rows, manifest))
    (tally_a, skipped_a, per_image_a), (tally_b, skipped_b, per_image_b) = runs
    assert skipped_a == skipped_b == 0 and tally_a.total == tally_b.total == 18
    assert sorted(per_image_a) == sorted(per_image_b)
    for key, top_k in per_image_a.items():
        np.testing.assert_array_equal(top_k, per_image_b[key])
    np.testing.assert_array_equal(tally_a.top1, tally_b.top1)


@pytest.mark.slow
def test_runs_registered_models_and_ensembles_log_to_mlflow(ray_cluster, data, checkpoint,
                                                            tmp_path, tracking_uri,
                                                            capsys):  # fmt: skip
    import mlflow
    import mlflow.pytorch

    from vgg_ray.checkpoint import load_trained
    from vgg_ray.evaluate_job import evaluate
    from vgg_ray.tracking import experiment_id, open_client

    tracking = tracking_uri
    mlflow.set_tracking_uri(tracking)
    client = open_client(tracking)
    experiment = experiment_id(client, "eval-test")  # as training makes it
    params = {"arch": "A", "data.crop": "32", "data.scale": "(36, 48)", "data.normalize": "paper",
              "data.manifest": data}  # fmt: skip
    trained = client.create_run(experiment, run_name="trained")  # as vgg_ray.train leaves it
    for key, value in params.items():
        client.log_param(trained.info.run_id, key, value)
    client.set_tag(trained.info.run_id, "best_checkpoint", str(checkpoint))
    with mlflow.start_run(experiment_id=experiment, run_name="logged") as logged:
        mlflow.log_params(params)
        log_net(load_trained(str(checkpoint))[1])
    version = mlflow.register_model(f"runs:/{logged.info.run_id}/model", "tiny-A")
    client.set_registered_model_alias("tiny-A", "champion", version.version)

    config = _config(checkpoint, data, tmp_path, log_to_mlflow=True, tracking_uri=tracking,
                     models=(f"runs:/{trained.info.run_id}", "models:/tiny-A@champion"),
                     modes=("single", "dense"), manifest="")  # fmt: skip
    result = evaluate(config)
    assert len(result.rows) == 9  # (2 nets + ensemble) x (single, dense at 1 and at 3 scales)
    # The same weights twice: the ensemble's scores are each net's.
    assert result.rows[6].top1_error == pytest.approx(result.rows[0].top1_error)

    metrics = client.get_run(trained.info.run_id).data.metrics
    assert metrics["eval_single_42_top1_error"] == pytest.approx(result.rows[0].top1_error)
    assert "eval_dense_36_42_48_top5_error" in metrics
    assert "eval_single_42_top1_error" in client.get_run(logged.info.run_id).data.metrics
    first = result.mlflow_tables
    assert first.startswith("evaluation/") and first.endswith("-val-single-dense"), first
    assert f"under {first}/" in capsys.readouterr().out
    artifacts = {a.path for a in client.list_artifacts(trained.info.run_id, first)}
    assert artifacts == {f"{first}/table.md", f"{first}/table.csv", f"{first}/per_class.csv"}
    ensemble = [r for r in client.search_runs([experiment])
                if r.info.run_name == "evaluate-ensemble"]  # fmt: skip
    assert len(ensemble) == 1
    assert ensemble[0].data.tags["member_1"] == "models:/tiny-A@champion"
    assert ensemble[0].data.tags["member_0_run"] == trained.info.run_id
    assert "eval_ensemble_dense_36_42_48_top1_error" in ensemble[0].data.metrics
    if tracking.startswith("sqlite:///"):  # beside the database, not ./mlruns of the cwd
        beside = (Path(tracking.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        assert ensemble[0].info.artifact_uri.startswith(beside + "/")

    # The same run evaluated again keeps the first table beside the second.
    again = evaluate(dataclasses.replace(config, models=(f"runs:/{trained.info.run_id}",),
                                         modes=("single",), max_images=6))  # fmt: skip
    second = again.mlflow_tables
    assert second != first and second.endswith("-val-single")
    folders = {a.path for a in client.list_artifacts(trained.info.run_id, "evaluation")}
    assert folders == {first, second}
    for folder in folders:
        table = client.download_artifacts(trained.info.run_id, f"{folder}/table.md", tmp_path)
        assert "| A | [36;48] | single | 42 |" in Path(table).read_text()


def test_bad_inputs_are_clear_errors(data, checkpoint, tmp_path):
    from vgg_ray.checkpoint import load_state, save_state
    from vgg_ray.cli import main
    from vgg_ray.evaluate_job import load_nets

    state = load_state(checkpoint)
    other = build_vgg("A", 5, 1 / 16, "glorot")
    wrong = tmp_path / "five-classes"
    wrong.mkdir()
    save_state(wrong, {**state, "classes": [f"n{i:08d}" for i in range(5)],
                       "model": other.state_dict()})  # fmt: skip
    with pytest.raises(ConfigError, match="has 5 classes but manifest .* has 3"):
        load_nets(_config(wrong, data, tmp_path))

    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads(Path(data).read_text())
    manifest["splits"]["val"] = {"rows": 0, "shards": []}
    (empty / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="split 'val' .* has no rows"):
        load_nets(_config(checkpoint, str(empty), tmp_path))

    code = main(["evaluate", "--model", str(checkpoint), "--manifest", data, "--scales", "28",
                 "--no-mlflow"])  # fmt: skip
    assert code == 2
