"""Connecting to Ray the way the embedded default and `ray job submit` both need."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray


def _live_local_cluster() -> str | None:
    """The address of the cluster recorded in /tmp/ray, if its head still answers. Plain
    `ray.init()` would hang on a stale record (a crashed or killed head)."""
    record = Path("/tmp/ray/ray_current_cluster")
    try:
        address = record.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError):
        return None


def connect(*, num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS when set (as under `ray job submit`), else a live local cluster, else
    start a local one on 127.0.0.1. A local Ray gets at least 4 logical CPUs: on a 2-core
    machine the training workers would otherwise take every CPU and Ray Data's decode tasks
    would wait forever (DESIGN.md)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or _live_local_cluster()
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        # The dashboard also serves the state API that Ray Train's placement-group cleaner polls;
        # without it, every run ends in a stream of "Failed to query ... actor state" warnings.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
    )
