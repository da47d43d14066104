"""`vgg-ray reproduce`: the paper's experiment plan (Sect. 3.1, Tables 3-6) as one resumable graph
of training, evaluation and registration stages, reusing `train`, `evaluate` and the registry.

```
A-256 (N(0, 0.01)) ──► B-256, C-256, D-256, E-256 (first 4 convs + 3 FCs from A-256)
A-LRN-256               C-256 ──► C-384 (lr / 10) ──► C-jitter (S in [256, 512], all layers)
                        D-256 ──► D-384 ──► D-jitter      E-256 ──► E-384 ──► E-jitter
every trained net ──► eval-<stage>: Table 3 (dense, one Q), Table 4 (dense, three Q),
                      Table 5 (multi-crop, multi-crop & dense) for the jittered D and E
D + E (last scale) ──► ensemble-DE: Table 6 ──► register: vgg-D, vgg-E, vgg-DE
```
Each stage is an MLflow run under the chain's parent run, tagged with its stage and the stage
(and run) it was initialised from. A stage whose run is FINISHED is never run again; a training
stage that was interrupted continues from its checkpoint. Scales, learning rates and epochs are
relative to the base config: the paper's S = 256 is 256 px at 224 px crops and 37 px at the
demo's 32 px crops (S x crop / 224); the fine-tuning lr is the base lr / 10 (1e-2 -> 1e-3).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vgg_ray.config import TrainConfig, default_home
from vgg_ray.errors import ConfigError
from vgg_ray.transforms import PAPER_CROP, PAPER_SCALE

NETS = ("A", "A-LRN", "B", "C", "D", "E")
SCALES = {"256": (256, 256), "384": (384, 384), "jitter": PAPER_SCALE}  # the paper's train S
KINDS = ("train", "eval", "ensemble", "register", "localise")
CHAIN_TAG = "vgg_ray.reproduce"
STAGE_TAG = "vgg_ray.reproduce.stage"
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_BOXED_TRAIN_IMAGES = 544_546  # the training images with boxes (LOC_train_solution.csv)
# Training img/s of one H200 per net, eager bf16 at batch 128 (docs/benchmarks.md, 2026-11-23):
# what --dry-run prices GPU-hours at.
H200_IMAGES_PER_S = {"A": 5154, "A-LRN": 5154, "B": 3875, "C": 3661, "D": 3370, "E": 2965}

# The paper's figures (shared/PAPER.md): (table, net, train S, method) -> (top-1, top-5) %.
PAPER = {
    (3, "A", "256", "dense"): (29.6, 10.4), (3, "A-LRN", "256", "dense"): (29.7, 10.5),
    (3, "B", "256", "dense"): (28.7, 9.9), (3, "C", "256", "dense"): (28.1, 9.4),
    (3, "C", "384", "dense"): (28.1, 9.3), (3, "C", "jitter", "dense"): (27.3, 8.8),
    (3, "D", "256", "dense"): (27.0, 8.8), (3, "D", "384", "dense"): (26.8, 8.7),
    (3, "D", "jitter", "dense"): (25.6, 8.1), (3, "E", "256", "dense"): (27.3, 9.0),
    (3, "E", "384", "dense"): (26.9, 8.7), (3, "E", "jitter", "dense"): (25.5, 8.0),
    (4, "B", "256", "dense"): (28.2, 9.6), (4, "C", "256", "dense"): (27.7, 9.2),
    (4, "C", "384", "dense"): (27.8, 9.2), (4, "C", "jitter", "dense"): (26.3, 8.2),
    (4, "D", "256", "dense"): (26.6, 8.6), (4, "D", "384", "dense"): (26.5, 8.6),
    (4, "D", "jitter", "dense"): (24.8, 7.5), (4, "E", "256", "dense"): (26.9, 8.7),
    (4, "E", "384", "dense"): (26.7, 8.6), (4, "E", "jitter", "dense"): (24.8, 7.5),
    (5, "D", "jitter", "dense"): (24.8, 7.5), (5, "D", "jitter", "multicrop"): (24.6, 7.5),
    (5, "D", "jitter", "dense+multicrop"): (24.4, 7.2),
    (5, "E", "jitter", "dense"): (24.8, 7.5), (5, "E", "jitter", "multicrop"): (24.6, 7.4),
    (5, "E", "jitter", "dense+multicrop"): (24.4, 7.1),
    (6, "D+E", "jitter", "dense"): (24.0, 7.1), (6, "D+E", "jitter", "multicrop"): (23.9, 7.2),
    (6, "D+E", "jitter", "dense+multicrop"): (23.7, 6.8),
}  # fmt: skip
TABLE5_MODES = ("dense", "multicrop", "dense+multicrop")


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One node of the chain."""

    name: str
    """"D-384", "eval-D-384", "ensemble-DE", "register"."""
    kind: str
    """One of KINDS."""
    parents: tuple[str, ...] = ()
    """Stages that must be finished first; a train stage starts from its first parent's net."""
    arch: str = ""
    scale: str = ""
    """The paper's training scale, a key of SCALES (train and eval stages; the members' scale
    for the ensemble and register stages)."""
    init: str = ""
    """Train stages: "scratch", "from-A" (the paper's copy of A's layers), "finetune", or
    "localise" (a localisation net from the classifier of its scale, Appendix A)."""
    regression: str = ""
    """Localisation train stages: "scr" or "pcr" (Appendix A)."""
    finetune: str = "all"
    """Localisation train stages: "all" layers or "fc" only (Table 8)."""

    @property
    def in_table5(self) -> bool:
        """Table 5 (multi-crop, multi-crop & dense) reports the jittered D and E."""
        return self.kind in ("train", "eval") and self.scale == "jitter" and self.arch in ("D", "E")

    @property
    def lr_factor(self) -> float:
        """Multiplier on the base lr: the S = 384 and jittered nets fine-tune at lr / 10, and the
        localisation nets train at it (Appendix A: 1e-3)."""
        return 0.1 if self.init in ("finetune", "localise") else 1.0


def _chain(nets: Sequence[str]) -> list[Stage]:
    """The training stages of the paper for `nets`, in an order parents come first."""
    stages = [Stage(name=f"{a}-256", kind="train", arch=a, scale="256", init="scratch")
              for a in ("A", "A-LRN") if a in nets]  # fmt: skip
    for arch in ("B", "C", "D", "E"):
        if arch in nets:
            stages.append(Stage(name=f"{arch}-256", kind="train", arch=arch, scale="256",
                                parents=("A-256",), init="from-A"))  # fmt: skip
    for scale, before in (("384", "256"), ("jitter", "384")):
        for arch in ("C", "D", "E"):
            if arch in nets:
                stages.append(Stage(name=f"{arch}-{scale}", kind="train", arch=arch, scale=scale,
                                    parents=(f"{arch}-{before}",), init="finetune"))  # fmt: skip
    return stages


def _localisation_stages() -> list[Stage]:
    """Appendix A: net D's localisation nets from the classifiers at S = 256 and 384 (PCR, all
    layers: Table 9), the S = 384 variants of Table 8 (SCR and PCR, FC layers only), and their
    evaluation (Tables 8 and 9, rated by the S = 384 classifier)."""
    variants = [("256", "pcr", "all"), ("384", "pcr", "all"), ("384", "scr", "fc"),
                ("384", "pcr", "fc")]  # fmt: skip
    stages = [
        Stage(name=f"loc-D-{scale}" + ("" if (regression, finetune) == ("pcr", "all")
                                        else f"-{regression}-{finetune}"),
              kind="train", arch="D", scale=scale, parents=(f"D-{scale}",), init="localise",
              regression=regression, finetune=finetune)
        for scale, regression, finetune in variants
    ]  # fmt: skip
    parents = (*(s.name for s in stages), "D-384")
    return [*stages, Stage(name="localise", kind="localise", parents=parents, arch="D")]


def plan(
    nets: Sequence[str] = NETS, stages: Sequence[str] = (), *, localisation: bool = False
) -> list[Stage]:
    """The stages to run for `nets`, narrowed by `stages`: training scales (256, 384, jitter),
    kinds (train, eval, ensemble, register, localise) or stage names; the stages these need
    come too. `localisation`: Appendix A's stages as well (they need net D)."""
    unknown = [n for n in nets if n not in NETS]
    if unknown or not nets:
        raise ConfigError(f"unknown net(s) {', '.join(unknown) or '(none)'}; choose from "
                          f"{', '.join(NETS)}")  # fmt: skip
    if localisation and "D" not in nets:
        raise ConfigError("--localisation trains net D's localisation nets: add D to --nets")
    terms = set(stages)
    wanted_scales = terms & set(SCALES) or set(SCALES)
    wanted_kinds = terms & set(KINDS) or (set(KINDS) if not terms - set(SCALES) else set())
    everything = {s.name: s for s in _chain(["A", *nets])}  # every deep net needs net A
    trained = [s for s in everything.values() if s.arch in nets and s.scale in wanted_scales]
    graph = dict(everything)
    if localisation:
        located = _localisation_stages()
        graph.update({s.name: s for s in located})
        trained += [s for s in located if s.kind == "train" and s.scale in wanted_scales]
    for stage in trained:
        if stage.regression:  # evaluated by the localise stage
            continue
        graph[f"eval-{stage.name}"] = Stage(name=f"eval-{stage.name}", kind="eval",
                                            parents=(stage.name,), arch=stage.arch,
                                            scale=stage.scale)  # fmt: skip
    last = {}  # the latest-scale trained D and E: the ensemble's members
    for stage in trained:
        if stage.arch in ("D", "E") and not stage.regression:
            last[stage.arch] = stage
    members = tuple(last[a].name for a in ("D", "E") if a in last)
    scale = last["D"].scale if "D" in last else ""
    register_parents = members
    if len(members) == 2 and last["D"].scale == last["E"].scale:
        graph["ensemble-DE"] = Stage(name="ensemble-DE", kind="ensemble", parents=members,
                                     arch="D+E", scale=scale)  # fmt: skip
        register_parents = (*members, "ensemble-DE")
    if members:
        graph["register"] = Stage(name="register", kind="register", parents=register_parents,
                                  scale=scale)  # fmt: skip
    known = set(graph) | set(SCALES) | set(KINDS)
    if bad := sorted(terms - known):
        raise ConfigError(f"unknown stage(s) {', '.join(bad)}; choose stage names ("
                          f"{', '.join(graph)}), scales ({', '.join(SCALES)}) or kinds "
                          f"({', '.join(KINDS)})")  # fmt: skip
    selected = {name for name in terms if name in graph}
    for stage in graph.values():
        in_scope = stage.kind != "train" or stage in trained
        if stage.kind == "localise" and not wanted_scales >= {"256", "384"}:
            in_scope = False  # its nets are at S = 256 and 384
        if stage.kind in wanted_kinds and in_scope and (stage.scale in wanted_scales
                                                        or not stage.scale):  # fmt: skip
            selected.add(stage.name)
    todo = list(selected)
    while todo:  # every stage a selected one needs
        for parent in graph[todo.pop()].parents:
            if parent not in selected:
                selected.add(parent)
                todo.append(parent)
    return [stage for stage in graph.values() if stage.name in selected]


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReproduceConfig:
    """One run of the chain."""

    base: TrainConfig
    """Every training stage's config before the stage sets net, scale, lr and init: data,
    storage, tracking, workers, width, epochs (the `paper` or `demo` profile and options)."""
    name: str = ""
    """Names the chain; a rerun with the same name continues it. "" = "paper" at 224 px crops,
    else "demo"."""
    nets: tuple[str, ...] = NETS
    stages: tuple[str, ...] = ()
    """Narrow the plan (see `plan`); () = all of it."""
    max_concurrent: int = 0
    """Stages run at once when their parents are done; 0 = one per `base.workers` GPUs of the
    cluster, else 1."""
    resume: bool = False
    """Require the chain to exist (a rerun continues it either way)."""
    dry_run: bool = False
    """Print the plan and its cost; run nothing."""
    max_images: int = 0
    """Evaluate only the val split's first N images (0: all)."""
    actors: int = 0
    """Evaluation actors (0: the evaluation's default)."""
    localisation: bool = False
    """Also Appendix A: net D's localisation nets at S = 256 and 384 and Tables 8 and 9."""

    def validate(self) -> ReproduceConfig:
        for name in ("max_concurrent", "max_images", "actors"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self

    def scale(self, key: str) -> tuple[int, int]:
        """The paper's training scale `key` at this chain's crop (S x crop / 224)."""
        return tuple(round(s * self.base.data.crop / 224) for s in SCALES[key])  # type: ignore

    @property
    def chain_name(self) -> str:
        return self.name or ("paper" if self.base.data.crop == PAPER_CROP else "demo")


def stage_config(config: ReproduceConfig, stage: Stage, init: str = "") -> TrainConfig:
    """The TrainConfig of train stage `stage`, starting from `init` (its parent's checkpoint)."""
    base = config.base
    low, high = config.scale(stage.scale)
    values = dict(
        arch=stage.arch,
        data=replace(base.data, scale=(low, high), eval_scale=0),
        lr=base.lr * stage.lr_factor,
        run_name=f"{config.chain_name}-{stage.name}",
        init=init or base.init,
        regression=stage.regression,
        finetune=stage.finetune,
    )
    return replace(base, **values)


# --- MLflow: the chain's parent run and its stage runs ----------------------------------------


@dataclass
class Chain:
    """The chain's state in MLflow: its parent run and the latest run of each stage."""

    client: Any  # mlflow's MlflowClient
    experiment_id: str
    parent_id: str
    runs: dict[str, Any] = field(default_factory=dict)  # stage name -> mlflow Run
    rows: dict[str, list] = field(default_factory=dict)  # eval run id -> its report rows

    def refresh(self, name: str) -> None:
        found = _chain_runs(self.client, self.experiment_id, name)
        self.runs = {run.data.tags[STAGE_TAG]: run for run in found if STAGE_TAG in run.data.tags}

    def finished(self, stage: str) -> bool:
        run = self.runs.get(stage)
        return run is not None and run.info.status == "FINISHED"

    def tags(self, name: str, stage: Stage, parent: str = "") -> dict[str, str]:
        tags = {"mlflow.parentRunId": self.parent_id, CHAIN_TAG: name, STAGE_TAG: stage.name}
        if parent:
            tags["vgg_ray.init_from"] = parent
            tags["vgg_ray.init_from_run"] = self.runs[parent].info.run_id
        return tags


def _chain_runs(client, experiment_id: str, name: str) -> list:
    """Every run of chain `name`, oldest first (a stage's latest run wins in a dict)."""
    from vgg_ray.tracking import runs_tagged

    return runs_tagged(client, [experiment_id], {CHAIN_TAG: name},
                       order_by=["attributes.start_time ASC"])  # fmt: skip


def _open_chain(config: ReproduceConfig, tracking_uri: str) -> Chain:
    from vgg_ray import tracking

    client = tracking.open_client(tracking_uri)
    experiment_id = tracking.experiment_id(client, config.base.experiment)
    name = config.chain_name
    parents = [r for r in _chain_runs(client, experiment_id, name) if STAGE_TAG not in r.data.tags]
    if parents:
        parent_id = parents[0].info.run_id
        client.update_run(parent_id, status="RUNNING")
    elif config.resume:
        raise ConfigError(f"no chain {name!r} in experiment {config.base.experiment!r} to resume; "
                          "start it without --resume")  # fmt: skip
    else:
        run = client.create_run(experiment_id, run_name=f"reproduce-{name}", tags={CHAIN_TAG: name})
        parent_id = run.info.run_id
    chain = Chain(client, experiment_id, parent_id)
    chain.refresh(name)
    return chain


# --- the stages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportRow:
    """One row of the paper-layout report."""

    table: int
    net: str
    train_scale: str  # ours, e.g. "256" or "[256;512]"
    test_scales: str
    method: str
    top1: float  # %
    top5: float
    paper: tuple[float, float] | None


def _table_rows(stage: Stage, results) -> list[ReportRow]:
    """The evaluation rows of one stage, as the paper's tables file them."""
    rows = []
    for r in results:
        multi = "," in r.test_scales
        if stage.kind == "ensemble":
            tables = [6]
        elif r.mode == "dense":
            tables = [4] if multi else [3]
            if multi and stage.in_table5:
                tables.append(5)  # Table 5's dense rows repeat Table 4's
        else:
            tables = [5]
        for table in tables:
            paper = PAPER.get((table, r.nets, stage.scale, r.mode))
            rows.append(ReportRow(table, r.nets, r.train_scale, r.test_scales, r.mode,
                                  100 * r.top1_error, 100 * r.top5_error, paper))  # fmt: skip
    return rows


def _eval_rows(stage: Stage, info) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(mode, Q set) rows a stage evaluates: Table 3's single Q and Table 4's three Q, dense;
    Table 5's multi-crop rows for the jittered D and E; Table 6's three modes for D+E."""
    from vgg_ray.evaluate import default_scales, single_scale

    three = default_scales(info)
    if stage.kind == "ensemble":
        return tuple((mode, three) for mode in TABLE5_MODES)
    rows = [("dense", (single_scale(info),)), ("dense", three)]
    if stage.in_table5:
        rows += [("multicrop", three), ("dense+multicrop", three)]
    return tuple(rows)


def _best_checkpoint(chain: Chain, stage: str) -> str:
    return chain.runs[stage].data.tags["best_checkpoint"]


def _run_train(config: ReproduceConfig, chain: Chain, stage: Stage, tracking_uri: str) -> None:
    from vgg_ray.train_job import run_exists, train

    parent = stage.parents[0] if stage.parents else ""
    init = _best_checkpoint(chain, parent) if parent else ""
    train_config = replace(stage_config(config, stage, init), tracking_uri=tracking_uri)
    resume = run_exists(train_config)
    if resume:
        print(f"vgg-ray reproduce: {stage.name}: continuing its run from the latest checkpoint",
              flush=True)  # fmt: skip
    train(train_config, resume=resume, tags=chain.tags(config.chain_name, stage, parent))


def _evaluate_nets(config: ReproduceConfig, stage: Stage, sources: list[str], tracking_uri: str):
    from vgg_ray.evaluate import NetInfo
    from vgg_ray.evaluate_job import EvaluateConfig, evaluate

    info = NetInfo(
        name=stage.arch, crop=config.base.data.crop, train_scale=config.scale(stage.scale)
    )
    rows = _eval_rows(stage, info)
    output = default_home() / "reproduce" / config.chain_name / stage.name
    evaluation = EvaluateConfig(
        models=tuple(sources), manifest=config.base.data.manifest,
        s3_endpoint=config.base.data.s3_endpoint, modes=tuple(dict.fromkeys(m for m, _ in rows)),
        scales=tuple(dict.fromkeys(s for _, s in rows)), only_rows=rows,
        members=False, max_images=config.max_images, actors=config.actors,
        tracking_uri=tracking_uri, log_to_mlflow=False, output=str(output),
    )  # fmt: skip
    return evaluate(evaluation)


def _run_evaluation(config: ReproduceConfig, chain: Chain, stage: Stage, tracking_uri: str):
    """An eval or ensemble stage: the paper's rows, logged to the stage's own run."""
    import mlflow.entities

    sources = [_best_checkpoint(chain, parent) for parent in stage.parents]
    result = _evaluate_nets(config, stage, sources, tracking_uri)
    rows = _table_rows(stage, result.rows)
    client = chain.client
    run = client.create_run(chain.experiment_id, run_name=f"{config.chain_name}-{stage.name}",
                            tags=chain.tags(config.chain_name, stage))  # fmt: skip
    now = int(time.time() * 1000)
    metrics = {}
    for r in result.rows:
        metrics[f"eval_{r.key}_top1_error"] = r.top1_error
        metrics[f"eval_{r.key}_top5_error"] = r.top5_error
    client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(k, v, now, 0)
                                               for k, v in metrics.items()])  # fmt: skip
    client.log_text(run.info.run_id, json.dumps([r.__dict__ for r in rows]), "report_rows.json")
    client.log_artifacts(run.info.run_id, result.output, "evaluation")
    client.set_terminated(run.info.run_id, "FINISHED")


def _run_register(config: ReproduceConfig, chain: Chain, stage: Stage, tracking_uri: str):
    from vgg_ray.registry import EnsembleConfig, RegisterConfig, register_ensemble, register_runs

    nets = [p for p in stage.parents if p != "ensemble-DE"]
    run_ids = tuple(chain.runs[p].info.run_id for p in nets)
    registered = register_runs(
        RegisterConfig(
            runs=run_ids, tracking_uri=tracking_uri, s3_endpoint=config.base.data.s3_endpoint
        )
    )
    if "ensemble-DE" in stage.parents:
        registered.append(register_ensemble(EnsembleConfig(
            members=tuple(f"runs:/{r}" for r in run_ids), mode="dense",
            experiment=config.base.experiment, tracking_uri=tracking_uri,
            s3_endpoint=config.base.data.s3_endpoint,
        )))  # fmt: skip
    client = chain.client
    run = client.create_run(
        chain.experiment_id,
        run_name=f"{config.chain_name}-register",
        tags={
            **chain.tags(config.chain_name, stage),
            **{f"registered.{r.name}": r.version for r in registered},
        },
    )
    client.set_terminated(run.info.run_id, "FINISHED")


def _run_localise(config: ReproduceConfig, chain: Chain, stage: Stage, tracking_uri: str):
    """Tables 8 and 9 (`vgg-ray localise`): protocol 1 for the three S = 384 nets, protocol 2
    for the S = 256 and 384 PCR nets, alone, at Q = 352,384 and fused, rated by the S = 384
    classifier; the tables logged to the stage's own run."""
    from vgg_ray.localisation import LocaliseConfig, localise

    best = {parent: _best_checkpoint(chain, parent) for parent in stage.parents}
    output = default_home() / "reproduce" / config.chain_name / stage.name
    common = dict(manifest=config.base.data.manifest, s3_endpoint=config.base.data.s3_endpoint,
                  max_images=config.max_images, actors=config.actors,
                  tracking_uri=tracking_uri, log_to_mlflow=False)  # fmt: skip
    table8 = localise(LocaliseConfig(
        models=(best["loc-D-384"], best["loc-D-384-scr-fc"], best["loc-D-384-pcr-fc"]),
        protocols=(1,), output=str(output / "table8"), **common,
    ))  # fmt: skip
    low, high = (round(q * config.base.data.crop / 224) for q in (352, 384))
    table9 = localise(LocaliseConfig(
        models=(best["loc-D-256"], best["loc-D-384"]), classifier=best["D-384"], protocols=(2,),
        scales=((low, high),), output=str(output / "table9"), **common,
    ))  # fmt: skip
    import mlflow.entities

    client = chain.client
    run = client.create_run(chain.experiment_id, run_name=f"{config.chain_name}-{stage.name}",
                            tags=chain.tags(config.chain_name, stage))  # fmt: skip
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[
        mlflow.entities.Metric(f"loc_error_{r['key']}", r["error"], now, 0)
        for r in table8.rows + table9.rows
    ])  # fmt: skip
    client.log_artifacts(run.info.run_id, table8.output, "localisation/table8")
    client.log_artifacts(run.info.run_id, table9.output, "localisation/table9")
    client.set_terminated(run.info.run_id, "FINISHED")


RUNNERS: dict[str, Callable] = {
    "train": _run_train,
    "eval": _run_evaluation,
    "ensemble": _run_evaluation,
    "register": _run_register,
    "localise": _run_localise,
}


def _run_stage(config: ReproduceConfig, stage: Stage, tracking_uri: str) -> str | None:
    """Run one stage (in the driver, or in a Ray task when stages run concurrently); returns
    None, or the one-line error that stopped it."""
    chain = _open_chain(replace(config, resume=True), tracking_uri)
    try:
        RUNNERS[stage.kind](config, chain, stage, tracking_uri)
    except ConfigError as error:
        return str(error)
    return None


# --- the report ------------------------------------------------------------------------------


def report_rows(chain: Chain, stages: Sequence[Stage]) -> list[ReportRow]:
    """The rows every finished evaluation stage logged, in the paper's table order."""
    rows = []
    for stage in stages:
        if stage.kind in ("eval", "ensemble") and chain.finished(stage.name):
            run_id = chain.runs[stage.name].info.run_id
            if run_id not in chain.rows:
                chain.rows[run_id] = _logged_rows(chain.client, run_id)
            rows += chain.rows[run_id]
    order = {net: i for i, net in enumerate((*NETS, "D+E"))}
    modes = {mode: i for i, mode in enumerate(TABLE5_MODES)}
    return sorted(rows, key=lambda r: (r.table, order.get(r.net, 99), r.train_scale,
                                       modes.get(r.method, 9)))  # fmt: skip


def _logged_rows(client, run_id: str) -> list[ReportRow]:
    """The report rows an evaluation stage logged (`report_rows.json`)."""
    with tempfile.TemporaryDirectory() as directory:
        path = client.download_artifacts(run_id, "report_rows.json", directory)
        values = json.loads(Path(path).read_text())
    return [ReportRow(**{**v, "paper": tuple(v["paper"]) if v.get("paper") else None})
            for v in values]  # fmt: skip


def report_markdown(rows: Sequence[ReportRow]) -> str:
    """Tables 3-6 in the paper's layout, the paper's figures beside ours."""
    lines = ["| table | ConvNet | train S | test Q | method | top-1 val. error (%) | "
             "top-5 val. error (%) | paper top-1 | paper top-5 |",
             "|---:|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        paper = f"{r.paper[0]:.1f} | {r.paper[1]:.1f}" if r.paper else "- | -"
        lines.append(f"| {r.table} | {r.net} | {r.train_scale} | {r.test_scales} | {r.method} | "
                     f"{r.top1:.1f} | {r.top5:.1f} | {paper} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def report_csv(rows: Sequence[ReportRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "net", "train_scale", "test_scales", "method", "top1_error",
                     "top5_error", "paper_top1_error", "paper_top5_error"])  # fmt: skip
    for r in rows:
        writer.writerow([r.table, r.net, r.train_scale, r.test_scales, r.method, f"{r.top1:.2f}",
                         f"{r.top5:.2f}", *(r.paper or ("", ""))])  # fmt: skip
    return buffer.getvalue()


def localisation_report(chain: Chain) -> str:
    """Tables 8 and 9 as the finished localise stage logged them; "" before it has run."""
    if not chain.finished("localise"):
        return ""
    run_id = chain.runs["localise"].info.run_id
    parts = []
    with tempfile.TemporaryDirectory() as directory:
        for table in ("table8", "table9"):
            path = chain.client.download_artifacts(run_id, f"localisation/{table}/{table}.md",
                                                   directory)  # fmt: skip
            parts.append(Path(path).read_text())
    return "\n".join(parts)


def _log_report(chain: Chain, rows: Sequence[ReportRow]) -> None:
    chain.client.log_text(chain.parent_id, report_markdown(rows), "report/report.md")
    chain.client.log_text(chain.parent_id, report_csv(rows), "report/report.csv")
    if located := localisation_report(chain):
        chain.client.log_text(chain.parent_id, located, "report/localisation.md")


# --- dry run ---------------------------------------------------------------------------------


def describe(
    config: ReproduceConfig, stages: Sequence[Stage], train_images: int, boxed_images: int = 0
) -> str:
    """The plan as a table: stage, parents, settings, and GPU-hours on one H200 (a localisation
    net trains on the `boxed_images` only)."""
    lines = ["| stage | after | net | train S | init | lr | epochs | H200 GPU-hours |",
             "|---|---|---|---|---|---:|---:|---:|"]  # fmt: skip
    total = 0.0
    for stage in stages:
        if stage.kind == "train":
            low, high = config.scale(stage.scale)
            images = boxed_images if stage.regression else train_images
            hours = config.base.epochs * images / H200_IMAGES_PER_S[stage.arch] / 3600
            total += hours
            init = {
                "scratch": config.base.init,
                "from-A": "net A's 4 convs + 3 FCs",
                "finetune": "all layers",
                "localise": f"classifier; {stage.regression.upper()}, "
                + ("all layers" if stage.finetune == "all" else "FC layers"),
            }[stage.init]
            lines.append(f"| {stage.name} | {', '.join(stage.parents) or '-'} | {stage.arch} | "
                         f"{low if low == high else f'[{low};{high}]'} | {init} | "
                         f"{config.base.lr * stage.lr_factor:g} | {config.base.epochs} | "
                         f"{hours:,.1f} |")  # fmt: skip
        else:
            lines.append(f"| {stage.name} | {', '.join(stage.parents)} | {stage.arch or '-'} | "
                         f"| | | | |")  # fmt: skip
    epoch_images = {True: IMAGENET_BOXED_TRAIN_IMAGES, False: IMAGENET_TRAIN_IMAGES}
    paper = sum(74 * epoch_images[bool(s.regression)] / H200_IMAGES_PER_S[s.arch] / 3600
                for s in stages if s.kind == "train")  # fmt: skip
    lines.append(
        f"\n{len(stages)} stages. GPU-hours at full-size nets' 224 px training speed on one H200 "
        f"(docs/benchmarks.md), {train_images:,} images an epoch: {total:,.1f}. The same stages "
        f"on ImageNet at the paper's 74 epochs each: {paper:,.0f} H200 GPU-hours, about "
        f"{paper / 7.5 / 24:,.1f} days on 8 GPUs (the paper's 3.75x speed-up per 4 GPUs)."
    )
    return "\n".join(lines)


# --- the driver ------------------------------------------------------------------------------


def _concurrency(config: ReproduceConfig) -> int:
    import ray

    if config.max_concurrent:
        return config.max_concurrent
    gpus = ray.cluster_resources().get("GPU", 0)
    return max(1, int(gpus // config.base.workers)) if gpus else 1


def _tracking(config: ReproduceConfig, uri: str, concurrent: bool):
    """Concurrent stages write from several processes: a sqlite database is then served by one
    local `mlflow server` (DESIGN.md), as a Tune search does."""
    import contextlib

    if not (concurrent and uri.startswith("sqlite:///")):
        return contextlib.nullcontext(uri)
    from vgg_ray.stack import serve_sqlite

    return serve_sqlite(uri)


def reproduce(config: ReproduceConfig) -> list[ReportRow]:
    """Run (or continue) the chain; returns the report's rows. The function `vgg-ray reproduce`
    and jobs/reproduce_paper.py call."""
    from vgg_ray import runtime
    from vgg_ray.manifest import load_manifest
    from vgg_ray.train_job import resolve

    stages = plan(config.validate().nets, config.stages, localisation=config.localisation)
    base = resolve(config.base).validate()  # every stage names its own run
    config = replace(config, base=base)
    manifest = load_manifest(base.data.manifest, s3_endpoint=base.data.s3_endpoint)
    # Localisation needs boxes: a data set without them fails now, not after days of training.
    boxed = manifest.rows("train", boxed=True) if config.localisation else 0
    if config.localisation:
        manifest.shards("val", boxed=True)
    if config.dry_run:
        print(describe(config, stages, manifest.rows("train"), boxed))
        return []
    if config.resume:  # a chain that does not exist fails here, before Ray starts
        _open_chain(config, base.tracking_uri)
    runtime.connect()
    concurrency = _concurrency(config)
    with _tracking(config, base.tracking_uri, concurrency > 1) as tracking_uri:
        chain = _open_chain(config, tracking_uri)
        name = config.chain_name
        print(
            f"vgg-ray reproduce: chain {name!r}: {len(stages)} stages, "
            f"{sum(chain.finished(s.name) for s in stages)} already done; "
            f"up to {concurrency} at once; MLflow parent run {chain.parent_id}",
            flush=True,
        )
        failed = _schedule(config, chain, stages, tracking_uri, concurrency)
        rows = report_rows(chain, stages)
        _log_report(chain, rows)
        print(report_markdown(rows) + localisation_report(chain), flush=True)
        status = "FAILED" if failed else "FINISHED"
        chain.client.set_terminated(chain.parent_id, status)
    if failed:
        raise ConfigError(
            f"chain {name!r}: {'; '.join(f'{s}: {why}' for s, why in failed.items())}; finished "
            "stages are kept: fix the cause and rerun the same command to continue"
        )
    return rows


def _schedule(config: ReproduceConfig, chain: Chain, stages: Sequence[Stage], tracking_uri: str,
              concurrency: int) -> dict[str, str]:  # fmt: skip
    """Run every stage whose parents are finished, up to `concurrency` at once; returns the
    stages that failed or could not run, with why."""
    import ray

    name, failed = config.chain_name, {}
    todo = [s for s in stages if not chain.finished(s.name)]
    running: dict = {}  # Ray object ref -> stage
    run_remotely = ray.remote(num_cpus=0)(_run_stage)  # drives its own TorchTrainer
    while todo or running:
        for stage in list(todo):
            if blocker := next((p for p in stage.parents if p in failed), None):
                failed[stage.name] = f"not run: stage {blocker} failed"
                todo.remove(stage)
            elif all(chain.finished(p) for p in stage.parents) and len(running) < concurrency:
                todo.remove(stage)
                print(f"vgg-ray reproduce: stage {stage.name} ({stage.kind}) starts", flush=True)
                if concurrency == 1:
                    error = _run_stage(config, stage, tracking_uri)
                    _finish_stage(config, chain, stages, stage, error, failed)
                else:
                    running[run_remotely.remote(config, stage, tracking_uri)] = stage
        if running:
            done, _ = ray.wait(list(running), num_returns=1)
            stage = running.pop(done[0])
            try:
                error = ray.get(done[0])
            except Exception as exc:  # the task itself died (a bug, or its node was lost)
                error = str(exc).strip().splitlines()[-1][:300]
            _finish_stage(config, chain, stages, stage, error, failed)
        elif todo and not any(all(chain.finished(p) for p in s.parents) for s in todo):
            for stage in todo:  # parents neither finished nor failed: outside this plan
                failed[stage.name] = "not run: a parent stage is not finished"
            todo = []
    chain.refresh(name)
    return failed


def _finish_stage(config: ReproduceConfig, chain: Chain, stages: Sequence[Stage], stage: Stage,
                  error: str | None, failed: dict[str, str]) -> None:  # fmt: skip
    """Record how a stage ended; after an evaluation, the report so far (terminal and MLflow)."""
    chain.refresh(config.chain_name)
    if error is None and not chain.finished(stage.name):
        error = "its MLflow run did not finish"
    if error is not None:
        failed[stage.name] = error
        print(f"vgg-ray reproduce: stage {stage.name} failed: {error}", flush=True)
        return
    print(f"vgg-ray reproduce: stage {stage.name} done", flush=True)
    if stage.kind in ("eval", "ensemble", "localise"):
        rows = report_rows(chain, stages)
        _log_report(chain, rows)
        print(report_markdown(rows), flush=True)
