"""Appendix B: the paper's descriptor (`vgg_ray.features`), `vgg-ray features` over real images
on a real Ray, resume, and the probe on what it wrote (real MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from vgg_ray.demo import real_photos
from vgg_ray.errors import ConfigError
from vgg_ray.evaluate import NetInfo
from vgg_ray.features import Describer, feature_scales
from vgg_ray.models import build_vgg, vgg_for_state_dict
from vgg_ray.transforms import ColorStats, normalization

CROP = 32  # a demo net's crop: its conv stack gives one position per 32 px


def _net(seed: int = 0, arch: str = "A", classes: int = 5):
    torch.manual_seed(seed)
    return build_vgg(arch, num_classes=classes, width=1 / 16, init="kaiming").eval()


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _by_hand(model, image: torch.Tensor, scales, aggregate: str) -> np.ndarray:
    """FC2's activation at every position of the conv map (each position's 512-d vector through
    the net's own avgpool and FC1, FC2 as in a forward pass), averaged over space, then over the
    image and its flip; the scales averaged or concatenated; L2-normalised."""
    gain, bias = normalization(ColorStats(), "paper")
    per_scale = []
    for q in scales:
        both = []
        for pixels in (image, image.flip(-1)):
            x = TF.resize(pixels, [q], antialias=True).float() * gain[:, None, None]
            x = x + bias[:, None, None]
            with torch.no_grad():
                conv = model.features(x[None])[0]
                positions = [
                    model.classifier[:5](model.avgpool(conv[:, i : i + 1, j : j + 1]).flatten())
                    for i in range(conv.shape[1])
                    for j in range(conv.shape[2])
                ]
            both.append(torch.stack(positions).mean(dim=0))
        per_scale.append(torch.stack(both).mean(dim=0))
    joined = torch.stack(per_scale).mean(dim=0) if aggregate == "mean" else torch.cat(per_scale)
    return F.normalize(joined, dim=0).numpy()


@pytest.mark.parametrize("aggregate", ["mean", "stack"])
def test_descriptor_is_fc2_averaged_over_space_and_flips_then_l2_normalised(aggregate):
    model, info = _net(), NetInfo(name="A", crop=CROP, normalize="paper")
    image = _image(50, 77, seed=1)
    scales = (32, 48, 64)
    describe = Describer([model], [info], scales=scales, aggregate=aggregate)
    got = describe([image])[0]
    assert got.shape == (model.classifier[3].out_features * (3 if aggregate == "stack" else 1),)
    np.testing.assert_allclose(got, _by_hand(model, image, scales, aggregate), atol=1e-5)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_two_nets_are_stacked_each_normalised():
    nets = [_net(0, "A"), _net(1, "B")]
    infos = [NetInfo(name="A", crop=CROP), NetInfo(name="B", crop=CROP)]
    image = _image(40, 40, seed=2)
    both = Describer(nets, infos, scales=(32, 40), aggregate="mean")([image])[0]
    alone = [Describer([n], [i], scales=(32, 40), aggregate="mean")([image])[0]
             for n, i in zip(nets, infos, strict=True)]  # fmt: skip
    np.testing.assert_allclose(both, np.concatenate(alone) / np.sqrt(2), atol=1e-6)


def test_batching_by_size_never_changes_a_descriptor():
    model, info = _net(), NetInfo(name="A", crop=CROP)
    images = [_image(h, w, seed=i) for i, (h, w) in
              enumerate([(40, 60), (33, 90), (40, 60), (64, 64), (90, 33), (40, 60)])]  # fmt: skip
    describe = Describer([model], [info], scales=(32, 45), aggregate="stack", max_crops=2)
    batched = describe(images)
    one_by_one = np.concatenate([describe([image]) for image in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_default_scales_are_the_papers_scaled_to_the_crop():
    assert feature_scales(NetInfo(name="D")) == (256, 384, 512)
    assert feature_scales(NetInfo(name="A", crop=32)) == (37, 55, 73)
    assert feature_scales(NetInfo(name="A", crop=32), (40, 50)) == (40, 50)


def test_bad_descriptor_settings_are_config_errors():
    model = _net()
    with pytest.raises(ConfigError, match="below net A's crop size 32"):
        Describer([model], [NetInfo(name="A", crop=CROP)], scales=(24, 48))
    with pytest.raises(ConfigError, match="multiple of 32"):
        Describer([model], [NetInfo(name="A", crop=40)], scales=(48,))
    with pytest.raises(ConfigError, match="unknown aggregate"):
        Describer([model], [NetInfo(name="A", crop=CROP)], aggregate="max")


def test_a_plain_state_dict_is_matched_to_its_table_1_net():
    import torchvision

    for arch in ("A", "A-LRN", "C", "E"):
        name, model = vgg_for_state_dict(build_vgg(arch, num_classes=7, width=1 / 16).state_dict())
        assert name == arch and model.num_classes == 7
    name, model = vgg_for_state_dict(torchvision.models.vgg11_bn(num_classes=10).state_dict())
    assert name == "A" and model.batch_norm
    with pytest.raises(ConfigError, match="not a VGG state_dict"):
        vgg_for_state_dict(torchvision.models.resnet18().state_dict(), "resnet.pt")
    wrong = build_vgg("D", num_classes=3, width=1 / 16).state_dict()
    wrong.pop("features.28.weight")
    with pytest.raises(ConfigError, match="match no net of Table 1"):
        vgg_for_state_dict(wrong, "cut.pt")


# --- the job: real photos in class folders, real Ray, real MLflow -------------------------------


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Class folders of crops (40-80 px, sizes vary) of three real photos, 14 per class, with a
    folder's usual oddities: a PNG, a grayscale and a CMYK JPEG, a truncated JPEG, macOS and
    notebook litter, a text file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos") / "images"
    rng = np.random.default_rng(0)
    for name, path in real_photos():
        photo = Image.open(path).convert("RGB")
        (root / name).mkdir(parents=True)
        for i in range(14):
            side = int(rng.integers(120, 300))
            left = int(rng.integers(0, photo.width - side))
            top = int(rng.integers(0, photo.height - side))
            size = (int(rng.integers(40, 80)), int(rng.integers(40, 80)))
            crop = photo.crop((left, top, left + side, top + side)).resize(size)
            if i == 0:
                crop.save(root / name / f"{i:02d}.png")
            elif i == 1:
                crop.convert("L").save(root / name / f"{i:02d}.jpg")
            elif i == 2:
                crop.convert("CMYK").save(root / name / f"{i:02d}.jpg")
            else:
                crop.save(root / name / f"{i:02d}.JPEG", quality=90)
    broken = (root / "china" / "03.JPEG").read_bytes()
    (root / "china" / "99-truncated.jpg").write_bytes(broken[: len(broken) // 3])
    (root / "flower" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.txt").write_text("photos\n")
    return root


def _photo_crops(count: int, seed: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """`count` random 48 px crops of each photo (other crops than the folder's), with labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, (_, path) in enumerate(real_photos()):
        photo = Image.open(path).convert("RGB")
        for _ in range(count):
            side = int(rng.integers(100, 300))
            left = int(rng.integers(0, photo.width - side))
            top = int(rng.integers(0, photo.height - side))
            crop = photo.crop((left, top, left + side, top + side)).resize((48, 48))
            images.append(TF.pil_to_tensor(crop))
            labels.append(label)
    return images, np.array(labels)


@pytest.fixture(scope="module")
def narrow_net(tmp_path_factory) -> tuple[Path, str]:
    """(checkpoint, manifest): a narrow net A (crop 32) trained for 60 SGD steps to tell the
    three photos apart from crops of its own, saved as training saves it; and a generated
    prepared data set (another source to describe)."""
    import dataclasses

    from conftest import make_shards

    from vgg_ray.checkpoint import save_state
    from vgg_ray.config import demo
    from vgg_ray.manifest import load_manifest
    from vgg_ray.transforms import training

    data = make_shards(tmp_path_factory.mktemp("features-data"), classes=3, train_per_class=4,
                       val_per_class=4, row_group_rows=8, shard_size=256 * 2**20)  # fmt: skip
    manifest = load_manifest(data)
    images, labels = _photo_crops(40, seed=1)
    config = demo("A", run_name="", width=1 / 16)
    preset = training(scale=(36, 48), crop=CROP, stats=manifest.stats)
    model = _net(0, classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for step in range(60):
        index = np.random.default_rng(step).choice(len(images), 24, replace=False)
        x = preset([images[i] for i in index], epoch=step, indices=index.tolist())
        loss = F.cross_entropy(model(x), torch.from_numpy(labels[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("checkpoint")
    save_state(directory, {
        "arch": "A", "width": 1 / 16, "classes": ["china", "flower", "hopper"],
        "config": config.to_dict(), "data_stats": dataclasses.asdict(manifest.stats),
        "model": model.eval().state_dict(),
    })  # fmt: skip
    return directory, data


@pytest.fixture(scope="module")
def cluster(s3, ray_cluster):
    """Ray, started after the S3 server's credentials are in the environment (its workers
    inherit it): every Ray test of this module asks for this one."""
    return s3


def _extract(net, source, output, **overrides):
    from vgg_ray.features_job import FeaturesConfig, extract

    values = dict(models=(str(net),), source=str(source), output=str(output), shard_size=16,
                  actors=1, cpus_per_actor=0.5, progress_every=20)  # fmt: skip
    values.update(overrides)
    return extract(FeaturesConfig(**values))


def _read_features(folder: Path):
    manifest = json.loads((folder / "_features.json").read_text())
    tables = [pq.read_table(folder / s["path"]) for s in manifest["shards"]]
    return manifest, tables


def test_a_stopped_extraction_reruns_only_its_unfinished_shards(cluster, photo_folder, narrow_net,
                                                                tmp_path):  # fmt: skip
    net, _ = narrow_net
    out = tmp_path / "features"
    first = _extract(net, photo_folder, out)
    assert first.computed_shards == [f"part-0000{i}.parquet" for i in range(3)]
    assert first.reused_shards == []
    assert (first.images, first.skipped) == (42, 1)  # the truncated JPEG, counted
    manifest, tables = _read_features(out)
    assert manifest["classes"] == ["china", "flower", "hopper"]
    assert sum(t.num_rows for t in tables) == 42 == manifest["images"]
    assert {c for t in tables for c in t.column("class").to_pylist()} == set(manifest["classes"])
    # What a job stopped while writing shard 1 leaves: shards 0 and 2, no shard 1, no manifest.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("part-*")}
    (out / "part-00001.parquet").unlink()
    (out / "_features.json").unlink()
    again = _extract(net, photo_folder, out)
    assert again.computed_shards == ["part-00001.parquet"]
    assert again.reused_shards == ["part-00000.parquet", "part-00002.parquet"]
    for name in again.reused_shards:
        assert (out / name).stat().st_mtime_ns == before[name][0]
    assert (out / "part-00001.parquet").read_bytes() == before["part-00001.parquet"][1]
    assert (again.images, again.skipped) == (42, 1)
    # Another descriptor into the same folder is refused, not mixed in.
    with pytest.raises(ConfigError, match="holds another extraction"):
        _extract(net, photo_folder, out, aggregate="mean")


def test_prepared_shards_are_a_source_with_their_labels(cluster, narrow_net, tmp_path):
    from conftest import read_split

    from vgg_ray.manifest import load_manifest

    net, data = narrow_net
    result = _extract(net, data, tmp_path / "val", split="val", scales=(32, 48), aggregate="mean")
    manifest, tables = _read_features(tmp_path / "val")
    _, labels, keys, _ = read_split(data, "val")
    table = tables[0]
    assert result.images == len(keys) and manifest["split"] == "val"
    assert dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist(),
                    strict=True)) == dict(zip(keys, labels, strict=True))  # fmt: skip
    wnids = load_manifest(data).wnids
    classes = table.column("class").to_pylist()
    assert classes == [wnids[i] for i in table.column("label").to_pylist()]
    vectors = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_bad_input_is_one_line_and_exit_2_before_any_work(narrow_net, photo_folder, tmp_path,
                                                          capsys):  # fmt: skip
    import torchvision

    from vgg_ray.cli import main

    net, _ = narrow_net
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    cases = [
        (["--model", str(tmp_path / "resnet18.pt"), "--source", str(photo_folder)],
         "is not a VGG state_dict"),
        (["--model", str(net), "--source", str(photo_folder), "--scales", "16,48"],
         "scale Q = 16 is below net A's crop size 32"),
        (["--model", str(net), "--source", str(tmp_path / "empty")], "holds no images"),
        (["--model", str(net), "--source", str(tmp_path / "nowhere")], "no such file or folder"),
        (["--model", str(net), "--source", str(photo_folder), "--aggregate", "max"], "invalid"),
        (["--source", str(photo_folder)], "no model given"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["features", *argv, "--output", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_images_on_s3_give_the_same_descriptors_written_to_s3(cluster, photo_folder, narrow_net,
                                                              tmp_path):  # fmt: skip
    import boto3
    import pyarrow.fs as pafs

    net, _ = narrow_net
    client = boto3.client("s3", endpoint_url=cluster.endpoint)
    for path in photo_folder.rglob("*"):
        if path.is_file():
            key = f"photos/{path.relative_to(photo_folder).as_posix()}"
            client.put_object(Bucket=cluster.bucket, Key=key, Body=path.read_bytes())
    remote = _extract(net, cluster.uri("photos"), cluster.uri("features"),
                      s3_endpoint=cluster.endpoint, scales=(32, 48))  # fmt: skip
    local = _extract(net, photo_folder, tmp_path / "local", scales=(32, 48))
    assert (remote.images, remote.skipped) == (local.images, local.skipped) == (42, 1)
    host = cluster.endpoint.removeprefix("http://")
    fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1")
    manifest = json.loads(fs.open_input_stream(f"{cluster.bucket}/features/_features.json").read())
    assert manifest["images"] == 42 and manifest["classes"] == ["china", "flower", "hopper"]
    on_s3 = pq.read_table(f"{cluster.bucket}/features", filesystem=fs).sort_by("key")
    here = pq.read_table(tmp_path / "local").sort_by("key")
    assert on_s3.column("key").to_pylist() == here.column("key").to_pylist()
    np.testing.assert_allclose(np.stack(on_s3.column("feature").to_numpy(zero_copy_only=False)),
                               np.stack(here.column("feature").to_numpy(zero_copy_only=False)),
                               atol=1e-6)  # fmt: skip


def test_photos_features_then_probe_well_above_chance_in_mlflow(
    cluster, photo_folder, narrow_net, tmp_path, sqlite_uri, monkeypatch
):
    """A newcomer's path: class folders of real photos, the CLI's defaults (the paper's scales
    for this net's crop, stacked), then the probe with MLflow's SQLite default."""
    from mlflow.tracking import MlflowClient

    from vgg_ray.cli import main

    net, _ = narrow_net
    out, uri = tmp_path / "photos-features", sqlite_uri
    assert main(["features", "--model", str(net), "--source", str(photo_folder), "--output",
                 str(out), "--actors", "1", "--cpus-per-actor", "0.5"]) == 0  # fmt: skip
    manifest, _ = _read_features(out)
    assert manifest["scales"] == [37, 55, 73] and manifest["aggregate"] == "stack"
    assert main(["probe", "--features", str(out), "--tracking-uri", uri,
                 "--output", str(tmp_path / "probe")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    client = MlflowClient(uri, registry_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("vgg-ray").experiment_id])
    chance = 1 / 3
    assert run.data.metrics["mean_class_recall"] > chance + 0.3, run.data.metrics
    assert run.data.metrics["accuracy"] > chance + 0.3
    assert set(metrics) >= {"accuracy", "mean_class_recall", "mean_ap"}
    assert run.data.params["classifier"] == "svm"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class.csv", "metrics.json", "features"} <= logged
    # The fitted classifier, loaded back from the run, classifies the descriptors.
    import mlflow.sklearn

    from vgg_ray.tracking import use_store

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # the user's consent
    use_store(uri)
    classifier = mlflow.sklearn.load_model(f"runs:/{run.info.run_id}/probe")
    table = pq.read_table(out)
    vectors = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
    predicted = classifier.predict(vectors)
    assert (predicted == np.array(table.column("class").to_pylist())).mean() > chance + 0.3


def test_a_registered_ensemble_is_described_by_its_members_stacked(cluster, photo_folder,
                                                                   narrow_net, tmp_path,
                                                                   sqlite_uri):  # fmt: skip
    """The paper's D & E fusion from the registry: `models:/` of an ensemble gives its members'
    descriptors stacked (here one net twice: each half is the net's own descriptor / sqrt 2)."""
    from vgg_ray.registry import EnsembleConfig, register_ensemble

    net, _ = narrow_net
    registered = register_ensemble(EnsembleConfig(members=(str(net), str(net)), name="vgg-AA",
                                                  tracking_uri=sqlite_uri))  # fmt: skip
    both = _extract(registered.uri, photo_folder, tmp_path / "AA", tracking_uri=sqlite_uri,
                    scales=(32, 48), aggregate="mean")  # fmt: skip
    alone = _extract(net, photo_folder, tmp_path / "A", scales=(32, 48), aggregate="mean")
    assert both.dim == 2 * alone.dim and both.images == alone.images == 42
    manifest, _ = _read_features(tmp_path / "AA")
    assert [m["name"] for m in manifest["models"]] == ["A", "A"]
    ours = pq.read_table(tmp_path / "AA").sort_by("key")
    single = pq.read_table(tmp_path / "A").sort_by("key")
    stacked = np.stack(ours.column("feature").to_numpy(zero_copy_only=False))
    one = np.stack(single.column("feature").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(stacked, np.concatenate([one, one], axis=1) / np.sqrt(2), atol=1e-6)


def test_a_flat_folder_takes_its_classes_from_a_labels_csv(tmp_path, capsys):
    """Rows `file,class` name a file by its path, its name or its name without suffix; a header
    row matches no image; images the CSV does not name are described unlabelled."""
    from vgg_ray.features_job import FeaturesConfig, plan_source

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.jpg", "b.JPEG", "c.png", "d.jpg"):
        (flat / name).write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("file,class\na.jpg,cat\nb,dog\nc.png,cat\n")
    config = FeaturesConfig(models=("m",), source=str(flat), labels=str(tmp_path / "labels.csv"))
    source = plan_source(config)
    assert source.classes == ("cat", "dog")
    [task] = source.tasks
    assert dict(zip(task["keys"], task["labels"], strict=True)) == {
        "a.jpg": 0, "b.JPEG": 1, "c.png": 0, "d.jpg": -1}  # fmt: skip
    assert source.notes == [f"1 image(s) not in {tmp_path / 'labels.csv'}: described, unlabelled"]
    unlabelled = plan_source(FeaturesConfig(models=("m",), source=str(flat)))
    assert unlabelled.classes == () and unlabelled.tasks[0]["labels"] == [-1] * 4
    with pytest.raises(ConfigError, match="no row names an image"):
        (tmp_path / "other.csv").write_text("x.jpg,cat\n")
        plan_source(FeaturesConfig(models=("m",), source=str(flat),
                                   labels=str(tmp_path / "other.csv")))  # fmt: skip


def test_bf16_and_channels_last_as_on_gpu_actors_keep_the_descriptor():
    """GPU actors describe under bf16 autocast in NHWC: the same descriptor within bf16's
    precision (checked here on the CPU, where both run too)."""
    model, info = _net(), NetInfo(name="A", crop=CROP)
    images = [_image(48, 64, seed=3), _image(40, 40, seed=4)]
    exact = Describer([model], [info], scales=(32, 48))(images)
    fast = Describer([model], [info], scales=(32, 48), bf16=True, channels_last=True)(images)
    cosine = (exact * fast).sum(axis=1)  # both unit norm
    assert fast.dtype == np.float32 and (cosine > 0.999).all(), cosine
