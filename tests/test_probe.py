"""`vgg-ray probe`, the linear probe of Appendix B, on features folders written here in the
format `vgg-ray features` writes (Gaussian clusters on the unit sphere), with a real MLflow
SQLite store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from vgg_ray.errors import ConfigError
from vgg_ray.probe import ProbeConfig, probe, score

DIM = 64
NAMES = ("cat", "dog", "fox", "owl")


def clusters(per_class: int, *, names=NAMES, seed: int = 0, noise: float = 0.5):
    """(features, class names): one well separated Gaussian cluster per class, L2-normalised
    as the extraction leaves them. The centres depend only on the class name."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for name in names:
        centre = np.random.default_rng(sum(map(ord, name))).normal(size=DIM)
        centre /= np.linalg.norm(centre)
        # noise of norm about `noise`; random centres in 64-d are about sqrt(2) apart
        rows.append(centre + noise / math.sqrt(DIM) * rng.normal(size=(per_class, DIM)))
        labels += [name] * per_class
    x = np.concatenate(rows).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def write_folder(
    where: str | Path,
    x: np.ndarray,
    classes: list[str | None],
    *,
    label_of: dict[str, int] | None = None,
    fingerprint: str = "fp-D-256",
    model: str = "D",
    finished: bool = True,
    fs: pafs.FileSystem | None = None,
    shard_rows: int = 50,
    prefix: str = "img",
) -> str:
    """A features folder: Parquet shards of `shard_rows` and, when `finished`, _features.json.
    `label_of` sets each class's int label (default: sorted order), to index classes apart."""
    fs = fs or pafs.LocalFileSystem()
    base = str(where)
    fs.create_dir(base, recursive=True)
    names = sorted({c for c in classes if c})
    label_of = label_of or {name: i for i, name in enumerate(names)}
    shards = []
    for number, start in enumerate(range(0, len(x), shard_rows)):
        stop = min(start + shard_rows, len(x))
        part = classes[start:stop]
        table = pa.table({
            "key": [f"{prefix}-{i:05d}" for i in range(start, stop)],
            "label": pa.array([label_of[c] if c else -1 for c in part], pa.int64()),
            "class": pa.array(part, pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(
                pa.array(x[start:stop].reshape(-1), pa.float32()), DIM
            ),
        })  # fmt: skip
        path = f"part-{number:05d}.parquet"
        pq.write_table(table, f"{base}/{path}", filesystem=fs)
        shards.append({"path": path, "rows": stop - start})
    meta = {
        "format": "vgg-ray-features/1",
        "fingerprint": fingerprint,
        "models": [{"source": f"runs:/{model.lower() * 32}/model", "name": model}],
        "scales": [256],
        "aggregate": "stack",
        "dim": DIM,
        "images": len(x),
        "classes": sorted(label_of, key=label_of.get),
        "source": "tests",
        "shards": shards,
    }
    if finished:
        with fs.open_output_stream(f"{base}/_features.json") as stream:
            stream.write(json.dumps(meta).encode())
    return base


def config(tmp_path: Path, features, **overrides) -> ProbeConfig:
    values = {"features": tuple(map(str, features)), "output": str(tmp_path / "out"),
              "log_to_mlflow": False}  # fmt: skip
    return ProbeConfig(**(values | overrides))


# --- metrics -------------------------------------------------------------------------------


def test_scores_equal_a_hand_computation():
    from sklearn.metrics import balanced_accuracy_score

    classes = np.array(["a", "b", "c"])
    truth = np.array(["a", "a", "a", "b", "b", "c"])
    predicted = np.array(["a", "a", "b", "b", "c", "c"])
    scores = np.array([
        # a: positives ranked 1, 2 and 6 -> AP = (1/1 + 2/2 + 3/6) / 3
        [0.9, 0.0, 0.0], [0.8, 0.0, 0.0], [0.1, 0.5, 0.0],
        # b and c: their positives ranked first -> AP 1
        [0.7, 0.9, 0.0], [0.2, 0.8, 0.6], [0.3, 0.0, 0.9],
    ])  # fmt: skip
    result = score(classes, truth, predicted, scores)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.recall == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert result.mean_class_recall == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert result.mean_class_recall == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert result.ap == pytest.approx({"a": 2.5 / 3, "b": 1.0, "c": 1.0})
    assert result.mean_ap == pytest.approx((2.5 / 3 + 2) / 3)
    assert result.images == {"a": 3, "b": 2, "c": 1}


def test_separable_clusters_are_probed_well_above_chance(tmp_path, capsys):
    x, y = clusters(40)
    result = probe(config(tmp_path, [write_folder(tmp_path / "f", x, y)]))
    assert result.accuracy > 0.9 and result.mean_class_recall > 0.9 and result.mean_ap > 0.9
    # test_fraction 0.25 of 40 per class; the split's counts add up in the per-class table
    split = result.splits[0]
    assert (split.train_images, split.test_images) == (120, 40)
    rows = result.per_class
    assert [r.name for r in rows] == list(NAMES)
    assert sum(r.test_images for r in rows) == 40 and {r.train_images for r in rows} == {30}
    assert result.mean_class_recall == pytest.approx(np.mean([r.recall for r in rows]))
    assert result.accuracy == pytest.approx(sum(r.recall * r.test_images for r in rows) / 40)
    assert result.mean_ap == pytest.approx(np.mean([r.ap for r in rows]))
    assert result.run_id is None

    out = Path(result.output)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_class_recall"] == pytest.approx(result.mean_class_recall)
    assert metrics["fingerprint"] == "fp-D-256"
    lines = (out / "per_class.csv").read_text().splitlines()
    assert lines[0].startswith("class,train_images,test_images,recall")
    assert len(lines) == 1 + len(NAMES)
    printed = capsys.readouterr().out
    assert "vgg-ray probe: 1 training folder(s), 160 images, 4 classes, 64-d features" in printed
    assert "| features | classifier |" in printed and f"in {out}" in printed


def test_c_is_chosen_on_the_validation_part_ties_to_the_smaller(tmp_path, capsys):
    # Overlapping clusters: the validation scores tell the C values apart.
    x, y = clusters(40, noise=3.0)
    folder = write_folder(tmp_path / "f", x, y)
    result = probe(config(tmp_path, [folder], c_values=(100.0, 1.0, 0.01, 1e-4)))
    # 20% of each class's 30 training images validate C, the other 24 fit it
    assert "120 train (96 fit + 24 validation), 40 test" in capsys.readouterr().out
    validation = result.splits[0].validation
    assert set(validation) == {100.0, 1.0, 0.01, 1e-4}
    assert len({round(v, 6) for v in validation.values()}) > 1
    best = max(validation.values())
    assert result.chosen_c == (min(c for c, v in validation.items() if v > best - 1e-9),)
    logged = json.loads((Path(result.output) / "metrics.json").read_text())["splits"][0]
    assert logged["c"] == result.chosen_c[0]
    assert logged["validation"] == {f"{c:g}": v for c, v in validation.items()}

    # Separable clusters: C = 1 and 10 are both perfect on validation, and the smaller wins.
    x, y = clusters(40)
    folder = write_folder(tmp_path / "g", x, y)
    result = probe(config(tmp_path, [folder], c_values=(10.0, 1.0)))
    assert result.splits[0].validation == {1.0: 1.0, 10.0: 1.0}
    assert result.chosen_c == (1.0,)


def test_two_training_folders_are_matched_by_class_name(tmp_path, capsys):
    """The second folder indexes the classes the other way round: matched by their int
    labels, the training data would contradict itself and the probe fall to chance."""
    x1, y1 = clusters(20, seed=1)
    x2, y2 = clusters(20, seed=2)
    reversed_labels = {name: len(NAMES) - 1 - i for i, name in enumerate(NAMES)}
    a = write_folder(tmp_path / "a", x1, y1)
    b = write_folder(tmp_path / "b", x2, y2, label_of=reversed_labels)
    # The test folder holds a class neither training folder has: those rows are dropped.
    xt, yt = clusters(10, seed=3, names=(*NAMES, "yak"))
    test = write_folder(tmp_path / "t", xt, [*yt[:-3], None, None, None])
    result = probe(config(tmp_path, [a, b], test=(test,)))
    assert result.splits[0].train_images == 160 and result.splits[0].test_images == 40
    assert result.accuracy > 0.9 and result.mean_class_recall > 0.9
    assert [r.name for r in result.per_class] == list(NAMES)
    printed = capsys.readouterr().out
    assert "2 training folder(s), 160 images, 4 classes" in printed
    assert "40 images used (3 without a class, dropped; 7 of classes unseen in training" in printed
    dropped = json.loads((Path(result.output) / "metrics.json").read_text())["dropped"]
    assert dropped == {"unlabelled_train": 0, "unlabelled_test": 3, "unseen_test": 7}


def test_unlabelled_rows_are_dropped_and_counted(tmp_path, capsys):
    x, y = clusters(20)
    y = [None if i % 10 == 0 else c for i, c in enumerate(y)]  # 8 rows without a class
    result = probe(config(tmp_path, [write_folder(tmp_path / "f", x, y)]))
    assert result.splits[0].train_images + result.splits[0].test_images == 72
    assert "80 images (8 without a class, dropped), 4 classes" in capsys.readouterr().out


# --- MLflow --------------------------------------------------------------------------------


def test_mlflow_holds_the_run_its_classifier_and_lineage(tmp_path, sqlite_uri, monkeypatch):
    import mlflow.sklearn
    from mlflow.tracking import MlflowClient

    from vgg_ray.tracking import use_store

    uri = sqlite_uri
    x, y = clusters(20)
    folder = write_folder(tmp_path / "f", x, y)
    # The Caltech protocol: N random training images per class, the rest test, over 2 splits.
    result = probe(config(tmp_path, [folder], log_to_mlflow=True, tracking_uri=uri,
                          experiment="probe-test", classifier="logreg", train_per_class=10,
                          splits=2))  # fmt: skip
    assert len(result.chosen_c) == 2 and result.mean_class_recall > 0.9

    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "probe-D"
    assert client.get_experiment(run.info.experiment_id).name == "probe-test"
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert metrics["mean_class_recall"] == pytest.approx(result.mean_class_recall)
    assert metrics["accuracy"] == pytest.approx(result.accuracy)
    assert metrics["mean_ap"] == pytest.approx(result.mean_ap)
    assert metrics["mean_class_recall_std"] == pytest.approx(result.mean_class_recall_std)
    assert params["classifier"] == "logreg" and params["splits"] == "2"
    assert params["chosen_c"] == ",".join(f"{c:g}" for c in result.chosen_c)
    assert all(float(c) in ProbeConfig().c_values for c in params["chosen_c"].split(","))
    assert params["train_images"] == "40" and params["test_images"] == "40"
    assert params["feature_dim"] == "64" and params["model_sources"] == f"runs:/{'d' * 32}/model"
    assert tags["vgg_ray.probe.features"] == folder
    assert tags["vgg_ray.features.fingerprint"] == "fp-D-256"
    history = client.get_metric_history(result.run_id, "split_chosen_c")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(result.chosen_c))

    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"metrics.json", "per_class.csv", "features"} <= names
    lineage = client.download_artifacts(result.run_id, "features/train-0/_features.json",
                                        str(tmp_path / "down"))  # fmt: skip
    assert json.loads(Path(lineage).read_text())["fingerprint"] == "fp-D-256"

    # The final split's classifier, loaded back through MLflow, predicts class names.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    use_store(uri)
    model = mlflow.sklearn.load_model(f"runs:/{result.run_id}/probe")
    fresh, truth = clusters(5, seed=9)
    assert (model.predict(fresh) == np.array(truth)).mean() > 0.9


def test_a_probe_that_fails_leaves_a_failed_run(tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri
    x, y = clusters(10)
    # A folder where per_class.csv is to be written: the write fails after the fits, in the run.
    (tmp_path / "out" / "per_class.csv").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        probe(config(tmp_path, [write_folder(tmp_path / "f", x, y)], log_to_mlflow=True,
                     tracking_uri=uri))  # fmt: skip
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("probe-D", "FAILED")]


# --- input errors --------------------------------------------------------------------------


def test_features_on_s3_are_read(tmp_path, s3):
    from vgg_ray.storage import open_storage

    fs, base = open_storage(s3.uri("probe/f"), s3_endpoint=s3.endpoint)
    x, y = clusters(20)
    write_folder(base, x, y, fs=fs)
    result = probe(config(tmp_path, [s3.uri("probe/f")], s3_endpoint=s3.endpoint))
    assert result.mean_class_recall > 0.9
    write_folder(f"{base}-unfinished", x, y, fs=fs, finished=False)
    with pytest.raises(ConfigError, match="no _features.json, not a finished extraction"):
        probe(config(tmp_path, [s3.uri("probe/f-unfinished")], s3_endpoint=s3.endpoint))


def test_bad_inputs_are_clear_errors(tmp_path):
    x, y = clusters(10)
    good = write_folder(tmp_path / "good", x, y)

    def fails(match: str, features, **overrides) -> str:
        with pytest.raises(ConfigError, match=match) as caught:
            probe(config(tmp_path, features, **overrides))
        message = str(caught.value)
        assert "\n" not in message
        return message

    fails("no features given: pass --features", [])
    other = write_folder(tmp_path / "e", x, y, fingerprint="fp-E-256", model="E")
    message = fails("features of two different models/scales mixed", [good, other])
    assert f"{good} (D, 256 stack) vs {other} (E, 256 stack)" in message
    same_names = write_folder(tmp_path / "d2", x, y, fingerprint="fp-D-other")
    assert "fingerprint fp-D-256" in fails("different models/scales mixed", [good, same_names])
    fails("different models/scales mixed", [good], test=(other,))

    unfinished = write_folder(tmp_path / "unfinished", x, y, finished=False)
    fails(r"no _features\.json, not a finished extraction", [unfinished])
    fails("no such features folder", [tmp_path / "missing"])
    unlabelled = write_folder(tmp_path / "unlabelled", x, [None] * len(y))
    fails(r"no labelled image in .* \(40 without a class\)", [unlabelled])
    one = write_folder(tmp_path / "one", x[:10], y[:10])
    fails("only one class \\('cat'\\)", [one])

    message = fails("--train-per-class 10 needs 11", [good], train_per_class=10)
    assert "class 'cat' has 10 image(s)" in message
    fails("class 'cat' has 2 labelled image", [write_folder(tmp_path / "tiny", x[8:], y[8:])])
    zebras = write_folder(tmp_path / "z", *clusters(5, names=("zebra",)))
    fails("no labelled test image is of a class seen in training", [good], test=(zebras,))

    fails("unknown classifier 'tree'", [good], classifier="tree")
    fails("C values must be positive", [good], c_values=(1.0, 0.0))
    fails("validation fraction must be in", [good], validation_fraction=1.0)
    fails("splits > 1 needs random splits", [good], test=(other,), splits=3)
    fails("the same folder is given as training and test", [good], test=(good,))
    broken = x.copy()
    broken[3, 5] = np.nan
    fails("1 row\\(s\\) with non-finite features", [write_folder(tmp_path / "nan", broken, y)])
    shard = tmp_path / "good" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 5), shard)
    fails("has 5 rows, _features.json says 40", [good])


def test_two_classes_score_both_columns(tmp_path):
    """With two classes scikit-learn's decision function is one column: both classes get AP."""
    x, y = clusters(20, names=("cat", "dog"))
    result = probe(config(tmp_path, [write_folder(tmp_path / "f", x, y)]))
    assert [r.name for r in result.per_class] == ["cat", "dog"]
    assert all(r.ap > 0.9 for r in result.per_class) and result.mean_class_recall > 0.9
