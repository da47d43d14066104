"""`ray job submit --working-dir . -- python jobs/train_E.py` against a real `ray start --head`
cluster on 127.0.0.1, as users run it against a cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster on loopback, started the way docs/cluster.md says: the project's
    Python first on PATH (a job's entrypoint runs with the head's environment). Token auth is
    off only because nothing but 127.0.0.1 can reach it."""
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="vggray-", dir="/tmp")  # short: Ray's socket paths
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    start = [
        str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={_free_port()}", "--num-cpus=4", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)  # fmt: skip


def test_ray_job_submit_train_e_succeeds(ray_head, tmp_path):
    from vgg_ray.demo import make_demo_tree
    from vgg_ray.prepare import PrepareConfig, prepare

    address, env = ray_head
    tree = make_demo_tree(tmp_path / "tree", classes=2, train_per_class=16, val_per_class=4,
                          size=(40, 48))  # fmt: skip
    manifest = prepare(PrepareConfig(src=str(tree), dest=str(tmp_path / "shards"),
                                     workers=1, progress=False)).manifest  # fmt: skip
    job = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={address}",
        "--working-dir", ".", "--", "python", "jobs/train_E.py",
        f"--manifest={manifest}", "--epochs=1", "--global-batch=16", "--width=0.0625",
        f"--storage-path={tmp_path / 'checkpoints'}", "--run-name=submitted",
        f"--tracking-uri=sqlite:///{tmp_path / 'mlflow.db'}", "--cpus-per-worker=0.5",
    ]  # fmt: skip
    result = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    assert "run 'submitted' done" in result.stdout
    assert list((tmp_path / "checkpoints" / "submitted").glob("epoch-*/state.pt"))
