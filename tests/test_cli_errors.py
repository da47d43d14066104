"""Bad configuration and user error across every `vgg-ray` command: each bad input gives exit
status 2 and exactly one line on stderr that names the problem, never a traceback.

The table runs in-process through `vgg_ray.cli.main` (fast: every case fails before Ray or a
server starts); a few run through the installed `vgg-ray` console script as a user would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_ray.cli import main

BIN = Path(sys.executable).parent
SECRET = "hunter2"  # a password typed into URLs below: it must never come back on stderr


def _closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Everything the table's commands point at: a tiny prepared data set, a source tree,
    broken files, a free and a held port."""
    from vgg_ray.demo import make_demo_tree
    from vgg_ray.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("cli")
    tree = make_demo_tree(root / "tree", classes=2, train_per_class=3, val_per_class=1,
                          size=(32, 40))  # fmt: skip
    manifest = prepare(PrepareConfig(src=str(tree), dest=str(root / "shards"), workers=1,
                                     progress=False)).manifest  # fmt: skip
    (root / "notrain").mkdir()
    (root / "oneclass" / "train" / "n00000001").mkdir(parents=True)
    (root / "badshape").mkdir()
    (root / "badshape" / "manifest.json").write_text(
        json.dumps({"format": "vgg-ray-shards/1", "classes": ["a", "b"], "splits": {}, "stats": {}})
    )
    (root / "badjson").mkdir()
    (root / "badjson" / "manifest.json").write_text("{not json")
    (root / "unknown.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    (root / "list.yaml").write_text("- epochs\n- 2\n")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (root / "a-file").write_text("x")
    yamls = {"epochs-str": "epochs: many\n", "crop-str": "data: {crop: big}\n",
             "lr-bool": "lr: true\n", "data-int": "data: 5\n", "epochs-list": "epochs: [1, 2]\n",
             "scale-list": "data: {scale: [256, x]}\n", "gpus-str": "gpus_per_worker: x\n",
             "space-str": "space: {lr: [a, 0.1]}\n", "space-int": "space: 3\n",
             "search-train": "train: {epochs: x}\n", "search-bool": "num_samples: true\n",
    }  # fmt: skip
    for name, text in yamls.items():
        (root / f"{name}.yaml").write_text(text)
    _truncated_copy(Path(manifest).parent, root / "truncated")
    _broken_copies(Path(manifest).parent, root)
    _checkpoint(root / "ckpt", Path(manifest).parent)
    return {
        "root": str(root),
        "tree": str(tree),
        "manifest": manifest,
        "closed": f"http://127.0.0.1:{_closed_port()}",
    }


def _truncated_copy(shards: Path, dest: Path) -> None:
    """The prepared data set with its first val shard cut short."""
    import json
    import shutil

    shutil.copytree(shards, dest)
    first = json.loads((dest / "manifest.json").read_text())["splits"]["val"]["shards"][0]
    path = dest / first["path"]
    path.write_bytes(path.read_bytes()[: first["bytes"] // 2])


def _broken_copies(shards: Path, root: Path) -> None:
    """Copies of the prepared data set whose first train shard is missing, or garbage of the
    size the manifest records."""
    import json
    import shutil

    for name in ("missing", "garbage"):
        shutil.copytree(shards, root / name)
        first = json.loads((root / name / "manifest.json").read_text())["splits"]["train"]
        path = root / name / first["shards"][0]["path"]
        if name == "missing":
            path.unlink()
        else:
            path.write_bytes(b"\x07" * path.stat().st_size)


def _checkpoint(directory: Path, shards: Path) -> None:
    """A checkpoint of an untrained narrow net A for the prepared data set's classes."""
    import dataclasses

    from vgg_ray.checkpoint import save_state
    from vgg_ray.config import demo
    from vgg_ray.manifest import load_manifest
    from vgg_ray.models import build_vgg

    manifest = load_manifest(str(shards))
    model = build_vgg("A", num_classes=len(manifest.classes), width=1 / 16, init="glorot")
    directory.mkdir()
    save_state(directory, {
        "arch": "A", "width": 1 / 16, "classes": list(manifest.wnids),
        "config": demo("A").to_dict(), "data_stats": dataclasses.asdict(manifest.stats),
        "model": model.state_dict(),
    })  # fmt: skip


# (name, argv, a fragment the error line must contain). {root}, {tree}, {manifest}, {closed}
# are filled from `world`; TRAIN is prepended to the train cases so none of them reaches Ray.
TRAIN = ["train", "--manifest", "{manifest}", "--storage-path", "{root}/ckpt",
         "--tracking-uri", "sqlite:///{root}/mlflow.db"]  # fmt: skip
CASES = [
    # train: argparse
    ("train unknown arch", ["train", "--arch", "Z"], "invalid choice: 'Z'"),
    ("train epochs not a number", ["train", "--epochs", "ten"], "invalid int value: 'ten'"),
    ("train scale not a range", ["train", "--scale", "big"], "not a scale or range"),
    ("train unknown decoder", ["train", "--decode", "tpu"], "invalid choice: 'tpu'"),
    ("train unknown option", ["train", "--learning-rate", "1"], "unrecognized arguments"),
    # train: the config's checks
    ("train zero epochs", [*TRAIN, "--epochs", "0"], "epochs must be >= 1"),
    ("train negative lr", [*TRAIN, "--lr", "-0.1"], "lr must be > 0"),
    ("train zero width", [*TRAIN, "--width", "0"], "width must be > 0"),
    ("train batch not divisible", [*TRAIN, "--global-batch", "10", "--workers", "3"],
     "not divisible"),
    ("train zero grad accum", [*TRAIN, "--grad-accum", "0"], "grad accumulation must be >= 1"),
    ("train zero keep-best", [*TRAIN, "--keep-best", "0"], "keep_best must be >= 1"),
    ("train negative checkpoint steps", [*TRAIN, "--checkpoint-every-steps", "-1"],
     "checkpoint_every_steps must be >= 0"),
    ("train max failures", [*TRAIN, "--max-failures", "-5"], "max failures must be >= 0"),
    ("train scale reversed", [*TRAIN, "--scale", "512-256"], "Smin <= Smax"),
    ("train crop above scale", [*TRAIN, "--scale", "64", "--crop", "100"], "crop"),
    ("train eval scale below crop", [*TRAIN, "--crop", "224", "--eval-scale", "100"],
     "eval scale"),
    ("train init missing", [*TRAIN, "--init", "{root}/nope.pt"], "nope.pt"),
    ("train run name escapes", [*TRAIN, "--run-name", "../../etc"], "run name"),
    ("train run name quote", [*TRAIN, "--run-name", "it's"], "run name"),
    ("train config missing", [*TRAIN, "--config", "{root}/nope.yaml"], "nope.yaml"),
    ("train config unknown key", [*TRAIN, "--config", "{root}/unknown.yaml"],
     "unknown training option(s): learning_rate"),
    ("train config not a mapping", [*TRAIN, "--config", "{root}/list.yaml"], "list.yaml"),
    # train: a YAML value of the wrong type names its key
    ("train config str for int", [*TRAIN, "--config", "{root}/epochs-str.yaml"],
     "config: epochs must be an int, got 'many'"),
    ("train config nested str", [*TRAIN, "--config", "{root}/crop-str.yaml"],
     "config: data.crop must be an int, got 'big'"),
    ("train config bool for float", [*TRAIN, "--config", "{root}/lr-bool.yaml"],
     "config: lr must be a number, got True"),
    ("train config data not a mapping", [*TRAIN, "--config", "{root}/data-int.yaml"],
     "config: data must be a mapping"),
    ("train config list for int", [*TRAIN, "--config", "{root}/epochs-list.yaml"],
     "config: epochs must be an int, got [1, 2]"),
    ("train config bad scale", [*TRAIN, "--config", "{root}/scale-list.yaml"],
     "config: data.scale must be a list of 2 ints"),
    ("train config optional", [*TRAIN, "--config", "{root}/gpus-str.yaml"],
     "config: gpus_per_worker must be a number or null"),
    # train: numbers the config refuses
    ("train negative seed", [*TRAIN, "--seed", "-1"], "seed must be >= 0"),
    ("train negative gpus", [*TRAIN, "--gpus-per-worker", "-1"], "GPUs and CPUs per worker"),
    ("train zero log steps", [*TRAIN, "--log-every-steps", "0"], "log_every_steps must be >= 1"),
    # train: elastic worker ranges that cannot be
    ("train workers reversed", [*TRAIN, "--workers", "3-2"], "the fewest workers is more than"),
    ("train workers from zero", [*TRAIN, "--workers", "0-2"], "workers must be >= 1"),
    ("train workers not a range", [*TRAIN, "--workers", "2-x"], "not a worker count like"),
    ("train batch below workers", [*TRAIN, "--workers", "2-8", "--global-batch", "4"],
     "cannot give each of up to 8 workers an image"),
    # credentials: refused in endpoint and tracking URIs, and never printed back
    ("train s3 endpoint credentials", [*TRAIN, "--manifest", "s3://b/x", "--s3-endpoint",
                                       f"http://user:{SECRET}@127.0.0.1:9000"],
     "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"),
    ("train tracking credentials", [*TRAIN, "--tracking-uri", f"https://u:{SECRET}@mlflow.x"],
     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("train message redacted", [*TRAIN, "--init", f"http://u:{SECRET}@h/net.pt"],
     "http://***@h/net.pt"),
    ("train usage error redacted", ["train", "--arch", f"http://u:{SECRET}@h"], "http://***@h"),
    # train: data, storage and tracking that are not there
    ("train manifest missing", [*TRAIN, "--manifest", "{root}/nowhere"], "cannot read manifest"),
    ("train manifest not json", [*TRAIN, "--manifest", "{root}/badjson"], "not valid JSON"),
    ("train manifest no bucket", [*TRAIN, "--manifest", "s3:///shards"], "no bucket name"),
    ("train s3 unreachable", [*TRAIN, "--manifest", "s3://b/shards", "--s3-endpoint", "{closed}"],
     "cannot reach S3 endpoint"),
    ("train s3 endpoint scheme", [*TRAIN, "--manifest", "s3://b/x", "--s3-endpoint", "ftp://h"],
     "is not of the form"),
    ("train resume unknown run", [*TRAIN, "--resume", "--run-name", "ghost"],
     "no run 'ghost'"),
    ("train mlflow unreachable", [*TRAIN, "--tracking-uri", "{closed}"], "cannot reach MLflow"),
    # prepare
    ("prepare no arguments", ["prepare"], "the following arguments are required"),
    ("prepare src missing", ["prepare", "{root}/nope", "{root}/out"], "does not exist"),
    ("prepare src without train", ["prepare", "{root}/notrain", "{root}/out"],
     "has no train/ folder"),
    ("prepare bad shard size", ["prepare", "{tree}", "{root}/out", "--shard-size", "huge"],
     "not a size"),
    ("prepare one class", ["prepare", "{root}/oneclass", "{root}/out"], "one class folder"),
    ("prepare zero workers", ["prepare", "{tree}", "{root}/out", "--workers", "0"],
     "must be positive"),
    ("prepare class names missing", ["prepare", "{tree}", "{root}/out", "--class-names",
                                     "{root}/names.txt"], "names.txt does not exist"),
    ("prepare negative stats sample", ["prepare", "{tree}", "{root}/out", "--stats-sample", "-3"],
     "argument --stats-sample: must be >= 1"),
    ("prepare negative seed", ["prepare", "{tree}", "{root}/out", "--seed", "-1"],
     "argument --seed: must be >= 0"),
    ("prepare s3 unreachable", ["prepare", "{tree}", "s3://b/x", "--s3-endpoint", "{closed}"],
     "cannot reach S3 endpoint"),
    ("prepare dest under a file", ["prepare", "{tree}", "{root}/a-file/out", "--workers", "1"],
     "a-file"),
    # demo-data
    ("demo-data zero classes", ["demo-data", "{root}/demo", "--classes", "0"], "classes"),
    ("demo-data negative count", ["demo-data", "{root}/demo", "--train-per-class", "-1"],
     "per class"),
    ("demo-data negative seed", ["demo-data", "{root}/demo", "--seed", "-1"], "must be >= 0"),
    ("demo-data dest under a file", ["demo-data", "{root}/a-file/demo"], "a-file"),
    # verify
    ("verify no manifest given", ["verify"], "the following arguments are required: manifest"),
    ("verify manifest missing", ["verify", "{root}/nowhere"], "cannot read manifest"),
    ("verify s3 unreachable", ["verify", "s3://b/x", "--s3-endpoint", "{closed}"],
     "cannot reach S3 endpoint"),
    ("verify s3 endpoint credentials", ["verify", "s3://b/x", "--s3-endpoint",
                                        f"http://k:{SECRET}@h:9000"], "AWS_SECRET_ACCESS_KEY"),
    # tune, register, register-ensemble, promote, rollback
    ("tune unknown option", ["tune", "--bogus"], "unrecognized arguments: --bogus"),
    # tune's pre-flight is train's, before its mlflow server or Ray starts (seconds, not a hang)
    ("tune manifest missing", ["tune", "--manifest", "{root}/nowhere",
                               "--tracking-uri", "sqlite:///{root}/tune.db"],
     "cannot read manifest"),
    ("tune mlflow unreachable", ["tune", "--manifest", "{manifest}", "--tracking-uri", "{closed}"],
     "cannot reach MLflow"),
    ("tune shard garbage", ["tune", "--manifest", "{root}/garbage",
                            "--tracking-uri", "sqlite:///{root}/tune.db"],
     "is not a readable Parquet file"),
    ("tune zero epochs", ["tune", "--epochs", "0"], "epochs must be >= 1"),
    ("tune negative seed", ["tune", "--seed", "-1"], "argument --seed: must be >= 0"),
    ("tune tracking credentials", ["tune", "--tracking-uri", f"http://u:{SECRET}@h:5000"],
     "MLFLOW_TRACKING_PASSWORD"),
    ("tune config space value", ["tune", "--config", "{root}/space-str.yaml"],
     "config: space.lr must be a number, got 'a'"),
    ("tune config space not a mapping", ["tune", "--config", "{root}/space-int.yaml"],
     "config: space must be a mapping"),
    ("tune config train value", ["tune", "--config", "{root}/search-train.yaml"],
     "config: train.epochs must be an int, got 'x'"),
    ("tune config bool for int", ["tune", "--config", "{root}/search-bool.yaml"],
     "config: num_samples must be an int, got True"),
    ("register bad name", ["register", "--name", "a/b'c", "--run", "0" * 32, "--tracking-uri",
                           "sqlite:///{root}/mlflow.db"], "registered model name \"a/b'c\""),
    ("register-ensemble bad name", ["register-ensemble", "--name", ".hidden", "--member", "x",
                                    "--tracking-uri", "sqlite:///{root}/mlflow.db"],
     "must not start with '.'"),
    ("promote bad name", ["promote", "a b", "--tracking-uri", "sqlite:///{root}/mlflow.db"],
     "registered model name 'a b' may hold only"),
    ("rollback bad name", ["rollback", "x'y", "--tracking-uri", "sqlite:///{root}/mlflow.db"],
     "registered model name"),
    ("register no run", ["register", "--tracking-uri", "sqlite:///{root}/mlflow.db"],
     "no run given"),
    ("register unknown run", ["register", "--run", "0" * 32, "--tracking-uri",
                              "sqlite:///{root}/mlflow.db"], "no MLflow run 000"),
    ("register-ensemble unknown mode", ["register-ensemble", "--mode", "x"],
     "invalid choice: 'x'"),
    ("register-ensemble no member", ["register-ensemble", "--tracking-uri",
                                     "sqlite:///{root}/mlflow.db"], "at least one member"),
    ("promote unknown model", ["promote", "nope", "--tracking-uri", "sqlite:///{root}/mlflow.db"],
     "no registered model 'nope'"),
    ("promote margin not a number", ["promote", "nope", "--margin", "big"],
     "invalid float value: 'big'"),
    ("rollback unknown model", ["rollback", "nope", "--tracking-uri",
                                "sqlite:///{root}/mlflow.db"], "no registered model 'nope'"),
    # models
    ("models extra argument", ["models", "--arch", "E"], "unrecognized arguments"),
    # stack
    ("stack unknown action", ["stack", "launch"], "invalid choice: 'launch'"),
    ("stack env without a stack", ["stack", "env", "--state-dir", "{root}/nostack"],
     "no stack recorded"),
    ("stack zero cpus", ["stack", "up", "--state-dir", "{root}/st", "--num-cpus", "0"],
     "argument --num-cpus: must be >= 1"),
    ("stack port out of range", ["stack", "up", "--state-dir", "{root}/st", "--s3-port", "70000"],
     "70000"),
    # reproduce
    ("reproduce unknown net", ["reproduce", "--manifest", "{manifest}", "--nets", "A,X"],
     "unknown net(s) X"),
    ("reproduce unknown stage", ["reproduce", "--manifest", "{manifest}",
                                 "--stages", "E-1024"], "unknown stage(s) E-1024"),
    ("reproduce negative concurrency", ["reproduce", "--manifest", "{manifest}",
                                        "--max-concurrent", "-2"],
     "max_concurrent must be >= 0"),
    # evaluate
    ("evaluate no model", ["evaluate"], "no model given"),
    ("evaluate zero actors", ["evaluate", "--model", "x", "--actors", "0"], "must be >= 1"),
    ("evaluate checkpoint missing", ["evaluate", "--model", "{root}/nope"], "no checkpoint"),
    # the driver's pre-flight: caught in seconds, before any worker (or run) exists
    ("train crop below five pools", [*TRAIN, "--crop", "7", "--scale", "8"], "crop must be >= 32"),
    ("train shard missing", [*TRAIN, "--manifest", "{root}/missing"], "is missing"),
    ("train shard garbage", [*TRAIN, "--manifest", "{root}/garbage"],
     "is not a readable Parquet file"),
    ("train small profile shard garbage", [*TRAIN, "--profile", "small", "--manifest",
                                           "{root}/garbage"], "is not a readable Parquet file"),
    ("train shard truncated", [*TRAIN, "--manifest", "{root}/truncated"],
     "bytes, the manifest says"),
    ("train init unknown model", [*TRAIN, "--init", "models:/nope/1"], "models:/nope/1"),
    ("train init garbage", [*TRAIN, "--init", "{root}/garbage.pt"], "not a PyTorch checkpoint"),
    ("train storage path a file", [*TRAIN, "--storage-path", "{root}/a-file"],
     "is not a usable folder"),
    ("train manifest wrong shape", [*TRAIN, "--manifest", "{root}/badshape"],
     "expected a JSON object with"),
    ("evaluate checkpoint garbage", ["evaluate", "--model", "{root}/garbage.pt"],
     "not a PyTorch checkpoint"),
    ("evaluate unknown mode", ["evaluate", "--model", "x", "--mode", "tencrop"],
     "invalid choice: 'tencrop'"),
    ("evaluate bad scales", ["evaluate", "--model", "x", "--scales", "256,big"], "not scales"),
    ("evaluate negative max images", ["evaluate", "--model", "x", "--max-images", "-1"],
     "max_images must be >= 0"),
    ("evaluate negative gpus", ["evaluate", "--model", "x", "--gpus-per-actor", "-1"],
     "argument --gpus-per-actor: must be >= 0"),
    ("evaluate truncated shard", ["evaluate", "--model", "{root}/ckpt", "--manifest",
                                  "{root}/truncated", "--no-mlflow", "--output", "{root}/eval"],
     "bytes, the manifest says"),
    ("evaluate unknown registered model", ["evaluate", "--model", "models:/nope/1",
                                           "--tracking-uri", "sqlite:///{root}/mlflow.db"],
     "no registered model models:/nope/1"),
]  # fmt: skip


def _fill(argv: list[str], world: dict[str, str]) -> list[str]:
    return [arg.format(**world) for arg in argv]


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, world, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VGG_RAY_HOME", str(tmp_path / "home"))  # nothing lands in the cwd
    monkeypatch.setenv("RAY_ADDRESS", "")  # were Ray reached (a bug), never a shared cluster
    code = main(_fill(argv, world))
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, fragment)
    assert SECRET not in err, err


def test_a_failed_preflight_leaves_no_run_folder_and_no_mlflow_run(world, tmp_path, capsys):
    """A run that cannot start leaves nothing that would block its name or clutter MLflow."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["train", "--manifest", world["manifest"], "--storage-path", str(tmp_path / "runs"),
            "--tracking-uri", store, "--run-name", "blocked"]  # fmt: skip
    for bad in (["--manifest", f"{world['root']}/garbage"], ["--init", "models:/nope/1"],
                ["--crop", "7", "--scale", "8"]):  # fmt: skip
        assert main([*base, *bad]) == 2
    capsys.readouterr()
    assert not (tmp_path / "runs" / "blocked").exists()
    client = MlflowClient(store)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "--manifest", "{root}/nowhere", "--epochs", "1"], "cannot read manifest"),
        (["prepare", "{root}/nope", "{root}/out"], "does not exist"),
        (["evaluate", "--model", "{root}/garbage.pt"], "cannot load checkpoint"),
    ],
    ids=["train", "prepare", "evaluate"],
)
def test_the_console_script_prints_one_line(argv, fragment, world, tmp_path):
    result = subprocess.run(
        [str(BIN / "vgg-ray"), *_fill(argv, world)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "VGG_RAY_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    _assert_one_line_error(result.returncode, result.stderr, fragment)
