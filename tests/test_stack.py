"""The local full stack (`vgg-ray stack`): a real Ray head, moto's S3 server and an MLflow server
on loopback, and a training job submitted to it end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_ray import stack
from vgg_ray.cli import main
from vgg_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(state_dir: Path, **overrides) -> stack.StackConfig:
    """Free ports from the ephemeral range: above Ray's worker ports (10002-19999)."""
    ports = {
        f"{name}_port": _free_port()
        for name in ("s3", "mlflow", "ray", "dashboard", "client", "agent")
    }
    return stack.StackConfig(state_dir=state_dir, **{**ports, **overrides})


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"{port} \(mlflow\)"):
            stack.up(_config(tmp_path / "stack", mlflow_port=port))
    assert stack.load(tmp_path / "stack") is None  # nothing started, nothing recorded


def test_down_and_env_without_a_stack(tmp_path, capsys):
    state = str(tmp_path / "none")
    assert main(["stack", "down", "--state-dir", state]) == 0
    assert "no stack running" in capsys.readouterr().out
    assert main(["stack", "env", "--state-dir", state]) == 2
    assert "vgg-ray stack up" in capsys.readouterr().err
    assert main(["stack", "status", "--state-dir", state]) == 1


@pytest.mark.slow
def test_stack_runs_a_submitted_training_job_end_to_end(tmp_path):
    """up; prepare demo shards into its S3; `ray job submit` train_E.py reading from and
    checkpointing to S3 and tracking to its MLflow; down leaves no process behind."""
    import boto3
    from mlflow.tracking import MlflowClient

    from vgg_ray.demo import make_demo_tree
    from vgg_ray.prepare import PrepareConfig, prepare

    state_dir = tmp_path / "stack"
    config = _config(state_dir)
    running = stack.up(config)
    try:
        assert stack.up(config) == running  # a second `up` finds it running
        assert set(stack.status(state_dir).values()) == {True}
        processes = stack.stack_processes(running.id)
        assert set(running.pids.values()) <= set(processes)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env.update(running.env)  # what `eval "$(vgg-ray stack env)"` gives a shell

        saved = dict(os.environ)
        os.environ.update(running.env)
        try:
            tree = make_demo_tree(tmp_path / "tree", classes=2, train_per_class=16,
                                  val_per_class=4, size=(40, 48))  # fmt: skip
            manifest = prepare(PrepareConfig(src=str(tree), dest="s3://vgg-ray/demo",
                                             s3_endpoint=running.s3_endpoint, workers=1,
                                             progress=False)).manifest  # fmt: skip
        finally:
            os.environ.clear()
            os.environ.update(saved)

        job = [
            str(Path(sys.executable).parent / "ray"), "job", "submit",
            f"--address={running.ray_address}", "--working-dir", ".",
            "--", "python", "jobs/train_E.py",
            f"--manifest={manifest}", f"--s3-endpoint={running.s3_endpoint}", "--epochs=1",
            "--global-batch=16", "--width=0.0625", "--storage-path=s3://vgg-ray/checkpoints",
            "--run-name=e2e", f"--tracking-uri={running.tracking_uri}", "--cpus-per-worker=0.5",
        ]  # fmt: skip
        result = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout.lower()

        s3 = boto3.client("s3", endpoint_url=running.s3_endpoint,
                          aws_access_key_id=running.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=running.env["AWS_SECRET_ACCESS_KEY"],
                          region_name="us-east-1")  # fmt: skip
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="vgg-ray")["Contents"]]
        assert [k for k in keys if k.startswith("checkpoints/e2e/") and k.endswith("state.pt")]
        assert [k for k in keys if k.startswith("mlartifacts/")]  # the model, via the server

        client = MlflowClient(running.tracking_uri)
        [run] = client.search_runs(
            [client.get_experiment_by_name("vgg-ray").experiment_id],
            filter_string="tags.`vgg_ray.run_name` = 'e2e'",
        )
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_top1_error", "val_top5_error"} <= set(run.data.metrics)
        assert run.data.tags["best_checkpoint"].startswith("s3://vgg-ray/checkpoints/e2e/")
        model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
        assert model.name == "model"
        assert model.artifact_location.startswith("mlflow-artifacts:/")
        assert [k for k in keys if k.startswith("mlartifacts/") and k.endswith("MLmodel")]
    finally:
        stopped = stack.down(state_dir)
    assert set(stopped) == {"s3", "mlflow", "ray"}
    assert stack.stack_processes(running.id) == []
    assert not any(stack._alive(pid) for pid in processes)
    assert stack.load(state_dir) is None
