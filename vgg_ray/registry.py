"""The model registry: trained nets and the D+E fusion ensemble (Table 6) as registered models,
and promotion as a decision backed by an evaluation.

```
training run (runs:/<id>/model, best_checkpoint) --register_runs--> vgg-D vN @challenger
members (nets, runs, checkpoints) --register_ensemble--> pyfunc --> vgg-DE vN @challenger
promote(vgg-DE): evaluate @challenger and @champion with one protocol on one held-out split
    --> better by top-5 error (margin)? move @champion, evidence as version tags : refuse
rollback(vgg-DE): @champion back to the version it replaced
```
Aliases (`champion`, `challenger`) replace MLflow's deprecated stages. A version gets
`champion` only through `promote` (which always evaluates) or `rollback` (back to a version
that was promoted that way). Works against an `mlflow server` (database store, proxied S3
artifacts) and against the embedded SQLite default; the registry needs a database store either
way (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgg_ray.errors import ConfigError
from vgg_ray.evaluate import MODES, NetInfo, protocols
from vgg_ray.tracking import (
    configure_uploads,
    get_run,
    model_requirements,
    model_version,
    open_client,
    resolve_uri,
    source_run_id,
    use_store,
    version_by_alias,
)
from vgg_ray.tracking import experiment_id as named_experiment

CHAMPION = "champion"
CHALLENGER = "challenger"
KIND = "vgg_ray.kind"  # version tag: "net", "ensemble" or "localiser"
HISTORY = "champion_history"  # registered-model tag: earlier champions, oldest first ("1,3")
PREVIOUS = "previous_champion"  # registered-model tag: the last of HISTORY, for people
ENSEMBLE_CODE = Path(__file__).with_name("ensemble_model.py")
LOCALISER_CODE = Path(__file__).with_name("localiser_model.py")
# Run metrics copied onto a net's version as `metric.<name>` tags.
METRIC_PREFIXES = ("eval_", "val_", "best_val_")
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_model_name(name: str) -> str:
    """A registered-model name MLflow's URIs (`models:/<name>/<version>`) and our quoted search
    filters can hold, or ConfigError; "" (the default name) passes."""
    if name and not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"registered model name {name!r} may hold only letters, digits, '-', "
                          "'_' and '.', and must not start with '.'")  # fmt: skip
    return name


# --- configs and results ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RegisterConfig:
    """Register trained nets from their MLflow runs (`vgg-ray register`)."""

    runs: tuple[str, ...] = ()
    """Training runs: run ids or `runs:/<id>`; each registers its logged `model`."""
    name: str = ""
    """Registered model name; "" = `vgg-<arch>` per run (vgg-D, vgg-E)."""
    alias: str = CHALLENGER
    """Alias the new version gets; `champion` only ever comes from `promote`."""
    tracking_uri: str = ""
    """MLflow; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    s3_endpoint: str | None = None
    """For a manifest on S3 (its hash is a version tag)."""
    classifier: str = ""
    """For a localisation run (Appendix A): the classification net (`models:/vgg-D@champion`,
    a run or a checkpoint) whose top-5 classes and scores rate its boxes; the version is then a
    pyfunc returning the top-5 (class, score, box) per image, as `vgg-localise-<arch>`."""
    scales: tuple[int, ...] = ()
    """A localisation model's default test scales Q (a predict param); () = the net's S."""


@dataclass(frozen=True, kw_only=True)
class EnsembleConfig:
    """Build and register an ensemble of nets as one pyfunc (`vgg-ray register-ensemble`)."""

    members: tuple[str, ...] = ()
    """Each a registered net (`models:/vgg-D@champion`, `models:/vgg-D/3`), a training run
    (`runs:/<id>`, run id: its `best_checkpoint`) or a vgg-ray checkpoint (folder, s3://)."""
    name: str = ""
    """Registered model name; "" = `vgg-` + the members' archs (vgg-DE)."""
    mode: str = "single"
    """Default predict mode (single, dense, multicrop, dense+multicrop); a predict param."""
    scales: tuple[int, ...] = ()
    """Default test scales Q for every member; () = the paper's per net. A predict param."""
    alias: str = CHALLENGER
    """Alias the new version gets; `champion` only ever comes from `promote`."""
    experiment: str = "vgg-ray"
    """For the ensemble's run, when no member has a run."""
    tracking_uri: str = ""
    """MLflow; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    s3_endpoint: str | None = None
    """For members whose checkpoints or data are on S3."""


@dataclass(frozen=True, kw_only=True)
class PromoteConfig:
    """Evaluate `challenger` against `champion` and move `champion` if it is better
    (`vgg-ray promote`). Both are evaluated by `vgg_ray.evaluate_job.evaluate` with the same
    data, split, mode and scales."""

    name: str
    """Registered model, e.g. vgg-DE."""
    manifest: str = ""
    """Held-out data: the shards' manifest; "" = the one the challenger was trained on."""
    split: str = "val"
    """The manifest's split both are evaluated on."""
    mode: str = "dense"
    """Evaluation mode of both (Table 6 reports D+E dense and dense+multicrop)."""
    scales: tuple[int, ...] = ()
    """Test scales Q for every net; () = the paper's defaults per net (vgg_ray.evaluate)."""
    margin: float = 0.0
    """The challenger's top-5 error must be below the champion's by more than this (a
    fraction: 0.001 = 0.1 points); top-1 error where the two top-5 errors are equal."""
    max_images: int = 0
    """Only the split's first N images (0: all); the same images for both."""
    actors: int = 0
    """Evaluation actors; 0 = one per GPU of the cluster, else one per 2 CPUs."""
    gpus_per_actor: float | None = None
    """None: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each evaluation actor holds."""
    batch_size: int = 32
    """Images per Ray batch handed to an actor."""
    log_evaluations: bool = True
    """Log both evaluations' tables to MLflow, as `vgg-ray evaluate` does."""
    tracking_uri: str = ""
    """MLflow; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    s3_endpoint: str | None = None
    """For data or checkpoints on S3; default AWS_ENDPOINT_URL(_S3) or AWS."""


@dataclass(frozen=True)
class Registered:
    name: str
    version: str  # str on every store (the SQLite store's client returns int)
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Decision:
    """What `promote` decided and why; `tags` is the evidence written to the version."""

    name: str
    promoted: bool
    challenger: str  # version, as str on every store (the SQLite store's client returns int)
    champion: str | None  # version before the decision, None if there was none
    challenger_top5_error: float
    champion_top5_error: float | None
    tags: dict[str, str]

    def summary(self) -> str:
        if self.tags.get("promotion.decided_by") == "top1_error":
            c, d = (self.tags[f"promotion.{who}_top1_error"] for who in ("challenger", "champion"))
            verdict = "promoted" if self.promoted else "refused"
            return (f"{verdict}: {self.name} version {self.challenger} vs {CHAMPION} version "
                    f"{self.champion}: equal top-5 errors, so top-1 error decided: "
                    f"{100 * float(c):.2f}% vs {100 * float(d):.2f}% (margin "
                    f"{100 * float(self.tags['promotion.margin']):.2f} points)")  # fmt: skip
        c = f"{100 * self.challenger_top5_error:.2f}%"
        if self.champion is None:
            return (f"promoted {self.name} version {self.challenger} to {CHAMPION} (none before): "
                    f"top-5 error {c}")  # fmt: skip
        d = f"{100 * self.champion_top5_error:.2f}%"
        margin = f"{100 * float(self.tags['promotion.margin']):.2f} points"
        if self.promoted:
            return (f"promoted {self.name} version {self.challenger} to {CHAMPION}: top-5 error "
                    f"{c} vs {d} of version {self.champion} (margin {margin})")  # fmt: skip
        return (f"refused: {self.name} version {self.challenger} top-5 error {c} is not below "
                f"{CHAMPION} version {self.champion}'s {d} by more than {margin}; "
                f"{CHAMPION} stays on version {self.champion}")  # fmt: skip


# --- MLflow plumbing -------------------------------------------------------------------------


def _client(tracking_uri: str):
    """A client for `tracking_uri` ("" = the embedded default), also set for the fluent API
    (`log_model` and `register_model` use it)."""
    uri = resolve_uri(tracking_uri)
    if uri.startswith(("file:", "/", ".")):
        raise ConfigError(f"the model registry needs a database store, not {uri}: use "
                          "sqlite:///path/mlflow.db or an mlflow server")  # fmt: skip
    client = open_client(uri)
    use_store(uri)
    return client


def manifest_sha256(uri: str, *, s3_endpoint: str | None = None) -> str:
    """sha256 of manifest.json's bytes: names the exact data (shards, classes, statistics)."""
    from vgg_ray.manifest import manifest_file_uri
    from vgg_ray.storage import read_bytes

    return hashlib.sha256(read_bytes(manifest_file_uri(uri), s3_endpoint=s3_endpoint)).hexdigest()


def _try_manifest_sha256(uri: str, s3_endpoint: str | None) -> str:
    """Registration records the hash where the data is reachable, "unavailable" elsewhere:
    registering a net does not need its data (promotion does, and checks it)."""
    if not uri:
        return "unavailable"
    try:
        return manifest_sha256(uri, s3_endpoint=s3_endpoint)
    except (ConfigError, OSError):
        return "unavailable"


def _scale_label(text: str) -> str:
    """ "(256, 512)" (a run param) -> "256-512"; "(256, 256)" -> "256"."""
    numbers = re.findall(r"\d+", text)
    return "" if not numbers else numbers[0] if len(set(numbers)) == 1 else "-".join(numbers)


# --- registering nets ------------------------------------------------------------------------


def register_runs(config: RegisterConfig) -> list[Registered]:
    """Register each training run's logged `model` as a new version of `vgg-<arch>`, tagged with
    the run, its data (manifest and hash), training scale and evaluation metrics."""
    import mlflow
    import mlflow.models

    check_model_name(config.name)
    if not config.runs:
        raise ConfigError("no run given: pass --run <run id> (repeatable)")
    client = _client(config.tracking_uri)
    configure_uploads()
    registered = []
    for source in config.runs:
        run_id = source_run_id(source)
        if run_id is None:
            raise ConfigError(f"{source!r} is not a run id or runs:/<id> URI")
        run = get_run(client, run_id)
        params, metrics = run.data.params, run.data.metrics
        arch = params.get("arch") or run.data.tags.get("arch")
        if not arch:
            raise ConfigError(f"run {run_id} is not a vgg-ray training run (no arch param)")
        if params.get("regression"):  # a localisation net: registered with its classifier
            registered.append(register_localiser(client, config, run))
            continue
        model_uri = f"runs:/{run_id}/model"
        try:
            mlflow.models.get_model_info(model_uri)
        except Exception:
            raise ConfigError(f"run {run_id} has no logged model 'model' (did its training "
                              "finish?)") from None  # fmt: skip
        manifest = params.get("data.manifest", "")
        tags = {
            KIND: "net",
            "run_id": run_id,
            "arch": arch,
            "width": params.get("width", ""),
            "crop": params.get("data.crop", ""),
            "train_scale": _scale_label(params.get("data.scale", "")),
            "data_manifest": manifest,
            "manifest_sha256": _try_manifest_sha256(manifest, config.s3_endpoint),
            "best_checkpoint": run.data.tags.get("best_checkpoint", ""),
            **{f"metric.{k}": f"{v:.6g}" for k, v in sorted(metrics.items())
               if k.startswith(METRIC_PREFIXES)},
        }  # fmt: skip
        name = config.name or f"vgg-{arch}"
        version = mlflow.register_model(model_uri, name, tags=tags)
        client.set_registered_model_alias(name, config.alias, version.version)
        print(f"vgg-ray register: {name} version {version.version} (@{config.alias}) from run "
              f"{run_id}", flush=True)  # fmt: skip
        registered.append(Registered(name, str(version.version), run_id, tags))
    return registered


# --- the ensemble ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An ensemble member resolved to its checkpoint: weights, NetInfo, provenance."""

    source: str
    run_id: str | None
    checkpoint: str
    state: dict[str, Any] = field(repr=False)
    info: NetInfo


def resolve_member(client, source: str, *, s3_endpoint: str | None = None) -> Member:
    """A net's training checkpoint, from a registered net, a run or the checkpoint itself. The
    checkpoint, not the logged pickled model, carries what the protocol needs (crop, training
    scale, normalisation, mean RGB, classes) and loads with weights_only=True."""
    from vgg_ray.checkpoint import load_trained
    from vgg_ray.evaluate_job import info_from_state

    run_id, checkpoint = None, source
    if source.startswith("models:/"):
        version = model_version(client, source)
        if version.tags.get(KIND) == "ensemble":
            raise ConfigError(f"{source} is an ensemble; members must be single nets")
        run_id = version.run_id
    else:
        run_id = source_run_id(source)
    if run_id:
        checkpoint = get_run(client, run_id).data.tags.get("best_checkpoint", "")
        if not checkpoint:
            raise ConfigError(f"{source}: run {run_id} has no best_checkpoint tag; an ensemble "
                              "member needs the net's vgg-ray checkpoint")  # fmt: skip
    _, state = load_trained(checkpoint, s3_endpoint=s3_endpoint)
    if "arch" not in state or "classes" not in state:
        raise ConfigError(f"{source}: {checkpoint} is not a vgg-ray checkpoint (no arch, classes)")
    info = info_from_state(state, source, run_id)
    if info.stats is None:  # as the evaluation job does: the data set's mean RGB
        from vgg_ray.manifest import load_manifest

        if not info.manifest:
            raise ConfigError(f"{source}: no mean RGB in its checkpoint and no manifest to take "
                              "it from")  # fmt: skip
        stats = load_manifest(info.manifest, s3_endpoint=s3_endpoint).stats
        info = dataclasses.replace(info, stats=stats)
    return Member(source, run_id, checkpoint, state, info)


def check_members(members: list[Member], mode: str, scales: tuple[int, ...]) -> None:
    """ConfigError unless the members can be one ensemble: the same classes in the same order
    (soft-max is averaged class by class), and every member able to take the images of the
    default protocol (each test scale at least its crop; dense needs crops divisible by 32)."""
    if not members:
        raise ConfigError("an ensemble needs at least one member (--member, repeatable)")
    first = members[0]
    for member in members[1:]:
        a, b = list(first.state["classes"]), list(member.state["classes"])
        if len(a) != len(b):
            raise ConfigError(f"members {first.source} and {member.source} have different class "
                              f"lists ({len(a)} vs {len(b)} classes): an ensemble averages "
                              "their soft-max class by class")  # fmt: skip
        if a != b:
            index = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            raise ConfigError(f"members {first.source} and {member.source} have different class "
                              f"lists (index {index}: {a[index]} vs {b[index]})")  # fmt: skip
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    protocols([m.info for m in members], (mode,), [scales] if scales else (), members=False)


def _json(value: Any) -> Any:
    """Tuples and dataclasses as plain JSON (the MLmodel file is YAML: no tuples)."""
    return json.loads(json.dumps(value))


def _signature(mode: str, scales: tuple[int, ...]):
    """Params only: inputs are images of any size, which no tensor schema describes; the
    model checks them itself (`ensemble_model.as_images`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(params=ParamSchema([
        ParamSpec("mode", "string", mode),
        ParamSpec("scales", "long", list(scales), shape=(-1,)),
        ParamSpec("output", "string", "probs"),
    ]))  # fmt: skip


def ensemble_name(members: list[Member]) -> str:
    archs = [m.info.name for m in members]
    return "vgg-" + ("".join(archs) if all(len(a) == 1 for a in archs) else "-".join(archs))


def register_ensemble(config: EnsembleConfig) -> Registered:
    """Log the members as one pyfunc (weights as artifacts, ensemble_model.py as the code) in a
    new run, and register it as a new version with `config.alias`."""
    import mlflow
    import mlflow.pyfunc

    from vgg_ray.checkpoint import net_state, save_state

    check_model_name(config.name)
    client = _client(config.tracking_uri)
    configure_uploads()
    members = [resolve_member(client, s, s3_endpoint=config.s3_endpoint) for s in config.members]
    check_members(members, config.mode, config.scales)
    name = config.name or ensemble_name(members)
    label = "+".join(m.info.name for m in members)
    classes = list(members[0].state["classes"])
    first_run = next((m.run_id for m in members if m.run_id), None)
    if first_run:
        experiment_id = get_run(client, first_run).info.experiment_id
    else:  # on a local sqlite store, its artifacts beside the database (not ./mlruns)
        experiment_id = named_experiment(client, config.experiment)
    manifest = members[0].info.manifest
    tags = {
        KIND: "ensemble",
        "members": " + ".join(m.source for m in members),
        "member_run_ids": ",".join(m.run_id or "" for m in members),
        "data_manifest": manifest,
        "manifest_sha256": _try_manifest_sha256(manifest, config.s3_endpoint),
        "mode": config.mode,
        "scales": ",".join(map(str, config.scales)) or "paper defaults per net",
    }
    for i, m in enumerate(members):
        tags.update({
            f"member.{i}.source": m.source, f"member.{i}.run_id": m.run_id or "",
            f"member.{i}.checkpoint": m.checkpoint, f"member.{i}.arch": m.info.name,
            f"member.{i}.train_scale": m.info.train_scale_label.strip("[]").replace(";", "-"),
            f"member.{i}.crop": str(m.info.crop),
        })  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"ensemble-{label}", tags=tags)
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as directory:
            artifacts, member_config = {}, []
            for i, m in enumerate(members):
                folder = Path(directory) / f"member_{i}"
                folder.mkdir()
                save_state(folder, net_state(m.state))
                artifacts[f"member_{i}"] = str(folder)
                # Classes stay in the state files: MLflow logs the model config as run params,
                # and 1000 WordNet ids would not fit in one.
                info = dataclasses.replace(m.info, classes=())
                member_config.append({"artifact": f"member_{i}",
                                      "info": _json(dataclasses.asdict(info))})  # fmt: skip
            model_config = {"mode": config.mode, "scales": list(config.scales),
                            "members": member_config}  # fmt: skip
            # start_run refuses a run outside the caller's active experiment (set_experiment).
            mlflow.set_experiment(experiment_id=experiment_id)
            with mlflow.start_run(run_id=run_id, log_system_metrics=False):
                logged = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(ENSEMBLE_CODE),
                    artifacts=artifacts,
                    model_config=model_config,
                    signature=_signature(config.mode, config.scales),
                    pip_requirements=model_requirements("numpy", "mlflow"),
                    metadata={"classes": classes, "arch": label, "kind": "ensemble"},
                )
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    version = mlflow.register_model(logged.model_uri, name, tags={**tags, "run_id": run_id})
    client.set_registered_model_alias(name, config.alias, version.version)
    print(f"vgg-ray register-ensemble: {name} version {version.version} (@{config.alias}): "
          f"{label} from run {run_id}", flush=True)  # fmt: skip
    return Registered(name, str(version.version), run_id, tags)


def register_localiser(client, config: RegisterConfig, run) -> Registered:
    """A localisation run's best checkpoint and `config.classifier` as one pyfunc
    (`localiser_model.py`: protocol 2's top-5 class, score and box per image), logged into the
    run as `localiser` and registered as a new version of `vgg-localise-<arch>`."""
    import mlflow
    import mlflow.pyfunc

    from vgg_ray.checkpoint import net_state, save_state

    run_id = run.info.run_id
    if not config.classifier:
        raise ConfigError(f"run {run_id} trained a localisation net: its model rates boxes by "
                          "a classifier's scores; pass --classifier (e.g. "
                          "models:/vgg-D@champion)")  # fmt: skip
    net = resolve_member(client, run_id, s3_endpoint=config.s3_endpoint)
    classifier = resolve_member(client, config.classifier, s3_endpoint=config.s3_endpoint)
    if classifier.info.regression:
        raise ConfigError(f"--classifier {config.classifier} is a localisation net, not a "
                          "classifier")  # fmt: skip
    if list(classifier.state["classes"]) != list(net.state["classes"]):
        raise ConfigError(f"--classifier {config.classifier} was trained on other classes than "
                          f"run {run_id}")  # fmt: skip
    if classifier.info.crop != net.info.crop or net.info.crop % 32:
        raise ConfigError(f"the classifier's crop ({classifier.info.crop}) must be the "
                          f"localisation net's ({net.info.crop}), a multiple of 32: both run "
                          "densely over the image")  # fmt: skip
    name = config.name or f"vgg-localise-{net.info.name}"
    check_model_name(name)
    tags = {
        KIND: "localiser", "run_id": run_id, "arch": net.info.name,
        "regression": net.info.regression, "finetune": net.info.finetune,
        "train_scale": net.info.train_scale_label.strip("[]").replace(";", "-"),
        "classifier": config.classifier, "classifier_checkpoint": classifier.checkpoint,
        "best_checkpoint": net.checkpoint, "data_manifest": net.info.manifest,
        "scales": ",".join(map(str, config.scales)) or "the net's S",
        **{f"metric.{k}": f"{v:.6g}" for k, v in sorted(run.data.metrics.items())
           if k.startswith(METRIC_PREFIXES)},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        artifacts, entries = {}, []
        for key, member in (("member_0", net), ("classifier", classifier)):
            folder = Path(directory) / key
            folder.mkdir()
            save_state(folder, net_state(member.state))
            artifacts[key] = str(folder)
            info = dataclasses.replace(member.info, classes=())  # in the state files
            entries.append({"artifact": key, "info": _json(dataclasses.asdict(info))})
        model_config = {"scales": list(config.scales), "members": entries[:1],
                        "classifier": entries[1]}  # fmt: skip
        from mlflow.models import ModelSignature
        from mlflow.types.schema import ParamSchema, ParamSpec

        signature = ModelSignature(params=ParamSchema(
            [ParamSpec("scales", "long", list(config.scales), shape=(-1,))]
        ))  # fmt: skip
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            logged = mlflow.pyfunc.log_model(
                name="localiser", python_model=str(LOCALISER_CODE), artifacts=artifacts,
                model_config=model_config, signature=signature,
                pip_requirements=model_requirements("numpy", "mlflow", "pandas"),
                metadata={"classes": list(net.state["classes"]), "arch": net.info.name,
                          "kind": "localiser"},
            )  # fmt: skip
    version = mlflow.register_model(logged.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, config.alias, version.version)
    print(f"vgg-ray register: {name} version {version.version} (@{config.alias}) from "
          f"localisation run {run_id} with classifier {config.classifier}", flush=True)  # fmt: skip
    return Registered(name, str(version.version), run_id, tags)


# --- promotion and rollback ------------------------------------------------------------------


def evaluation_sources(client, name: str, version, directory: Path) -> list[str]:
    """What `vgg_ray.evaluate_job` evaluates for a version: the registered net itself, or an
    ensemble's member state files as stored in the version (downloaded into `directory`)."""
    if version.tags.get(KIND) != "ensemble":
        return [f"models:/{name}/{version.version}"]
    import mlflow.artifacts
    from mlflow.models import Model

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version.version}", dst_path=str(directory)
    )
    flavor = Model.load(local).flavors["python_function"]
    saved = flavor["artifacts"]
    # The MLmodel file keeps `model_config` under "config".
    return [str(Path(local) / saved[m["artifact"]]["path"])
            for m in flavor["config"]["members"]]  # fmt: skip


def _evaluate_version(config: PromoteConfig, client, version, manifest: str, directory: Path,
                      tables: Path):  # fmt: skip
    """(the protocol's ResultRow, MLflow run ids the evaluation logged to, its artifact folder
    there) for one version; the tables also in `tables`, an ensemble's weights in `directory`."""
    from vgg_ray.evaluate_job import EvaluateConfig, evaluate

    directory.mkdir(parents=True, exist_ok=True)
    sources = evaluation_sources(client, config.name, version, directory / "model")
    result = evaluate(EvaluateConfig(
        models=tuple(sources), manifest=manifest, split=config.split,
        s3_endpoint=config.s3_endpoint, modes=(config.mode,),
        scales=(config.scales,) if config.scales else (), members=False,
        max_images=config.max_images, actors=config.actors,
        gpus_per_actor=config.gpus_per_actor, cpus_per_actor=config.cpus_per_actor,
        batch_size=config.batch_size, tracking_uri=client.tracking_uri,
        log_to_mlflow=config.log_evaluations, output=str(tables),
    ))  # fmt: skip
    # The last row: with the default scales, dense has Table 3's one-Q row, then Table 4's three.
    return result.rows[-1], list(result.mlflow_runs), result.mlflow_tables


def gate(ours, theirs, margin: float) -> tuple[bool, str]:
    """(promote?, the measure that decided): the challenger's top-5 error must be below the
    champion's by more than `margin`; where the two top-5 errors are equal (on 5 classes or
    fewer both are 0), top-1 error decides, with the same margin."""
    if theirs is None:
        return True, "no champion"
    if ours.top5_error != theirs.top5_error:
        return ours.top5_error < theirs.top5_error - margin, "top5_error"
    return ours.top1_error < theirs.top1_error - margin, "top1_error"


def promote(config: PromoteConfig) -> Decision:
    """Evaluate @challenger and @champion with the same protocol on the same held-out split;
    move @champion to the challenger only if its top-5 error is lower by more than the margin.
    The evidence goes onto the challenger version as `promotion.*` tags either way; a first
    champion is evaluated too (nothing is promoted without an evaluation)."""
    check_model_name(config.name)
    if config.mode not in MODES:
        raise ConfigError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODES)}")
    if config.margin < 0:
        raise ConfigError(f"margin must be >= 0, got {config.margin}")
    client = _client(config.tracking_uri)
    name = config.name
    challenger = version_by_alias(client, name, CHALLENGER)
    aliases = client.get_registered_model(name).aliases
    champion = (client.get_model_version_by_alias(name, CHAMPION)
                if CHAMPION in aliases else None)  # fmt: skip
    if champion is not None and champion.version == challenger.version:
        raise ConfigError(f"{name} version {challenger.version} is already @{CHAMPION}")
    manifest = config.manifest or challenger.tags.get("data_manifest", "")
    if not manifest:
        raise ConfigError(f"{name} version {challenger.version} names no training data: pass "
                          "--manifest (the held-out data to compare on)")  # fmt: skip
    sha = manifest_sha256(manifest, s3_endpoint=config.s3_endpoint)
    # The tables stay (and are printed) under the home, as `vgg-ray evaluate` leaves them; only
    # the ensembles' downloaded weights go with the temporary folder.
    from vgg_ray.config import default_home

    stamp = time.strftime("%Y%m%d-%H%M%S")
    tables = {v.version: default_home() / "evaluations" / f"{stamp}-promote-{name}-v{v.version}"
              for v in (challenger, champion) if v is not None}  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        ours, our_runs, our_tables = _evaluate_version(
            config, client, challenger, manifest, Path(directory) / "challenger",
            tables[challenger.version])  # fmt: skip
        theirs, their_runs, their_tables = (None, [], "")
        if champion is not None:
            theirs, their_runs, their_tables = _evaluate_version(
                config, client, champion, manifest, Path(directory) / "champion",
                tables[champion.version])  # fmt: skip
    better, measure = gate(ours, theirs, config.margin)
    scales = ",".join(map(str, config.scales)) or "paper defaults per net"
    tags = {
        "promotion.decision": "promoted" if better else "refused",
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "promotion.protocol": f"split={config.split} mode={config.mode} scales={scales} "
                              f"images={ours.images} max_images={config.max_images}",
        "promotion.challenger_version": str(challenger.version),
        "promotion.challenger_top5_error": f"{ours.top5_error:.6f}",
        "promotion.challenger_top1_error": f"{ours.top1_error:.6f}",
        "promotion.challenger_test_scales": ours.test_scales,
        "promotion.champion_version": str(champion.version) if champion else "none",
        "promotion.champion_top5_error": f"{theirs.top5_error:.6f}" if theirs else "none",
        "promotion.champion_top1_error": f"{theirs.top1_error:.6f}" if theirs else "none",
        "promotion.champion_test_scales": theirs.test_scales if theirs else "none",
        "promotion.margin": f"{config.margin:g}",
        "promotion.decided_by": measure,
        "promotion.manifest": manifest,
        "promotion.manifest_sha256": sha,
        "promotion.run_ids": f"challenger={challenger.run_id or ''} "
                             f"champion={(champion.run_id or '') if champion else 'none'}",
        "promotion.evaluation_runs": f"challenger={','.join(our_runs)} "
                                     f"champion={','.join(their_runs) or 'none'}",
        "promotion.evaluation_tables": f"challenger={our_tables or 'none'} "
                                       f"champion={their_tables or 'none'}",
    }  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    if better:
        if champion is not None:
            push_history(client, name, champion.version)
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        client.delete_registered_model_alias(name, CHALLENGER)
    decision = Decision(
        name, better, str(challenger.version), str(champion.version) if champion else None,
        ours.top5_error, theirs.top5_error if theirs else None, tags,
    )  # fmt: skip
    print(f"vgg-ray promote: {decision.summary()}", flush=True)
    return decision


def push_history(client, name: str, version: int | str) -> None:
    """Record `version` as the champion just replaced. str(): the SQLite store (the embedded
    default) returns versions as int, an mlflow server as str."""
    history = _history(client, name) + [str(version)]
    client.set_registered_model_tag(name, HISTORY, ",".join(history))
    client.set_registered_model_tag(name, PREVIOUS, str(version))


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return [v for v in tags.get(HISTORY, "").split(",") if v]


def rollback(name: str, *, tracking_uri: str = "") -> tuple[str, str | None]:
    """Move @champion back to the version it replaced; returns (now champion, was champion).
    Repeatable: each call goes one promotion further back."""
    check_model_name(name)
    client = _client(tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases
    except Exception:
        raise ConfigError(f"no registered model {name!r} at {client.tracking_uri}") from None
    history = _history(client, name)
    if not history:
        raise ConfigError(f"{name} has no previous {CHAMPION} to roll back to")
    previous, current = history.pop(), aliases.get(CHAMPION)
    current = None if current is None else str(current)  # int on the SQLite store
    try:
        client.get_model_version(name, previous)
    except Exception:
        raise ConfigError(f"{name} version {previous} (the previous {CHAMPION}) no longer "
                          "exists") from None  # fmt: skip
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY, ",".join(history))
    if history:
        client.set_registered_model_tag(name, PREVIOUS, history[-1])
    else:
        client.delete_registered_model_tag(name, PREVIOUS)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if current:
        client.set_model_version_tag(
            name, current, "rolled_back", f"{CHAMPION} moved back to version {previous} at {stamp}"
        )
    print(f"vgg-ray rollback: {name} @{CHAMPION} is version {previous} again (was "
          f"{current or 'none'})", flush=True)  # fmt: skip
    return previous, current
