"""`vgg-ray probe`: the linear probe of the paper's Appendix B, over features that
`vgg-ray features` extracted.

The protocol (Simonyan & Zisserman, Appendix B): the nets stay fixed; each image is a 4096-d
penultimate-layer descriptor (stacked or averaged over scales), L2-normalised, and a linear SVM
is trained on the target data set. Its regularisation C is chosen on a validation part (20%) of
the training set, then the SVM is refit on the whole training set. Caltech-101/256 report the
mean class recall over 3 random splits of 30 (or 60) training images per class; VOC reports mAP.
This module reports all three measures (and accuracy) for whatever split is asked.

```
features folder(s) --_features.json + Parquet shards--> X (n, dim), class names
    --same fingerprint? drop unlabelled--> splits (seeded): train | test
    per split: train --stratified validation_fraction--> fit | validation: choose C
               refit on train with C --> test: accuracy, mean class recall, mAP, per class
    --> mean (std) over splits --> metrics.json, per_class.csv, MLflow run "probe-<nets>"
```
Classes are matched by name, never by the int label: two extractions may index them apart.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from vgg_ray import storage
from vgg_ray.errors import ConfigError, redact, require

# The manifest `vgg-ray features` writes last: its presence marks a finished extraction.
from vgg_ray.features_job import FORMAT as FEATURES_FORMAT
from vgg_ray.features_job import MANIFEST as FEATURES_FILE

CLASSIFIERS = ("svm", "logreg")
MAX_ITER = 10_000  # liblinear / lbfgs iterations; large C on normalised features needs many


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """One linear probe: which features, which split protocol, which classifier."""

    features: tuple[str, ...] = ()
    """Training features folders written by `vgg-ray features` (local or s3://); several are
    concatenated, their classes matched by name."""
    test: tuple[str, ...] = ()
    """Test features folders; () = split the training features (see train_per_class,
    test_fraction)."""
    classifier: str = "svm"
    """svm: a linear SVM (scikit-learn LinearSVC), the paper's; logreg: logistic regression."""
    c_values: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    """Regularisation values C tried on the validation part; the best (ties: the smaller) wins."""
    validation_fraction: float = 0.2
    """Share of the training part held out (per class) to choose C (the paper: 20%)."""
    train_per_class: int = 0
    """Caltech protocol: this many random training images per class, the rest test (paper: 30
    or 60); with --test, the training images kept per class. 0 = all / test_fraction."""
    test_fraction: float = 0.25
    """Without --test and train_per_class: the share of each class held out as test."""
    splits: int = 1
    """Random train/test splits, results averaged (the paper's Caltech: 3)."""
    seed: int = 0
    """Seeds the splits (split i uses (seed, i)) and the classifier."""
    s3_endpoint: str | None = None
    """For features on S3; default AWS_ENDPOINT_URL(_S3) or AWS."""
    tracking_uri: str = ""
    """MLflow; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    experiment: str = "vgg-ray"
    """MLflow experiment of the probe's run."""
    log_to_mlflow: bool = True
    """Log metrics, tables, the features' lineage and the fitted classifier to an MLflow run."""
    output: str = ""
    """Local folder for metrics.json and per_class.csv; "" = <home>/probes/<time>."""

    def validate(self) -> ProbeConfig:
        fixed_test = bool(self.test) and not self.train_per_class
        checks = [
            (bool(self.features),
             "no features given: pass --features (a folder written by `vgg-ray features`)"),
            (self.classifier in CLASSIFIERS,
             f"unknown classifier {self.classifier!r}; choose from {', '.join(CLASSIFIERS)}"),
            (bool(self.c_values), "no C value given to choose from"),
            (all(math.isfinite(c) and c > 0 for c in self.c_values),
             f"C values must be positive numbers, got {self.c_values}"),
            (0 < self.validation_fraction < 1,
             f"validation fraction must be in (0, 1), got {self.validation_fraction}"),
            (self.train_per_class >= 0, "train_per_class must be >= 0"),
            (0 < self.test_fraction < 1,
             f"test fraction must be in (0, 1), got {self.test_fraction}"),
            (self.splits >= 1, f"splits must be >= 1, got {self.splits}"),
            (self.splits == 1 or not fixed_test,
             "--splits > 1 needs random splits: without --test, or with --train-per-class"),
            (not set(self.features) & set(self.test),
             "the same folder is given as training and test features"),
            ("://" not in self.output, f"output must be a local folder, got {self.output}"),
        ]  # fmt: skip
        require(checks)
        return self


@dataclass(frozen=True)
class ClassResult:
    """One class's row of per_class.csv (means over splits)."""

    name: str
    train_images: int  # per split
    test_images: int  # per split
    recall: float  # NaN where the test part has no image of the class
    ap: float  # average precision, one-vs-rest on the classifier's scores; NaN as recall
    recall_std: float = 0.0
    ap_std: float = 0.0


@dataclass(frozen=True)
class SplitResult:
    c: float  # the C chosen on this split's validation part
    validation: dict[float, float]  # C -> mean class recall on the validation part
    train_images: int
    test_images: int
    accuracy: float
    mean_class_recall: float
    mean_ap: float


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # means over splits
    mean_class_recall: float
    mean_ap: float
    chosen_c: tuple[float, ...]  # per split
    per_class: tuple[ClassResult, ...]
    output: str  # the local folder holding metrics.json and per_class.csv
    run_id: str | None = None  # the MLflow run, None when not logged
    accuracy_std: float = 0.0  # sample standard deviation over splits; 0 for one split
    mean_class_recall_std: float = 0.0
    mean_ap_std: float = 0.0
    splits: tuple[SplitResult, ...] = ()


# --- loading features ----------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSet:
    """One features folder: its description (_features.json, also its raw bytes for lineage)
    and its labelled rows."""

    uri: str
    meta: dict[str, Any]
    raw_meta: bytes
    features: np.ndarray  # (n, dim) float32, L2-normalised
    classes: np.ndarray  # (n,) class names (numpy str)
    unlabelled: int  # rows without a class, dropped


def _net_names(meta: dict[str, Any]) -> str:
    """The extraction's nets, e.g. "D+E"; "" when the manifest names none."""
    return "+".join(str(m.get("name", "?")) for m in meta.get("models", []))


def describe(meta: dict[str, Any]) -> str:
    """What a fingerprint stands for, for people: "D+E, 256,384,512 stack"."""
    names = _net_names(meta) or "?"
    scales = ",".join(str(s) for s in meta.get("scales", []))
    return f"{names}, {scales} {meta.get('aggregate', '?')}"


def _shard_path(uri: str, shard: Any) -> str:
    path = shard.get("path", "") if isinstance(shard, dict) else ""
    parts = PurePosixPath(path).parts
    # Shards live inside the folder: a _features.json naming ../ or / is not one we wrote.
    if not path or path.startswith("/") or ".." in parts:
        raise ConfigError(f"{uri}/{FEATURES_FILE}: bad shard path {path!r}")
    return path


def load_features(uri: str, *, s3_endpoint: str | None = None) -> FeatureSet:
    """A features folder (local or s3://), its rows read from the Parquet shards its
    features.json lists; ConfigError for an unfinished or inconsistent folder."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = storage.open_storage(uri, s3_endpoint=s3_endpoint)
    meta_path = storage.join(path, FEATURES_FILE)
    with storage.storage_errors(uri, s3_endpoint):
        found = fs.get_file_info([path, meta_path])
    if found[1].type == pafs.FileType.NotFound:
        if found[0].type == pafs.FileType.NotFound:
            raise ConfigError(f"{uri}: no such features folder")
        raise ConfigError(f"{uri}: no {FEATURES_FILE}, not a finished extraction (was "
                          "`vgg-ray features` interrupted? run it again)")  # fmt: skip
    raw = storage.read_bytes((fs, meta_path), s3_endpoint=s3_endpoint)
    try:
        meta = json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{uri}/{FEATURES_FILE} is not JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
        found_format = meta.get("format") if isinstance(meta, dict) else None
        raise ConfigError(f"{uri}/{FEATURES_FILE}: format {found_format!r}, expected "
                          f"{FEATURES_FORMAT!r} (written by `vgg-ray features`)")  # fmt: skip
    dim = int(meta.get("dim", 0))
    blocks, names = [], []
    for shard in meta.get("shards", []):
        relative = _shard_path(uri, shard)
        shard_uri = f"{uri.rstrip('/')}/{relative}"
        with storage.storage_errors(shard_uri, s3_endpoint):
            table = pq.read_table(storage.join(path, relative), filesystem=fs,
                                  columns=["class", "feature"])  # fmt: skip
        if table.num_rows != int(shard.get("rows", table.num_rows)):
            raise ConfigError(
                f"{shard_uri} has {table.num_rows} rows, {FEATURES_FILE} says "
                f"{shard['rows']}: the folder changed after the extraction"
            )
        column = table.column("feature").combine_chunks()
        if column.null_count or column.type.list_size != dim:
            raise ConfigError(f"{shard_uri}: features are not all {dim}-d as {FEATURES_FILE} "
                              "says")  # fmt: skip
        # flatten() honours a sliced array's offset, unlike .values
        blocks.append(column.flatten().to_numpy().reshape(-1, dim))
        names += table.column("class").to_pylist()
    features = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    if bad := int((~np.isfinite(features).all(axis=1)).sum()):
        raise ConfigError(f"{uri}: {bad} row(s) with non-finite features (NaN or inf): a "
                          "broken extraction")  # fmt: skip
    labelled = np.array([bool(name) for name in names], dtype=bool)
    # Appendix B's normalisation; features arrive normalised, and doing it again costs nothing
    # but guards the probe against an extraction that skipped it (zero rows stay zero).
    features = features[labelled].astype(np.float32, copy=False)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features = features / np.maximum(norms, 1e-12)
    classes = np.array([n for n, keep in zip(names, labelled, strict=True) if keep], dtype=str)
    return FeatureSet(uri, meta, raw, features, classes, int((~labelled).sum()))


def check_same_extraction(sets: list[FeatureSet]) -> None:
    """ConfigError unless every folder holds features of the same nets, scales, aggregation."""
    first = sets[0]
    for other in sets[1:]:
        if other.meta.get("fingerprint") != first.meta.get("fingerprint"):
            a, b = describe(first.meta), describe(other.meta)
            if a == b:  # same names, other weights: the fingerprints tell them apart
                a += f"; fingerprint {str(first.meta.get('fingerprint'))[:12]}"
                b += f"; fingerprint {str(other.meta.get('fingerprint'))[:12]}"
            raise ConfigError(f"features of two different models/scales mixed: {first.uri} "
                              f"({a}) vs {other.uri} ({b})")  # fmt: skip


# --- splits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Row indices of one train/test split and its validation part (into the training data)."""

    fit: np.ndarray  # training rows C is fit on
    validation: np.ndarray  # training rows C is chosen on
    test: np.ndarray  # rows of the test data (a split of the training data, or --test)

    @property
    def train(self) -> np.ndarray:
        return np.concatenate([self.fit, self.validation])


def _held_out(count: int, fraction: float, leave: int) -> int:
    """Of `count` images of a class, how many a `fraction` holds out: at least 1, and at least
    `leave` left over (the caller checks count >= leave + 1)."""
    return min(max(round(count * fraction), 1), count - leave)


def stratified(labels: np.ndarray, rng: np.random.Generator, *, fraction: float = 0.0,
               keep: int = 0, leave: int = 1) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per class, shuffled: (kept, held out) row indices; `keep` images per class kept (the
    rest held out), else a `fraction` of each class held out, `leave` at least kept."""
    kept, held = [], []
    for name in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == name))
        cut = keep if keep else len(rows) - _held_out(len(rows), fraction, leave)
        kept.append(rows[:cut])
        held.append(rows[cut:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _too_few(labels: np.ndarray, need: int) -> tuple[str, int] | None:
    names, counts = np.unique(labels, return_counts=True)
    small = np.flatnonzero(counts < need)
    return (str(names[small[0]]), int(counts[small[0]])) if len(small) else None


def plan_splits(config: ProbeConfig, train_y: np.ndarray, test_y: np.ndarray | None) -> list[Split]:
    """The seeded splits; ConfigError naming a class too small for the protocol asked. Every
    part keeps every class: C is chosen on, and the classifier refit to, all of them."""
    if config.train_per_class:
        # N training images, of which the validation part takes some: N >= 2; without --test,
        # one image at least left for the test part.
        need = config.train_per_class + (0 if test_y is not None else 1)
        if config.train_per_class < 2:
            raise ConfigError("train_per_class must be >= 2: C is chosen on a part of them")
        if small := _too_few(train_y, need):
            rest = "" if test_y is not None else " and at least one left to test"
            raise ConfigError(f"class {small[0]!r} has {small[1]} image(s): --train-per-class "
                              f"{config.train_per_class} needs {need}{rest}")  # fmt: skip
    else:
        need = 2 if test_y is not None else 3  # (test,) fit and validation: one image each
        if small := _too_few(train_y, need):
            parts = "fit and validation" if test_y is not None else "test, fit and validation"
            raise ConfigError(f"class {small[0]!r} has {small[1]} labelled image(s): {parts} "
                              f"parts need at least {need}")  # fmt: skip
    splits = []
    for index in range(config.splits):
        rng = np.random.default_rng([config.seed, index])
        if config.train_per_class:
            train, rest = stratified(train_y, rng, keep=config.train_per_class)
        elif test_y is None:
            # two training images left per class: one to fit, one to validate
            train, rest = stratified(train_y, rng, fraction=config.test_fraction, leave=2)
        else:
            train, rest = np.arange(len(train_y)), np.zeros(0, np.int64)
        fit, validation = stratified(train_y[train], rng, fraction=config.validation_fraction)
        test = rest if test_y is None else np.arange(len(test_y))
        splits.append(Split(train[fit], train[validation], test))
    return splits


# --- classifier and metrics ----------------------------------------------------------------


def make_classifier(kind: str, c: float, seed: int) -> Any:
    """An unfitted scikit-learn linear classifier: the paper's linear SVM (one-vs-rest, squared
    hinge, liblinear), or multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if kind == "svm":
        # dual="auto": the dual problem where images are fewer than dimensions (the usual case
        # for 4096-12288-d features), the primal otherwise.
        return LinearSVC(C=c, dual="auto", max_iter=MAX_ITER, random_state=seed)
    return LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)


def fit(kind: str, c: float, seed: int, x: np.ndarray, y: np.ndarray,
        unconverged: set[float]) -> Any:  # fmt: skip
    """The classifier fit on (x, y); a C whose solver did not converge within MAX_ITER is
    added to `unconverged` (reported once, not as a warning per fit)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = make_classifier(kind, c, seed).fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        unconverged.add(c)
    return model


def class_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """(n, classes) decision scores in `model.classes_` order; with two classes scikit-learn
    returns one column, the second class's score."""
    scores = model.decision_function(x)
    return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


@dataclass(frozen=True)
class Scores:
    accuracy: float
    mean_class_recall: float  # recall averaged over the classes the test part holds
    mean_ap: float  # AP averaged over the same classes
    recall: dict[str, float]  # per class; classes without test images absent
    ap: dict[str, float]
    images: dict[str, int]  # test images per class (0 included)


def score(classes: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
          scores: np.ndarray) -> Scores:  # fmt: skip
    """The test measures: accuracy, mean class recall (Caltech: scikit-learn's balanced
    accuracy, the mean of per-class recalls) and mAP (VOC: one-vs-rest average precision on the
    scores, `scores[:, i]` for `classes[i]`), over the classes present in `y_true`."""
    from sklearn.metrics import accuracy_score, average_precision_score, recall_score

    present = [str(c) for c in classes if (y_true == c).any()]
    recalls = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    ap = {c: float(average_precision_score(y_true == c, scores[:, i]))
          for i, c in enumerate(map(str, classes)) if c in present}  # fmt: skip
    return Scores(
        accuracy=float(accuracy_score(y_true, y_pred)),
        mean_class_recall=float(np.mean(recalls)),
        mean_ap=float(np.mean(list(ap.values()))),
        recall=dict(zip(present, map(float, recalls), strict=True)),
        ap=ap,
        images={str(c): int((y_true == c).sum()) for c in classes},
    )


def choose_c(config: ProbeConfig, x: np.ndarray, y: np.ndarray, split: Split,
             unconverged: set[float]) -> tuple[float, dict[float, float]]:  # fmt: skip
    """The C of `c_values` with the best mean class recall on the validation part, fit on the
    rest; ties go to the smaller C (the stronger regularisation)."""
    from sklearn.metrics import balanced_accuracy_score

    results = {}
    for c in sorted(set(config.c_values)):
        model = fit(config.classifier, c, config.seed, x[split.fit], y[split.fit], unconverged)
        predicted = model.predict(x[split.validation])
        results[c] = float(balanced_accuracy_score(y[split.validation], predicted))
    best = max(results.values())
    # Equal outcomes may differ in the last bit (a mean of per-class recalls): a tie is a tie.
    return min(c for c, v in results.items() if math.isclose(v, best, abs_tol=1e-9)), results


# --- outputs -------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    # the sample standard deviation over splits (0 for one split)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def per_class_rows(classes: np.ndarray, train_counts: dict[str, int],
                   scores: list[Scores]) -> tuple[ClassResult, ...]:  # fmt: skip
    rows = []
    for name in map(str, classes):
        recall, recall_std = _mean_std([s.recall.get(name, math.nan) for s in scores])
        ap, ap_std = _mean_std([s.ap.get(name, math.nan) for s in scores])
        rows.append(ClassResult(name, train_counts[name], scores[0].images[name], recall, ap,
                                recall_std, ap_std))  # fmt: skip
    return tuple(rows)


def per_class_csv(rows: tuple[ClassResult, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", "train_images", "test_images", "recall", "recall_std", "ap",
                     "ap_std"])  # fmt: skip
    for r in rows:
        writer.writerow([r.name, r.train_images, r.test_images, f"{r.recall:.6f}",
                         f"{r.recall_std:.6f}", f"{r.ap:.6f}", f"{r.ap_std:.6f}"])  # fmt: skip
    return out.getvalue()


def _percent(mean: float, std: float, splits: int) -> str:
    return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if splits > 1 else "")


def table_markdown(config: ProbeConfig, result: ProbeResult, nets: str) -> str:
    """The summary line of the probe, as the paper's Table 11 reports one (a markdown table)."""
    n = len(result.splits)
    first = result.splits[0]
    c = ", ".join(f"{v:g}" for v in result.chosen_c)
    return "\n".join([
        "| features | classifier | splits | train | test | C | accuracy | mean class recall "
        "| mAP |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {nets} | {config.classifier} | {n} | {first.train_images} | {first.test_images} "
        f"| {c} | {_percent(result.accuracy, result.accuracy_std, n)} "
        f"| {_percent(result.mean_class_recall, result.mean_class_recall_std, n)} "
        f"| {_percent(result.mean_ap, result.mean_ap_std, n)} |",
    ])  # fmt: skip


def metrics_json(config: ProbeConfig, result: ProbeResult, meta: dict[str, Any],
                 dropped: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    summary: dict[str, Any] = {
        "format": "vgg-ray-probe/1",
        # a tracking URI may carry a password (http://user:secret@host): never in a file
        "config": dataclasses.asdict(config) | {"tracking_uri": redact(config.tracking_uri)},
        "fingerprint": meta.get("fingerprint"),
        "models": meta.get("models", []),
        "scales": meta.get("scales", []),
        "aggregate": meta.get("aggregate"),
        "dim": meta.get("dim"),
        "dropped": dropped,
        "accuracy": result.accuracy,
        "mean_class_recall": result.mean_class_recall,
        "mean_ap": result.mean_ap,
        "chosen_c": list(result.chosen_c),
    }
    if len(result.splits) > 1:
        summary |= {"accuracy_std": result.accuracy_std,
                    "mean_class_recall_std": result.mean_class_recall_std,
                    "mean_ap_std": result.mean_ap_std}  # fmt: skip
    summary["splits"] = [
        {**dataclasses.asdict(s), "validation": {f"{c:g}": v for c, v in s.validation.items()}}
        for s in result.splits
    ]
    return summary


def start_run(config: ProbeConfig, sets: list[FeatureSet],
              tests: list[FeatureSet]) -> tuple[Any, str]:  # fmt: skip
    """(client, run id) of a new run "probe-<nets>" in the experiment, tagged with the
    features' lineage; made before fitting, so a probe that fails leaves a FAILED run."""
    from vgg_ray import tracking

    meta = sets[0].meta
    client = tracking.open_client(config.tracking_uri)
    experiment = tracking.experiment_id(client, config.experiment)
    tags = {"vgg_ray.probe.features": " + ".join(s.uri for s in sets),
            "vgg_ray.features.fingerprint": str(meta.get("fingerprint", ""))}  # fmt: skip
    if tests:
        tags["vgg_ray.probe.test"] = " + ".join(s.uri for s in tests)
    nets = _net_names(meta) or "features"
    return client, client.create_run(experiment, run_name=f"probe-{nets}", tags=tags).info.run_id


def log_results(client: Any, run_id: str, config: ProbeConfig, result: ProbeResult,
                sets: list[FeatureSet], tests: list[FeatureSet], model: Any,
                example: np.ndarray) -> None:  # fmt: skip
    """Params, metrics, metrics.json, per_class.csv, each folder's _features.json and the final
    split's classifier (`probe`), to run `run_id`."""
    from importlib.metadata import version

    import mlflow
    import mlflow.sklearn
    from mlflow.entities import Metric, Param

    from vgg_ray import tracking

    meta, first = sets[0].meta, result.splits[0]
    params = {
        "classifier": config.classifier,
        "c_values": ",".join(f"{c:g}" for c in config.c_values),
        "chosen_c": ",".join(f"{c:g}" for c in result.chosen_c),
        "validation_fraction": config.validation_fraction,
        "train_per_class": config.train_per_class,
        "test_fraction": "" if config.test or config.train_per_class else config.test_fraction,
        "splits": config.splits,
        "seed": config.seed,
        "train_images": first.train_images,
        "test_images": first.test_images,
        "classes": len(result.per_class),
        "feature_dim": meta.get("dim"),
        "scales": ",".join(str(s) for s in meta.get("scales", [])),
        "aggregate": meta.get("aggregate"),
        "model_sources": " + ".join(str(m.get("source", "")) for m in meta.get("models", [])),
    }
    now = int(datetime.now().timestamp() * 1000)
    values = {"accuracy": result.accuracy, "mean_class_recall": result.mean_class_recall,
              "mean_ap": result.mean_ap}  # fmt: skip
    if len(result.splits) > 1:
        values |= {"accuracy_std": result.accuracy_std,
                   "mean_class_recall_std": result.mean_class_recall_std,
                   "mean_ap_std": result.mean_ap_std}  # fmt: skip
    metrics = [Metric(k, v, now, 0) for k, v in values.items()]
    for step, s in enumerate(result.splits):  # each split's C and score, step = split index
        metrics += [Metric("split_chosen_c", s.c, now, step),
                    Metric("split_mean_class_recall", s.mean_class_recall, now, step)]  # fmt: skip
    client.log_batch(
        run_id,
        metrics=metrics,
        # MLflow caps a param value at 6000 characters (a long list of model sources)
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        synchronous=True,
    )
    output = Path(result.output)
    client.log_artifact(run_id, str(output / "metrics.json"))
    client.log_artifact(run_id, str(output / "per_class.csv"))
    with tempfile.TemporaryDirectory() as directory:
        # Lineage: which extraction (nets, scales, source images) each part came from.
        for part, group in (("train", sets), ("test", tests)):
            for index, feature_set in enumerate(group):
                local = Path(directory) / f"{part}-{index}" / FEATURES_FILE
                local.parent.mkdir()
                local.write_bytes(feature_set.raw_meta)
                client.log_artifact(run_id, str(local), f"features/{local.parent.name}")
    # The fluent log_model logs to the active run of MLflow's process-wide store: both pinned
    # here. skops is MLflow's safe default format; the requirements are named because
    # inferring them reloads the model in a subprocess.
    tracking.use_store(config.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.sklearn.log_model(
            model,
            name="probe",
            input_example=example,
            pip_requirements=[f"{p}=={version(p)}" for p in ("scikit-learn", "skops")],
            metadata={
                "classes": [str(c) for c in model.classes_],
                "fingerprint": meta.get("fingerprint"),
            },
        )


# --- the job -------------------------------------------------------------------------------


def resolve(config: ProbeConfig) -> ProbeConfig:
    """Fill the embedded defaults: tracking URI, output folder; local folders made absolute
    (what MLflow records as lineage)."""
    from vgg_ray.config import default_home
    from vgg_ray.tracking import resolve_uri

    output = config.output or str(default_home() / "probes" / f"{datetime.now():%Y%m%d-%H%M%S}")
    return dataclasses.replace(
        config,
        features=tuple(storage.absolute(f) for f in config.features),
        test=tuple(storage.absolute(f) for f in config.test),
        tracking_uri=resolve_uri(config.tracking_uri),
        output=output,
    )


def _say(text: str) -> None:
    print(f"vgg-ray probe: {text}", flush=True)


@dataclass(frozen=True)
class ProbeData:
    """The labelled features a probe runs on, checked; test_* None: split the training ones."""

    sets: list[FeatureSet]
    tests: list[FeatureSet]
    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    dropped: dict[str, int]  # unlabelled rows (train, test) and test rows of unseen classes


def load_data(config: ProbeConfig) -> ProbeData:
    """Every folder loaded and checked to be one extraction; unlabelled rows and test rows of
    classes training lacks dropped (and said); ConfigError where nothing usable is left."""
    sets = [load_features(u, s3_endpoint=config.s3_endpoint) for u in config.features]
    tests = [load_features(u, s3_endpoint=config.s3_endpoint) for u in config.test]
    check_same_extraction(sets + tests)
    x = np.concatenate([s.features for s in sets])
    y = np.concatenate([s.classes for s in sets])
    dropped = {"unlabelled_train": sum(s.unlabelled for s in sets),
               "unlabelled_test": sum(s.unlabelled for s in tests), "unseen_test": 0}  # fmt: skip
    total = len(y) + dropped["unlabelled_train"]
    unlabelled = dropped["unlabelled_train"]
    _say(f"{len(sets)} training folder(s), {total} images"
         + (f" ({unlabelled} without a class, dropped)" if unlabelled else "")
         + f", {len(np.unique(y))} classes, {x.shape[1]}-d features of "
         f"{describe(sets[0].meta)}")  # fmt: skip
    if not len(y):
        raise ConfigError(f"no labelled image in {' + '.join(config.features)} ({total} without "
                          "a class): the probe needs class names")  # fmt: skip
    if len(np.unique(y)) < 2:
        raise ConfigError(f"only one class ({str(y[0])!r}) in the training features: a "
                          "classifier needs at least 2")  # fmt: skip
    if not tests:
        return ProbeData(sets, tests, x, y, None, None, dropped)
    test_x = np.concatenate([s.features for s in tests])
    test_y = np.concatenate([s.classes for s in tests])
    seen = np.isin(test_y, y)
    dropped["unseen_test"] = int((~seen).sum())
    if not seen.any():
        raise ConfigError(f"no labelled test image is of a class seen in training "
                          f"({len(test_y)} labelled, {dropped['unlabelled_test']} without a "
                          "class)")  # fmt: skip
    notes = [f"{n} {what}, dropped" for n, what in (
        (dropped["unlabelled_test"], "without a class"),
        (dropped["unseen_test"], "of classes unseen in training")) if n]  # fmt: skip
    _say(
        f"{len(tests)} test folder(s), {int(seen.sum())} images used"
        + (f" ({'; '.join(notes)})" if notes else "")
    )
    return ProbeData(sets, tests, x, y, test_x[seen], test_y[seen], dropped)


def run_splits(config: ProbeConfig, data: ProbeData,
               splits: list[Split]) -> tuple[list[SplitResult], list[Scores], Any]:  # fmt: skip
    """Per split: choose C, refit, measure. Returns (split results, their scores, the last
    split's classifier)."""
    results, scores, unconverged, model = [], [], set(), None
    x, y = data.x, data.y
    tx, ty = (x, y) if data.test_x is None else (data.test_x, data.test_y)
    for index, split in enumerate(splits):
        where = f"split {index + 1}/{len(splits)}"
        c, validation = choose_c(config, x, y, split, unconverged)
        tried = ", ".join(f"C={k:g}: {100 * v:.1f}%" for k, v in validation.items())
        _say(f"{where}: {len(split.train)} train ({len(split.fit)} fit + "
             f"{len(split.validation)} validation), {len(split.test)} test; validation mean "
             f"class recall {tried} -> C={c:g}")  # fmt: skip
        model = fit(config.classifier, c, config.seed, x[split.train], y[split.train], unconverged)
        test = tx[split.test]
        measured = score(model.classes_, ty[split.test], model.predict(test),
                         class_scores(model, test))  # fmt: skip
        scores.append(measured)
        results.append(SplitResult(c, validation, len(split.train), len(split.test),
                                   measured.accuracy, measured.mean_class_recall,
                                   measured.mean_ap))  # fmt: skip
        _say(
            f"{where}: accuracy {100 * measured.accuracy:.1f}%, mean class recall "
            f"{100 * measured.mean_class_recall:.1f}%, mAP {100 * measured.mean_ap:.1f}%"
        )
    if unconverged:
        _say(f"the solver did not converge within {MAX_ITER} iterations for C = "
             f"{', '.join(f'{c:g}' for c in sorted(unconverged))}")  # fmt: skip
    return results, scores, model


def summarize(results: list[SplitResult], scores: list[Scores], classes: np.ndarray,
              train_counts: dict[str, int], output: str) -> ProbeResult:  # fmt: skip
    accuracy = _mean_std([r.accuracy for r in results])
    recall = _mean_std([r.mean_class_recall for r in results])
    ap = _mean_std([r.mean_ap for r in results])
    return ProbeResult(
        accuracy=accuracy[0], accuracy_std=accuracy[1],
        mean_class_recall=recall[0], mean_class_recall_std=recall[1],
        mean_ap=ap[0], mean_ap_std=ap[1],
        chosen_c=tuple(r.c for r in results),
        per_class=per_class_rows(classes, train_counts, scores),
        output=output, splits=tuple(results),
    )  # fmt: skip


def probe(config: ProbeConfig) -> ProbeResult:
    """The whole probe: load and check the features, choose C and fit per split, measure on
    the test part, write and log the results. The function `vgg-ray probe` calls."""
    from vgg_ray import tracking

    config = resolve(config).validate()
    if config.log_to_mlflow:  # within seconds, not after the fits
        tracking.check_reachable(config.tracking_uri)
    data = load_data(config)
    splits = plan_splits(config, data.y, data.test_y)  # every input error before any run
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    client, run_id = start_run(config, data.sets, data.tests) if config.log_to_mlflow else (
        None, None)  # fmt: skip
    try:
        results, scores, model = run_splits(config, data, splits)
        train = data.y[splits[0].train]
        counts = {str(c): int((train == c).sum()) for c in model.classes_}
        result = summarize(results, scores, model.classes_, counts, str(output))
        (output / "per_class.csv").write_text(per_class_csv(result.per_class))
        summary = metrics_json(config, result, data.sets[0].meta, data.dropped)
        (output / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        if run_id:
            example = data.x[splits[-1].train[:1]]
            log_results(client, run_id, config, result, data.sets, data.tests, model, example)
            result = dataclasses.replace(result, run_id=run_id)
    except BaseException:
        if run_id:
            client.set_terminated(run_id, "FAILED")
        raise
    if run_id:
        client.set_terminated(run_id, "FINISHED")
    print(table_markdown(config, result, describe(data.sets[0].meta)), flush=True)
    _say(f"metrics.json and per_class.csv in {output}"
         + (f"; logged to MLflow run {run_id} (experiment {config.experiment})" if run_id
            else ""))  # fmt: skip
    return result
