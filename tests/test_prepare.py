"""`vgg-ray prepare`: shards on a real S3 protocol server (moto) and on disk, the image policy,
resuming, the stats, and the one-line errors."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

import vgg_ray.prepare as prep
from vgg_ray.cli import main
from vgg_ray.demo import NAMES_FILE, ensure_demo_shards, make_demo_tree, wnid
from vgg_ray.errors import ConfigError
from vgg_ray.manifest import read_manifest
from vgg_ray.prepare import SHARD_SCHEMA, PrepareConfig, prepare
from vgg_ray.storage import open_storage, read_bytes

# demo_tree: 6 train + 2 val per class, plus oddities: class 0 gains a grayscale and a CMYK
# JPEG, class 1 a PNG named .JPEG and a tall image, class 2 a truncated JPEG (rejected),
# class 3 an empty file (rejected) and a wide image.
TRAIN_ROWS = {0: 8, 1: 8, 2: 6, 3: 7}
VAL_ROWS = {0: 2, 1: 2, 2: 2, 3: 2}
SMALL = dict(shard_size=16 * 1024, row_group_rows=4)  # several shards and row groups


def _config(tree: Path, dest: str, **options) -> PrepareConfig:
    return PrepareConfig(src=str(tree), dest=dest, progress=False, **{**SMALL, **options})


def _rows(dest: str, manifest: dict, split: str, *, s3_endpoint: str | None = None) -> list[dict]:
    fs, root = open_storage(dest, s3_endpoint=s3_endpoint)
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        data = read_bytes((fs, f"{root}/{shard['path']}"))
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        file = pq.ParquetFile(io.BytesIO(data))
        assert file.schema_arrow.equals(SHARD_SCHEMA)
        groups = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
        assert groups == shard["row_groups"] and sum(groups) == shard["rows"]
        rows += file.read().to_pylist()
    return rows


@pytest.fixture(scope="module")
def on_s3(s3, demo_tree):
    """The oddities tree prepared into moto's S3 with two worker processes."""
    dest = s3.uri("imagenet")
    config = _config(demo_tree, dest, s3_endpoint=s3.endpoint, workers=2,
                     class_names=str(demo_tree / NAMES_FILE))  # fmt: skip
    summary = prepare(config)
    manifest = read_manifest(dest, s3_endpoint=s3.endpoint)
    return config, summary, manifest


def test_s3_shards_hold_every_image_with_its_label(on_s3, s3):
    config, summary, manifest = on_s3
    assert manifest["format"] == "vgg-ray-shards/1"
    assert [c["wnid"] for c in manifest["classes"]] == [wnid(i) for i in range(4)]
    assert [c["name"] for c in manifest["classes"]][:2] == ["disc", "horizontal stripes"]
    for split, expected in (("train", TRAIN_ROWS), ("val", VAL_ROWS)):
        rows = _rows(config.dest, manifest, split, s3_endpoint=s3.endpoint)
        assert Counter(r["label"] for r in rows) == expected
        assert manifest["splits"][split]["rows"] == sum(expected.values())
        for row in rows:  # the key's class folder is the label's wnid
            assert row["key"].split("/")[1] == wnid(row["label"])
            assert (Path(config.src) / row["key"]).exists()
    assert summary.images == 37 and summary.shards == sum(
        len(s["shards"]) for s in manifest["splits"].values()
    )
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    # Shuffled before cutting: shards mix classes.
    fs, root = open_storage(config.dest, s3_endpoint=s3.endpoint)
    first = manifest["splits"]["train"]["shards"][0]["path"]
    labels = pq.read_table(f"{root}/{first}", filesystem=fs, columns=["label"])["label"]
    assert len(set(labels.to_pylist())) >= 2


def test_every_stored_image_decodes_as_rgb_and_oddities_are_converted(on_s3, s3, demo_tree):
    config, summary, manifest = on_s3
    rows = {r["key"]: r for r in _rows(config.dest, manifest, "train", s3_endpoint=s3.endpoint)}
    for row in rows.values():
        image = decode_jpeg(torch.frombuffer(bytearray(row["image"]), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)  # fmt: skip
        assert image.shape == (3, row["height"], row["width"])
    source = lambda key: (demo_tree / key).read_bytes()  # noqa: E731
    gray, cmyk, png = (f"train/{wnid(c)}/odd_{n}.JPEG" for c, n in
                       ((0, "grayscale"), (0, "cmyk"), (1, "png_named")))  # fmt: skip
    assert rows[gray]["image"] == source(gray)  # a grayscale JPEG is kept byte for byte
    for key in (cmyk, png):
        assert rows[key]["image"] != source(key) and rows[key]["image"][:2] == b"\xff\xd8"
        assert Image.open(io.BytesIO(rows[key]["image"])).mode == "RGB"
    assert manifest["converted"] == summary.converted == 2
    wide = rows[f"train/{wnid(3)}/odd_wide.jpg"]
    assert wide["width"] > 2 * wide["height"]


def test_undecodable_files_are_listed_not_stored(on_s3):
    _, summary, manifest = on_s3
    rejected = {r["key"]: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {
        f"train/{wnid(2)}/odd_truncated.JPEG",
        f"train/{wnid(3)}/odd_empty.JPEG",
    }
    assert "truncated" in rejected[f"train/{wnid(2)}/odd_truncated.JPEG"].lower()
    assert rejected[f"train/{wnid(3)}/odd_empty.JPEG"] == "empty file"
    assert summary.rejected == 2


def test_stats_are_the_sample_covariance_eigen_decomposition(on_s3, s3):
    config, _, manifest = on_s3
    stats = manifest["stats"]
    mean, eigval, eigvec = (np.array(stats[k]) for k in ("mean_rgb", "eigval", "eigvec"))
    assert stats["sample_size"] == sum(TRAIN_ROWS.values())  # fewer than 10,000: all of them
    assert np.all((mean > 0) & (mean < 255))
    assert np.all(eigval > 0) and np.all(np.diff(eigval) <= 0)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
    decoded = [
        np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), dtype=np.float64)
        for r in _rows(config.dest, manifest, "train", s3_endpoint=s3.endpoint)
    ]
    pixels = np.concatenate([image.reshape(-1, 3) for image in decoded])
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-9)
    covariance = np.cov(pixels, rowvar=False, bias=True)
    np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T, covariance, rtol=1e-7)
    for i in range(3):  # eigvec[:, i] pairs with eigval[i]
        np.testing.assert_allclose(covariance @ eigvec[:, i], eigval[i] * eigvec[:, i], rtol=1e-6)


def test_no_credentials_in_what_prepare_writes(on_s3, s3):
    config, _, _ = on_s3
    fs, root = open_storage(config.dest, s3_endpoint=s3.endpoint)
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File and info.path.endswith(".json"):
            text = read_bytes((fs, info.path)).decode()
            assert FAKE_SECRET_KEY not in text and FAKE_ACCESS_KEY not in text


def test_s3_rerun_reuses_every_shard(on_s3, s3):
    config, _, manifest = on_s3
    manifest_shards = lambda m: sum(len(s["shards"]) for s in m["splits"].values())  # noqa: E731
    before = read_bytes(f"{config.dest}/manifest.json", s3_endpoint=s3.endpoint)
    summary = prepare(PrepareConfig(**{**config.__dict__, "workers": 1}))
    assert summary.reused_shards == summary.shards == manifest_shards(manifest)
    assert read_bytes(f"{config.dest}/manifest.json", s3_endpoint=s3.endpoint) == before


def _count_encodes(monkeypatch, fail_after: int | None = None) -> list[int]:
    calls = [0]
    original = prep.encode_image

    def counting(data: bytes):
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            raise RuntimeError("simulated crash")
        return original(data)

    monkeypatch.setattr(prep, "encode_image", counting)
    return calls


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_local_rerun_is_idempotent_and_decodes_nothing(tmp_path, demo_tree, monkeypatch):
    dest = tmp_path / "shards"
    first = prepare(_config(demo_tree, str(dest), workers=1))
    files, manifest = _files(dest), (dest / "manifest.json").read_bytes()
    calls = _count_encodes(monkeypatch)
    second = prepare(_config(demo_tree, str(dest), workers=1))
    assert calls[0] == 0 and second.reused_shards == first.shards
    assert (dest / "manifest.json").read_bytes() == manifest
    after = _files(dest)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in files.items() if k != "manifest.json"
    }  # shards and sidecars untouched


@pytest.mark.parametrize("where", ["local", "s3"])
def test_crash_leaves_no_partial_shard_and_a_rerun_completes(where, tmp_path, demo_tree, s3,
                                                              monkeypatch):  # fmt: skip
    dest = str(tmp_path / "shards") if where == "local" else s3.uri(f"crash-{tmp_path.name}")
    config = _config(demo_tree, dest, workers=1, s3_endpoint=s3.endpoint)
    total = sum(len(t.items) for t in _tasks(config))
    _count_encodes(monkeypatch, fail_after=total // 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(config)
    monkeypatch.undo()

    fs, root = open_storage(dest, s3_endpoint=s3.endpoint)
    import pyarrow.fs as pafs

    listed = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
              if i.type == pafs.FileType.File]  # fmt: skip
    names = {i.base_name for i in listed}
    assert "manifest.json" not in names
    assert not any(n.startswith(".tmp-") for n in names)
    shards = [i for i in listed if i.base_name.endswith(".parquet")]
    assert shards  # some finished before the crash
    for info in shards:  # each whole, each with its sidecar
        assert info.base_name.replace(".parquet", ".json") in names
        pq.read_table(info.path, filesystem=fs)
    if where == "local":  # a killed run's temp file (never under a final name) is cleared
        Path(root, "train", ".tmp-train-00000-dead.parquet").write_bytes(b"half")

    calls = _count_encodes(monkeypatch)
    summary = prepare(config)
    assert summary.reused_shards == len(shards) and summary.images == 37
    finished = sum(pq.ParquetFile(i.path, filesystem=fs).metadata.num_rows for i in shards)
    assert 0 < calls[0] <= total - finished  # finished shards are not decoded again
    if where == "local":
        assert not any(n.startswith(".tmp-") for n in os.listdir(Path(root, "train")))
    fresh = tmp_path / "fresh"
    prepare(_config(demo_tree, str(fresh), workers=1))
    assert read_manifest(dest, s3_endpoint=s3.endpoint) == read_manifest(str(fresh))


def _tasks(config: PrepareConfig):
    classes, splits = prep.scan_source(config)
    sample = prep.stats_sample(splits["train"], config)
    return [t for s, items in splits.items() for t in prep.plan_shards(s, items, sample, config)]


def _flat_val_tree(root: Path) -> tuple[Path, dict[str, str]]:
    """A tree whose val/ is flat ILSVRC2012_val_*.JPEG files; returns it and {stem: wnid}."""
    tree = make_demo_tree(root, classes=3, train_per_class=2, val_per_class=2, size=(32, 40))
    truth = {}
    for number, path in enumerate(sorted((tree / "val").glob("*/*.JPEG")), 1):
        stem = f"ILSVRC2012_val_{number:08d}"
        truth[stem] = path.parent.name
        path.rename(tree / "val" / f"{stem}.JPEG")
    for folder in (tree / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    return tree, truth


@pytest.mark.parametrize("style", ["kaggle-csv", "text"])
def test_flat_val_with_either_labels_file(style, tmp_path):
    tree, truth = _flat_val_tree(tmp_path / "tree")
    labels = tmp_path / "labels"
    if style == "kaggle-csv":
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{stem},{w} 10 20 30 40 {w} 1 2 3 4\n" for stem, w in truth.items()))  # fmt: skip
    else:
        labels.write_text("".join(f"{stem}.JPEG {w}\n" for stem, w in truth.items()))
    dest = tmp_path / "out"
    prepare(_config(tree, str(dest), workers=1, val_labels=str(labels)))
    manifest = read_manifest(str(dest))
    assert [c["name"] for c in manifest["classes"]] == [wnid(i) for i in range(3)]  # no names
    rows = _rows(str(dest), manifest, "val")
    assert len(rows) == len(truth) == 6
    for row in rows:
        assert wnid(row["label"]) == truth[Path(row["key"]).stem]


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path):
    """A tree copied from a Mac or a notebook: .DS_Store, AppleDouble "._x.JPEG" twins (not
    JPEGs), .ipynb_checkpoints/ folders in train/ and val/."""
    tree = make_demo_tree(tmp_path / "tree", classes=2, train_per_class=3, val_per_class=1)
    for folder in [tree / "train", tree / "val", *(tree / "train").iterdir()]:
        (folder / ".DS_Store").write_bytes(b"Bud1\0\0")
        (folder / ".ipynb_checkpoints").mkdir()
    for image in list((tree / "train").glob("*/*.JPEG")):
        (image.parent / f"._{image.name}").write_bytes(b"\0\5\26\7 AppleDouble")
    summary = prepare(_config(tree, str(tmp_path / "out"), workers=1))
    manifest = read_manifest(str(tmp_path / "out"))
    assert [c["wnid"] for c in manifest["classes"]] == [wnid(0), wnid(1)]
    assert manifest["splits"]["train"]["rows"] == 6 and manifest["splits"]["val"]["rows"] == 2
    assert summary.rejected == 0  # the "._" twins were never read


def test_flat_val_errors(tmp_path):
    tree, truth = _flat_val_tree(tmp_path / "tree")
    with pytest.raises(ConfigError, match="pass --val-labels"):
        prepare(_config(tree, str(tmp_path / "out")))
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n99999999\n")
    with pytest.raises(ConfigError, match="n99999999 is not a class of train/"):
        prepare(_config(tree, str(tmp_path / "out"), val_labels=str(labels)))
    labels.write_text(f"ILSVRC2012_val_00000001.JPEG {wnid(0)}\n")
    with pytest.raises(ConfigError, match="5 val files have no entry"):
        prepare(_config(tree, str(tmp_path / "out"), val_labels=str(labels)))


def test_user_mistakes_are_one_line_errors(tmp_path, demo_tree, capsys):
    assert main(["prepare", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error

    (tmp_path / "no-train").mkdir()
    with pytest.raises(ConfigError, match="has no train/ folder"):
        prepare(_config(tmp_path / "no-train", str(tmp_path / "out")))

    tree = tmp_path / "tree"
    shutil.copytree(demo_tree, tree)
    (tree / "train" / "n12345678").mkdir()
    with pytest.raises(ConfigError, match="train/n12345678 holds no images"):
        prepare(_config(tree, str(tmp_path / "out")))
    shutil.rmtree(tree / "train" / "n12345678")

    names = tmp_path / "names.txt"
    names.write_text(f"{wnid(0)} disc\n")
    with pytest.raises(ConfigError, match=f"no entry for {wnid(1)}"):
        prepare(_config(tree, str(tmp_path / "out"), class_names=str(names)))


def test_unreadable_manifest(tmp_path):
    with pytest.raises(ConfigError, match="cannot read manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="expected format vgg-ray-shards/1"):
        read_manifest(str(tmp_path / "manifest.json"))


def test_storage_errors_reach_prepare_as_one_line(tmp_path, demo_tree, s3, monkeypatch, capsys):
    from moto import settings

    assert main(["prepare", str(demo_tree), "s3://no-such-bucket/x",
                 "--s3-endpoint", s3.endpoint, "--no-progress"]) == 2  # fmt: skip
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert main(["prepare", str(demo_tree), s3.uri("x"),
                 "--s3-endpoint", "http://127.0.0.1:1", "--no-progress"]) == 2  # fmt: skip
    assert "cannot reach S3 endpoint http://127.0.0.1:1" in capsys.readouterr().err
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks keys
    assert main(["prepare", str(demo_tree), s3.uri("x"),
                 "--s3-endpoint", s3.endpoint, "--no-progress"]) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert "check your AWS credentials" in error
    assert FAKE_SECRET_KEY not in error and FAKE_ACCESS_KEY not in error


def test_demo_data_command_and_cached_demo_shards(tmp_path, monkeypatch):
    assert main(["demo-data", str(tmp_path / "tree"), "--train-per-class", "3",
                 "--val-per-class", "1", "--classes", "2"]) == 0  # fmt: skip
    assert len(list((tmp_path / "tree" / "train").glob("*/*.JPEG"))) == 6
    assert (tmp_path / "tree" / NAMES_FILE).read_text().startswith(f"{wnid(0)} disc")

    monkeypatch.setenv("VGG_RAY_CACHE", str(tmp_path / "cache"))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_shards()))
               for _ in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].startswith(str(tmp_path / "cache"))
    manifest = read_manifest(results[0])
    assert manifest["splits"]["train"]["rows"] == 400 and manifest["splits"]["val"]["rows"] == 100
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    stamp = os.stat(results[0]).st_mtime_ns
    assert ensure_demo_shards() == results[0] and os.stat(results[0]).st_mtime_ns == stamp
