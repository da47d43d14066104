"""Schedule search on a real local Ray and a real MLflow server: tiny trials of net A at 1/16
width on 32 px crops of a 3-class set, 1-3 epochs each."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_shards

from vgg_ray import checkpoint as ckpt
from vgg_ray.cli import main, train_main
from vgg_ray.config import demo
from vgg_ray.errors import ConfigError
from vgg_ray.schedules import Plateau, build_schedule
from vgg_ray.stack import serve_mlflow
from vgg_ray.trial import run_trial
from vgg_ray.tune import SearchConfig, SearchSpace, search

# ------------------------------------------------------------------------- no cluster needed


def test_schedule_families():
    def lrs(name, **kw):
        settings = dict(epochs=6, factor=0.5, patience=1, max_decays=3, step_size=2, warmup=2)
        schedule = build_schedule(name, **{**settings, **kw})
        return [schedule.multiplier(e) for e in range(6)]

    assert lrs("step") == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lrs("cosine")[0] == 1 and lrs("cosine")[3] == pytest.approx(0.5)
    assert lrs("warmup_cosine")[:3] == [0.5, 1, 1]
    plateau = Plateau(factor=0.1, patience=1, max_decays=1)
    for accuracy in (0.5, 0.5, 0.5, 0.5, 0.5):  # no improvement after the first epoch
        plateau.update(accuracy)
    assert plateau.decays == 1  # capped at max_decays


def test_plateau_matches_torchs_reduce_on_plateau_and_reads_its_checkpoints():
    import torch

    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.01)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.1, patience=1, min_lr=1e-5 * (1 - 1e-6)
    )
    plateau = Plateau(factor=0.1, patience=1, max_decays=3)
    for accuracy in (0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3):
        reference.step(accuracy)
        plateau.update(accuracy)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * plateau.multiplier(0))
        restored = Plateau(factor=0.1, patience=1, max_decays=3)
        restored.load_state_dict(reference.state_dict())
        assert restored.state_dict() == plateau.state_dict()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "0:0.1"], "lr must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr", "0.1:0.01"], "range is empty"),
        (["--weight-decay", "0:1e-3"], "log scale"),
        (["--schedule", ""], "choice of schedule is empty"),
        (["--schedule", "plateau,exp"], "unknown schedule 'exp'"),
        (["--global-batch", ""], "choice of global_batch is empty"),
        (["--lr-factor", "0.1,2"], "lr_factor 2.0"),
        (["--scheduler", "hyperband"], "unknown scheduler 'hyperband'"),
        (["--scheduler", "pbt", "--num-samples", "1"], "PBT needs a population"),
        (["--config", "/no/such.yaml"], "cannot read /no/such.yaml"),
    ],
)
def test_bad_search_spaces_give_one_line_errors(argv, message, capsys, tmp_path):
    code = main(["tune", "--manifest", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_search_yaml_merges_over_the_profile(tmp_path):
    from vgg_ray.cli import build_parser, search_config

    path = tmp_path / "search.yaml"
    path.write_text(
        "scheduler: pbt\nnum_samples: 3\nspace:\n  lr: [0.001, 0.01]\n  schedule: cosine\n"
        "  weight_decay: 0.0005\ntrain:\n  epochs: 2\n  data: {crop: 32}\n"
    )
    args = build_parser().parse_args(["tune", "--config", str(path), "--manifest", "m.json",
                                      "--profile", "demo", "--num-samples", "5"])  # fmt: skip
    from_cli = search_config(args)  # profile, then the YAML file, then the command line
    assert (from_cli.scheduler, from_cli.num_samples) == ("pbt", 5)
    assert from_cli.space.weight_decay == (0.0005, 0.0005) and from_cli.train.epochs == 2
    config = SearchConfig.from_dict(
        {"scheduler": "pbt", "space": {"lr": [0.001, 0.01], "schedule": "cosine"},
         "train": {"epochs": 2, "data": {"crop": 32}}},
        SearchConfig(train=demo("A")),
    )  # fmt: skip
    assert config.scheduler == "pbt" and config.space.lr == (0.001, 0.01)
    assert config.space.schedule == ("cosine",) and config.train.epochs == 2
    assert config.train.data.crop == 32 and config.train.width == 1 / 16
    with pytest.raises(ConfigError, match="unknown search option"):
        SearchConfig.from_dict({"space": {"momentum": [0.9]}})


# ------------------------------------------------------------------------------ on Ray

slow = pytest.mark.slow


def test_the_search_server_dies_with_its_driver(tmp_path):
    """A search killed outright (SIGKILL: no `finally` runs) leaves no `mlflow server`."""
    import signal
    import subprocess
    import sys
    import urllib.request

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vgg_ray.stack import serve_mlflow\n"
        f"root = Path({str(tmp_path)!r})\n"
        "store, log = f'sqlite:///{root}/m.db', root / 'log'\n"
        "with serve_mlflow(store, root / 'art', log_path=log) as uri:\n"
        "    print(uri, flush=True)\n"
        "    time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    uri = driver.stdout.readline().strip()
    assert uri.startswith("http://"), f"the server did not start; see {tmp_path / 'log'}"
    urllib.request.urlopen(f"{uri}/health", timeout=5).close()  # it serves
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1).close()
            time.sleep(0.2)
        except OSError:
            return  # gone
    pytest.fail(f"mlflow server at {uri} outlived its driver")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """3 visually distinct classes, 24 training and 8 validation images each."""
    return make_shards(tmp_path_factory.mktemp("data"), classes=3, train_per_class=24,
                       val_per_class=8, size=(40, 48))  # fmt: skip


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One real `mlflow server` (SQLite behind it) for every search of this module."""
    root = tmp_path_factory.mktemp("mlflow")
    with serve_mlflow(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts",
                       log_path=root / "server.log") as uri:  # fmt: skip
        yield uri


def tiny(manifest: str, tmp_path: Path, tracking: str, **overrides) -> SearchConfig:
    train = demo("A", epochs=2, global_batch=24, log_every_steps=100, cpus_per_worker=0.5,
                 tracking_uri=tracking, experiment="tune-tests")  # fmt: skip
    train = replace(train, data=replace(train.data, manifest=manifest, scale=(36, 40),
                                        eval_scale=36, read_cpus=0.5))  # fmt: skip
    space = SearchSpace(lr=(1e-3, 3e-2), weight_decay=(1e-5, 1e-3), global_batch=(24,),
                        schedule=("plateau", "cosine"), lr_factor=(0.1,),
                        lr_patience=(5,))  # fmt: skip
    values = dict(train=train, space=space, num_samples=2, max_concurrent_trials=2,
                  storage_path=str(tmp_path / "searches"), name="s",
                  trial_max_failures=1)  # fmt: skip
    values.update(overrides)
    return SearchConfig(**values)


def _children(tracking: str, parent_run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return client, parent, runs


@slow
def test_asha_stops_a_trial_early_and_mlflow_holds_parent_and_children(
    ray_cluster, manifest, tmp_path, tracking, capsys
):
    # Ranked by val loss: on 24 val images top-1 errors tie often, and ASHA lets a tie go on.
    config = tiny(manifest, tmp_path, tracking, num_samples=4, name="asha", metric="val_loss",
                  train=replace(tiny(manifest, tmp_path, tracking).train, epochs=3))  # fmt: skip
    summary = search(config)
    statuses = [row["status"] for row in summary.rows]
    assert len(statuses) == 4 and "error" not in statuses
    assert "stopped early" in statuses and "finished" in statuses

    client, parent, children = _children(tracking, summary.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == summary.best_trial_id
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv",
        "results.md",
        Path(summary.best_config_path).name,
    }
    assert len(children) == 4
    assert {c.data.tags["vgg_ray.trial_id"] for c in children} == {r["trial"] for r in summary.rows}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["schedule"] in ("plateau", "cosine")
        history = client.get_metric_history(child.info.run_id, "val_top1_error")
        stopped = child.data.tags["vgg_ray.stopped_early"] == "true"
        assert len(history) == (len(history) if stopped else 3) and history

    # The best config is a train config the train jobs read.
    best = Path(summary.best_config_path)
    # The job's own entry point, in process: it joins this test's Ray instead of starting one.
    code = train_main(["--config", str(best), "--epochs", "1", "--storage-path",
                       str(tmp_path / "retrain"), "--run-name", "best", "--tracking-uri", tracking],
                      arch="A")  # fmt: skip
    assert code == 0
    assert "done: val error" in capsys.readouterr().out
    state = ckpt.load_state(sorted((tmp_path / "retrain" / "best").glob("epoch-*"))[-1])
    best_row = next(r for r in summary.rows if r["trial"] == summary.best_trial_id)
    assert state["config"]["lr"] == pytest.approx(best_row["lr"])
    assert state["config"]["schedule"] == best_row["schedule"]


@slow
def test_pbt_trial_continues_from_its_donors_checkpoint_with_the_new_lr(
    ray_cluster, manifest, tmp_path, tracking
):
    # Synchronous PBT: both trials meet at epoch 1, so the step there always perturbs one
    # (asynchronous PBT would depend on the trials' relative speed).
    config = tiny(manifest, tmp_path, tracking, scheduler="pbt", name="pbt", pbt_synch=True,
                  perturbation_interval=1, space=replace(tiny(manifest, tmp_path, tracking).space,
                                                         schedule=("plateau",)),
                  train=replace(tiny(manifest, tmp_path, tracking).train, epochs=2))  # fmt: skip
    summary = search(config)
    policy = (Path(summary.experiment_path) / "pbt_global.txt").read_text().splitlines()
    assert policy, "PBT recorded no perturbation"

    client, _, children = _children(tracking, summary.mlflow_run_id)
    restarted = [c for c in children if "vgg_ray.start_checkpoint" in c.data.tags]
    assert restarted, "no trial started from a checkpoint"
    checked = 0
    for child in restarted:
        start_path = child.data.tags["vgg_ray.start_checkpoint"]
        own_trial = child.data.tags["vgg_ray.trial_id"]
        if own_trial in start_path:
            continue  # a trial restarted from its own checkpoint (not a perturbation)
        donor = ckpt.load_state(start_path)
        epoch = donor["loop"]["epoch"]
        # The recipient's history begins with the donor's epochs, exactly ...
        final = ckpt.load_state(_final_checkpoint(summary, own_trial))
        history = final["loop"]["history"]
        assert [h["train_loss"] for h in history[:epoch]] == [
            h["train_loss"] for h in donor["loop"]["history"]
        ]
        # ... and its next epoch uses the recipient's new lr (plateau never decays here).
        starts = client.get_metric_history(child.info.run_id, "trial_lr")
        new_lr = max(starts, key=lambda m: m.step).value
        assert history[epoch]["lr"] == pytest.approx(new_lr)
        assert new_lr != pytest.approx(donor["config"]["lr"])
        checked += 1
    assert checked, "no trial continued from another trial's checkpoint"


def _final_checkpoint(summary, trial_id: str) -> Path:
    found = sorted(Path(summary.experiment_path).glob(f"*_{trial_id}_*/checkpoint_*"))
    assert found, sorted(p.name for p in Path(summary.experiment_path).iterdir())
    return found[-1]


@slow
def test_a_failed_trial_is_retried_a_diverged_one_is_not_and_the_search_completes(
    ray_cluster, manifest, tmp_path, tracking
):
    markers = str(tmp_path)

    def trial(params, context):
        """Trial 0 raises on its first attempt (a marker file), then runs normally; trial 1
        trains at lr 1e8 and diverges in its first epoch. A local function: Ray ships it by
        value (the trials cannot import this module)."""
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        if trial_id.endswith("00001"):
            params = {**params, "lr": 1e8}
        marker = Path(markers) / trial_id
        if trial_id.endswith("00000") and not marker.exists():
            marker.touch()
            raise RuntimeError("injected trial failure")
        run_trial(params, context)

    config = tiny(manifest, tmp_path, tracking, num_samples=2, name="faults",
                  train=replace(tiny(manifest, tmp_path, tracking).train, epochs=1,
                                max_nonfinite_steps=2))  # fmt: skip
    summary = search(config, driver=trial)
    statuses = {r["trial"][-5:]: r["status"] for r in summary.rows}
    assert statuses == {"00000": "finished", "00001": "diverged"}  # 00000 after its retry
    assert summary.best_trial_id.endswith("00000")
    _, _, children = _children(tracking, summary.mlflow_run_id)
    tags = {c.data.tags["vgg_ray.trial_id"][-5:]: c.data.tags for c in children}
    assert tags["00001"]["vgg_ray.diverged"] == "true"
    assert "vgg_ray.retried" not in tags["00001"]  # ended, not failed: a retry would diverge
    assert all(c.info.status == "FINISHED" for c in children)


@slow
def test_a_resumed_search_does_not_rerun_finished_trials(ray_cluster, manifest, tmp_path,
                                                         tracking):  # fmt: skip
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    config = tiny(manifest, tmp_path, tracking, num_samples=2, max_concurrent_trials=1,
                  name="resume", train=replace(tiny(manifest, tmp_path, tracking).train,
                                               epochs=1))  # fmt: skip
    client = MlflowClient(tracking)

    def interrupt_after_first_trial() -> None:
        """Ctrl-C, as Tune takes it (SIGUSR1: pytest keeps SIGINT), once a trial finished."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("tune-tests")
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string="tags.`vgg_ray.search` = 'resume' AND attributes.status = 'FINISHED'",
            ) if experiment else []  # fmt: skip
            if any("vgg_ray.trial_id" in r.data.tags for r in runs):
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    search(config)
    watcher.join()
    trials = tmp_path / "searches" / "resume-trials"
    runs_before = {p.name for p in trials.iterdir()}
    finished = {r.data.tags["vgg_ray.trial_id"] for r in client.search_runs(
        [client.get_experiment_by_name("tune-tests").experiment_id],
        filter_string="tags.`vgg_ray.search` = 'resume' AND attributes.status = 'FINISHED'")
        if "vgg_ray.trial_id" in r.data.tags}  # fmt: skip
    assert len(finished) == 1

    with pytest.raises(ConfigError, match="already exists"):
        search(config)
    summary = search(config, resume=True)
    assert [r["status"] for r in summary.rows] == ["finished", "finished"]
    runs_after = {p.name for p in trials.iterdir()}
    (done,) = finished
    # The finished trial's Train run is not repeated; the other trial ran (again).
    assert [r for r in runs_after if r.startswith(done)] == [
        r for r in runs_before if r.startswith(done)
    ]
    assert len([r for r in runs_before if r.startswith(done)]) == 1
    _, _, children = _children(tracking, summary.mlflow_run_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # One trial at a time (--max-concurrent-trials 1): the second began after the first ended.
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert first.data.tags["vgg_ray.trial_id"] == done
    assert second.info.start_time >= first.info.end_time
