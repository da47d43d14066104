"""Bad configuration and user error across every `vgg-ray` command: each bad input gives exit
status 2 and exactly one line on stderr that names the problem, never a traceback.

The table runs in-process through `vgg_ray.cli.main` (fast: every case fails before Ray or a
server starts); a few run through the installed `vgg-ray` console script as a user would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_ray.cli import main

BIN = Path(sys.executable).parent


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
    (root / "badjson").mkdir()
    (root / "badjson" / "manifest.json").write_text("{not json")
    (root / "unknown.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    (root / "list.yaml").write_text("- epochs\n- 2\n")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (root / "a-file").write_text("x")
    return {
        "root": str(root),
        "tree": str(tree),
        "manifest": manifest,
        "closed": f"http://127.0.0.1:{_closed_port()}",
    }


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
    ("prepare s3 unreachable", ["prepare", "{tree}", "s3://b/x", "--s3-endpoint", "{closed}"],
     "cannot reach S3 endpoint"),
    ("prepare dest under a file", ["prepare", "{tree}", "{root}/a-file/out", "--workers", "1"],
     "a-file"),
    # demo-data
    ("demo-data zero classes", ["demo-data", "{root}/demo", "--classes", "0"], "classes"),
    ("demo-data negative count", ["demo-data", "{root}/demo", "--train-per-class", "-1"],
     "per class"),
    ("demo-data dest under a file", ["demo-data", "{root}/a-file/demo"], "a-file"),
    # verify
    ("verify no manifest given", ["verify"], "the following arguments are required: manifest"),
    ("verify manifest missing", ["verify", "{root}/nowhere"], "cannot read manifest"),
    ("verify s3 unreachable", ["verify", "s3://b/x", "--s3-endpoint", "{closed}"],
     "cannot reach S3 endpoint"),
    # tune, register, register-ensemble, promote, rollback
    ("tune unknown option", ["tune", "--bogus"], "unrecognized arguments: --bogus"),
    ("tune zero epochs", ["tune", "--epochs", "0"], "epochs must be >= 1"),
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
    ("evaluate checkpoint garbage", ["evaluate", "--model", "{root}/garbage.pt"],
     "cannot load checkpoint"),
    ("evaluate unknown mode", ["evaluate", "--model", "x", "--mode", "tencrop"],
     "invalid choice: 'tencrop'"),
    ("evaluate bad scales", ["evaluate", "--model", "x", "--scales", "256,big"], "not scales"),
    ("evaluate negative max images", ["evaluate", "--model", "x", "--max-images", "-1"],
     "max_images must be >= 0"),
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
    _assert_one_line_error(code, capsys.readouterr().err, fragment)


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
