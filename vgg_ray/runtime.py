"""Connecting to Ray the way the embedded default and `ray job submit` both need."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import ray


def _live_local_cluster() -> str | None:
    """The address of the cluster `ray start` recorded in /tmp/ray, if its head still answers.
    Plain `ray.init()` would hang on a stale record (a crashed or killed head)."""
    record = Path("/tmp/ray/ray_current_cluster")
    try:
        address = record.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError):
        return None


def connect(*, num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS when set (as under `ray job submit`), else a live cluster `ray start`
    left on this machine, else start a local one (`start_local`)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or _live_local_cluster()
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    start_local(num_cpus=num_cpus)


def start_local(*, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """A Ray of this process alone, on 127.0.0.1. It gets at least 4 logical CPUs: on a 2-core
    machine the training workers would otherwise take every CPU and Ray Data's decode tasks
    would wait forever (DESIGN.md).

    It keeps to a temp folder of its own (RAY_TMPDIR, inherited by all its processes) and
    records its address there: Ray Train's placement-group cleaner finds "its" cluster by that
    record, and with other Ray instances on the machine it would otherwise ask theirs whether
    our controller lives, hear no, and remove the run's placement group mid-training. The
    collective's sockets stay on loopback too (torch's Gloo and NCCL interface settings)."""
    own = own_temp_dir()
    ray.init(
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        # The dashboard also serves the state API that Ray Train's placement-group cleaner polls;
        # without it, every run ends in a stream of "Failed to query ... actor state" warnings.
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=str(own),
    )
    record_address(own)


def own_temp_dir() -> Path:
    """A Ray temp folder of this process's own (inherited by every Ray process it starts), and
    the collective's sockets on loopback: for `start_local` and for a loopback multi-node
    cluster (`ray.cluster_utils.Cluster`, the elastic tests)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    own = Path(tempfile.mkdtemp(prefix="vgg-ray-", dir="/tmp")) / "ray"  # short: socket paths
    os.environ["RAY_TMPDIR"] = str(own.parent)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return own


def record_address(own: Path) -> None:
    """Write the connected cluster's address into `own` as `ray start` does into /tmp/ray."""
    from ray._private.utils import write_ray_address

    write_ray_address(ray.get_runtime_context().gcs_address, str(own))
