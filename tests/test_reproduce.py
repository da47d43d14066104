"""`vgg-ray reproduce`: the paper's chain as a graph (data, no cluster), then a reduced chain end to
end on a real local Ray and a real MLflow store: A -> D, E at S = 256 -> D+E -> the registry,
interrupted, failed on a bad input and rerun."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_shards

from vgg_ray.cli import main
from vgg_ray.config import demo, paper
from vgg_ray.errors import ConfigError
from vgg_ray.reproduce import CHAIN_TAG, STAGE_TAG, ReproduceConfig, plan, stage_config


def _by_name(stages):
    return {s.name: s for s in stages}


def test_the_plan_is_the_papers_chain():
    stages = _by_name(plan())
    trained = [s for s in stages.values() if s.kind == "train"]
    assert len(trained) == 12 and len(stages) == 26  # + 12 evaluations, the ensemble, register
    assert stages["A-256"].parents == () and stages["A-256"].init == "scratch"
    assert stages["A-LRN-256"].parents == ()
    for arch in "BCDE":
        assert stages[f"{arch}-256"].parents == ("A-256",)
        assert stages[f"{arch}-256"].init == "from-A" and stages[f"{arch}-256"].lr_factor == 1.0
    for arch in "CDE":
        assert stages[f"{arch}-384"].parents == (f"{arch}-256",)
        assert stages[f"{arch}-jitter"].parents == (f"{arch}-384",)
        assert stages[f"{arch}-384"].lr_factor == stages[f"{arch}-jitter"].lr_factor == 0.1
    assert "B-384" not in stages  # the paper trained B at 256 only
    assert stages["ensemble-DE"].parents == ("D-jitter", "E-jitter")
    assert stages["register"].parents == ("D-jitter", "E-jitter", "ensemble-DE")
    assert stages["eval-D-jitter"].parents == ("D-jitter",)


def test_stage_configs_follow_the_paper_at_its_scale_and_at_the_demos():
    stages = _by_name(plan())
    full = ReproduceConfig(base=paper("A"))
    d384 = stage_config(full, stages["D-384"], init="/ckpt/D-256")
    assert (d384.arch, d384.data.scale, d384.lr, d384.init) == (
        "D",
        (384, 384),
        1e-3,
        "/ckpt/D-256",
    )
    assert d384.data.validation_scale == 384 and d384.epochs == 74
    jitter = stage_config(full, stages["E-jitter"], init="/ckpt/E-384")
    assert jitter.data.scale == (256, 512) and jitter.data.validation_scale == 384
    a = stage_config(full, stages["A-256"])
    assert (a.init, a.data.scale, a.lr, a.run_name) == ("paper", (256, 256), 1e-2, "paper-A-256")
    small = ReproduceConfig(base=demo("A"))  # 32 px crops: S x 32 / 224
    assert stage_config(small, stages["D-jitter"], init="x").data.scale == (37, 73)
    assert stage_config(small, stages["D-256"], init="x").base_init == "kaiming"


def test_nets_and_stages_select_a_part_with_what_it_needs():
    names = [s.name for s in plan(("D",), ("384",))]
    assert names[:3] == ["A-256", "D-256", "D-384"] and "eval-D-384" in names
    assert "eval-D-256" not in names and "register" in names  # D alone: registered, no ensemble
    reduced = _by_name(plan(("A", "D", "E"), ("256",)))
    assert set(reduced) == {"A-256", "D-256", "E-256", "eval-A-256", "eval-D-256", "eval-E-256",
                            "ensemble-DE", "register"}  # fmt: skip
    assert reduced["ensemble-DE"].parents == ("D-256", "E-256")
    assert [s.name for s in plan(("A", "D"), ("A-256", "D-256"))] == ["A-256", "D-256"]
    assert {s.kind for s in plan(stages=("train",))} == {"train"}
    with pytest.raises(ConfigError, match="unknown net"):
        plan(("F",))
    with pytest.raises(ConfigError, match="unknown stage"):
        plan(stages=("D-512",))


def test_localisation_adds_appendix_a_from_the_classifiers_of_its_scales():
    stages = _by_name(plan(localisation=True))
    assert stages["loc-D-256"].parents == ("D-256",) and stages["loc-D-384"].parents == ("D-384",)
    fc = stages["loc-D-384-scr-fc"]
    assert (fc.regression, fc.finetune, fc.parents) == ("scr", "fc", ("D-384",))
    assert stages["localise"].parents == ("loc-D-256", "loc-D-384", "loc-D-384-scr-fc",
                                          "loc-D-384-pcr-fc", "D-384")  # fmt: skip
    assert "eval-loc-D-256" not in stages  # evaluated by Tables 8 and 9, not 3-6
    assert stages["ensemble-DE"].parents == ("D-jitter", "E-jitter")  # still the classifiers
    loc = stage_config(ReproduceConfig(base=paper("A")), stages["loc-D-384"], init="/ckpt/D-384")
    assert (loc.regression, loc.finetune, loc.lr, loc.data.scale, loc.init) == (
        "pcr", "all", 1e-3, (384, 384), "/ckpt/D-384")  # fmt: skip
    assert "localise" not in _by_name(plan(stages=("256",), localisation=True))
    assert "loc-D-256" not in _by_name(plan())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nets", "A,F"], "unknown net(s) F"),
        (["--stages", "D-512"], "unknown stage(s) D-512"),
        (["--resume", "--name", "never-started"], "no chain 'never-started'"),
        (["--max-concurrent", "-1"], "max_concurrent"),
        (["--localisation"], "has no bounding boxes"),  # before any stage runs
        (["--localisation", "--nets", "A,E"], "add D to --nets"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_RAY_HOME", str(tmp_path))  # the embedded default's local store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    manifest = make_shards(tmp_path, classes=2, train_per_class=4, val_per_class=2)
    code = main(["reproduce", "--manifest", manifest, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_dry_run_prints_the_plan_and_its_cost(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_RAY_HOME", str(tmp_path))
    manifest = make_shards(tmp_path, classes=2, train_per_class=4, val_per_class=2)
    assert main(["reproduce", "--manifest", manifest, "--dry-run", "--nets", "A,D"]) == 0
    out = capsys.readouterr().out
    assert "| D-384 | D-256 | D | 384 | all layers | 0.001 | 74 |" in out
    assert "H200 GPU-hours" in out and "days on 8 GPUs" in out


@pytest.mark.slow
def test_a_reduced_chain_runs_resumes_and_reports(ray_cluster, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from vgg_ray.reproduce import reproduce

    monkeypatch.setenv("VGG_RAY_HOME", str(tmp_path / "home"))
    manifest = make_shards(tmp_path, classes=3, train_per_class=32, val_per_class=8)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = demo("A", epochs=1, global_batch=16, cpus_per_worker=0.5, tracking_uri=tracking,
                storage_path=str(tmp_path / "checkpoints"), log_every_steps=2)  # fmt: skip
    base = replace(base, data=replace(base.data, manifest=manifest, read_cpus=0.5))
    config = ReproduceConfig(base=base, name="t", nets=("A", "D", "E"), actors=1)
    client = MlflowClient(tracking, registry_uri=tracking)  # not the global one of other tests

    def runs() -> dict[str, list]:
        found = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`{CHAIN_TAG}` = 't'"
        )
        by_stage: dict[str, list] = {}
        for run in found:
            by_stage.setdefault(run.data.tags.get(STAGE_TAG, "parent"), []).append(run)
        return by_stage

    # 1. Net A and D only.
    reproduce(replace(config, stages=("A-256", "D-256")))
    first = runs()
    assert set(first) == {"parent", "A-256", "D-256"}
    a_run, d_run = first["A-256"][0], first["D-256"][0]
    assert d_run.data.tags["vgg_ray.init_from"] == "A-256"
    assert d_run.data.tags["vgg_ray.init_from_run"] == a_run.info.run_id
    assert d_run.data.tags["mlflow.parentRunId"] == first["parent"][0].info.run_id

    # 2. A stage whose net cannot take net A's weights fails before its workers start, alone.
    wide = replace(config, base=replace(base, width=1 / 8), stages=("E-256",))
    with pytest.raises(ConfigError, match="E-256: .*width or class count"):
        reproduce(wide)
    assert set(runs()) == {"parent", "A-256", "D-256"}

    # 3. D's stage as a killed driver leaves it (run RUNNING); the S = 256 chain continues it,
    # two stages at a time (Ray tasks; the sqlite store served by one mlflow server meanwhile).
    client.update_run(d_run.info.run_id, status="RUNNING")
    rows = reproduce(replace(config, stages=("256",), max_concurrent=2))
    after = runs()
    assert all(len(after[stage]) == 1 for stage in ("A-256", "D-256", "E-256"))
    assert after["D-256"][0].info.run_id == d_run.info.run_id
    assert after["D-256"][0].info.status == "FINISHED"
    assert after["E-256"][0].data.tags["vgg_ray.init_from"] == "A-256"
    assert set(after) >= {"eval-A-256", "eval-D-256", "eval-E-256", "ensemble-DE", "register"}

    # The report: Tables 3, 4 (dense) and 6 (D+E), the paper's figures beside ours.
    tables = {(r.table, r.net, r.method, "," in r.test_scales) for r in rows}
    assert {(3, "A", "dense", False), (4, "D", "dense", True), (4, "E", "dense", True),
            (6, "D+E", "dense", True), (6, "D+E", "dense+multicrop", True)} <= tables  # fmt: skip
    by_key = {(r.table, r.net, r.method, "," in r.test_scales): r for r in rows}
    assert by_key[3, "A", "dense", False].paper == (29.6, 10.4)  # PAPER.md, Table 3
    assert by_key[4, "D", "dense", True].paper == (26.6, 8.6)  # Table 4
    assert by_key[6, "D+E", "dense", True].paper is None  # the paper fused jittered nets only
    assert all(0 <= r.top1 <= 100 and 0 <= r.top5 <= r.top1 for r in rows)
    parent = after["parent"][0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert artifacts == {"report/report.md", "report/report.csv"}
    out = capsys.readouterr().out
    assert "| table | ConvNet | train S | test Q | method |" in out
    versions = {v.name: v for v in client.search_model_versions()}
    assert {"vgg-D", "vgg-E", "vgg-DE"} <= set(versions)
    assert versions["vgg-D"].run_id == d_run.info.run_id

    # 4. Rerun: every stage is finished, nothing runs again.
    total = sum(len(v) for v in after.values())
    assert reproduce(replace(config, stages=("256",))) == rows
    assert sum(len(v) for v in runs().values()) == total
    assert "8 stages, 8 already done" in capsys.readouterr().out

    # 5. Net A in the registry: the paper profile of a deep net starts from it where it fits.
    from vgg_ray.cli import build_parser, train_config
    from vgg_ray.registry import RegisterConfig, register_runs
    from vgg_ray.train_job import NET_A

    (net_a,) = register_runs(RegisterConfig(runs=(a_run.info.run_id,), tracking_uri=tracking))
    client.set_registered_model_alias("vgg-A", "champion", net_a.version)

    def paper_config(*argv):
        args = ["train", "--manifest", manifest, "--arch", "D", "--tracking-uri", tracking, *argv]
        return train_config(build_parser().parse_args(args))

    assert paper_config("--width", "0.0625").init == NET_A
    assert paper_config().init == "glorot"  # the full-width D cannot take the tiny net A
    assert f"{NET_A} does not fit net D" in capsys.readouterr().out
