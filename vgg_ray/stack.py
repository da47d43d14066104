"""The local full stack: on one machine, a Ray head, an S3-compatible endpoint and an MLflow
server, wired together the way a cluster is (docs/cluster.md).

    vgg-ray stack up      # start all three, wait until each answers, print `export ...` lines
    vgg-ray stack env     # print those lines again
    vgg-ray stack status  # which component is up
    vgg-ray stack down    # stop all three and check that no process of theirs is left

The S3 endpoint is moto's server (the only S3 protocol server a pip install brings): it keeps
objects in memory, so data goes when the stack goes down. On a real machine point the same
environment at MinIO or S3 instead. MLflow keeps runs in SQLite in the state folder and model
artifacts on that S3 (`--artifacts-destination`), proxied through the server, so clients need no
S3 access to log models.

Every process runs detached in its own session, with its log in `<state>/logs/` and its pid in
`<state>/stack.json`. Each is started with a marker variable (VGG_RAY_STACK=<id>) in its
environment, which every child inherits: `down` finds stragglers by that marker (Ray workers,
job drivers in their own sessions) instead of by name, so other Ray clusters on the machine
(other users, tests) are left alone. That is also why `down` does not call `ray stop`, which
stops every Ray process of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vgg_ray.config import default_home
from vgg_ray.errors import ConfigError
from vgg_ray.tracking import server_environment

MARKER = "VGG_RAY_STACK"
STATE_FILE = "stack.json"
# moto accepts any key pair; these only have to look like AWS keys to the SDKs.
FAKE_ACCESS_KEY = "AKIAVGGRAYSTACK00000"
FAKE_SECRET_KEY = "vgg-ray-local-stack-not-a-secret"
REGION = "us-east-1"
COMPONENTS = ("s3", "mlflow", "ray")


def default_state_dir() -> Path:
    return default_home() / "stack"


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it takes."""

    state_dir: Path = field(default_factory=default_state_dir)
    """pids, logs, the MLflow database and the Ray token; `VGG_RAY_HOME/stack` by default."""
    host: str = "127.0.0.1"
    """Everything binds to loopback only: nothing here is meant to face a network."""
    s3_port: int = 9000
    """The S3 endpoint (MinIO's usual port)."""
    mlflow_port: int = 5000
    """The MLflow tracking server and registry."""
    ray_port: int = 6379
    """Ray's GCS: what `ray.init(address=...)` and worker nodes join."""
    dashboard_port: int = 8265
    """Ray dashboard and job API: what `ray job submit --address` talks to."""
    client_port: int = 10001
    """Ray Client server (ray://)."""
    agent_port: int = 52365
    """The head's dashboard agent (job drivers run under it); fixed by Ray unless given."""
    num_cpus: int = field(default_factory=lambda: max(4, os.cpu_count() or 1))
    """Logical CPUs of the head: at least 4, or on a 2-core machine the training workers take
    every CPU and Ray Data's decode tasks wait forever (DESIGN.md)."""
    bucket: str = "vgg-ray"
    """Created on `up`; holds shards, checkpoints and MLflow's artifacts (mlartifacts/)."""
    token_auth: bool = True
    """Ray token authentication; clients read the token from RAY_AUTH_TOKEN_PATH."""
    timeout_s: float = 180.0
    """How long `up` waits for each component to answer."""

    def __post_init__(self) -> None:
        if bad := [f"{port} ({name})" for name, port in self.ports().items()
                   if not 1 <= port <= 65535]:  # fmt: skip
            raise ConfigError(f"port(s) out of range 1-65535: {', '.join(bad)}")

    def ports(self) -> dict[str, int]:
        return {
            "s3": self.s3_port,
            "mlflow": self.mlflow_port,
            "ray": self.ray_port,
            "ray dashboard": self.dashboard_port,
            "ray client": self.client_port,
            "ray dashboard agent": self.agent_port,
        }


@dataclass(frozen=True)
class Stack:
    """A running stack as recorded in `<state>/stack.json`."""

    id: str
    state_dir: str
    pids: dict[str, int]
    env: dict[str, str]
    """What clients export to use the stack (printed by `up` and `env`)."""
    ray_temp_dir: str

    @property
    def s3_endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def ray_address(self) -> str:
        return self.env["RAY_ADDRESS"]

    def exports(self) -> str:
        return "".join(f"export {k}={v}\n" for k, v in self.env.items())


# ------------------------------------------------------------------------------ processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def stack_processes(stack_id: str) -> list[int]:
    """Live pids whose environment carries this stack's marker (Linux /proc)."""
    marker = f"{MARKER}={stack_id}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's process
            continue
    return sorted(found)


def _spawn(name: str, command: list[str], env: dict[str, str], logs: Path) -> int:
    """Start `command` detached (own session, so a terminal's Ctrl-C does not reach it)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid


def _check_ports(config: StackConfig) -> None:
    taken = []
    for name, port in config.ports().items():
        with socket.socket() as probe:
            try:
                probe.bind((config.host, port))
            except OSError:
                taken.append(f"{port} ({name})")
    if taken:
        raise ConfigError(
            f"port(s) in use on {config.host}: {', '.join(taken)}; stop what holds them or "
            "choose other ports (vgg-ray stack up --help)"
        )


def _wait_http(
    name: str, url: str, pid: int, log: Path, timeout_s: float, headers: dict | None = None
) -> None:
    """Poll `url` until it answers 200; fail early when the process has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise ConfigError(f"{name} exited during start-up; see {log}")
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ConfigError(f"{name} did not answer at {url} within {timeout_s:.0f} s; see {log}")


# ------------------------------------------------------------------------------ up / down


def load(state_dir: Path | str | None = None) -> Stack | None:
    path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        return Stack(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def status(state_dir: Path | str | None = None) -> dict[str, bool]:
    """Which components' processes are alive (empty when no stack is recorded)."""
    stack = load(state_dir)
    return {name: _alive(pid) for name, pid in stack.pids.items()} if stack else {}


def up(config: StackConfig | None = None) -> Stack:
    """Start the stack and wait until every component answers. Idempotent: a stack that is
    already up in this state folder is returned as is."""
    config = config or StackConfig()
    state_dir = config.state_dir.resolve()
    running = load(state_dir)
    if running:
        alive = status(state_dir)
        if all(alive.values()):
            return running
        gone = ", ".join(name for name, ok in alive.items() if not ok)
        raise ConfigError(
            f"the stack in {state_dir} is partly down ({gone}); run `vgg-ray stack down` first"
        )
    _check_ports(config)
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    stack_id = uuid.uuid4().hex[:12]
    bin_dir = Path(sys.executable).parent
    s3 = f"http://{config.host}:{config.s3_port}"
    env = {
        "RAY_ADDRESS": f"http://{config.host}:{config.dashboard_port}",
        "MLFLOW_TRACKING_URI": f"http://{config.host}:{config.mlflow_port}",
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # no 1 s metadata-service probe per client
    }
    token_path = state_dir / "ray_auth_token"
    if config.token_auth:
        token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token` would make
        token_path.chmod(0o600)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    base.update(env, **{MARKER: stack_id})
    # A job's entrypoint runs with the head's environment: the project's Python first on PATH,
    # or `python jobs/train_E.py` will not find the package (DESIGN.md).
    base["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    base.pop("RAY_ADDRESS")  # the head must not try to join itself
    ray_temp_dir = tempfile.mkdtemp(prefix="vggray-", dir="/tmp")  # short: Ray's socket paths

    pids: dict[str, int] = {}
    stack = Stack(stack_id, str(state_dir), pids, env, ray_temp_dir)
    try:
        pids["s3"] = _spawn(
            "s3",
            [sys.executable, "-m", "moto.server", "-H", config.host, "-p", str(config.s3_port)],
            base,
            logs,
        )
        _save(stack)  # from here on `down` can clean up whatever started
        _wait_http("S3 (moto)", f"{s3}/moto-api/", pids["s3"], logs / "s3.log", config.timeout_s)
        _create_bucket(s3, config.bucket)

        mlflow_env = {**base, **server_environment(MLFLOW_S3_ENDPOINT_URL=s3)}
        pids["mlflow"] = _spawn(
            "mlflow",
            mlflow_server_command(f"sqlite:///{state_dir / 'mlflow.db'}",
                                  f"s3://{config.bucket}/mlartifacts", config.host,
                                  config.mlflow_port),
            mlflow_env,
            logs,
        )  # fmt: skip
        pids["ray"] = _spawn(
            "ray",
            [
                str(bin_dir / "ray"), "start", "--head", "--block",
                f"--node-ip-address={config.host}", f"--port={config.ray_port}",
                f"--dashboard-host={config.host}", f"--dashboard-port={config.dashboard_port}",
                f"--ray-client-server-port={config.client_port}",
                f"--dashboard-agent-listen-port={config.agent_port}",
                f"--num-cpus={config.num_cpus}", f"--temp-dir={ray_temp_dir}",
                "--disable-usage-stats",
            ],
            dict(
                base,
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single-node mode on loopback
                # On SIGTERM the head would first wait up to 30 s for its node to drain (for
                # Ray Serve replicas); a one-node stack has nothing to hand traffic over to.
                RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            ),
            logs,
        )  # fmt: skip
        _save(stack)
        _wait_http(
            "MLflow",
            f"{env['MLFLOW_TRACKING_URI']}/health",
            pids["mlflow"],
            logs / "mlflow.log",
            config.timeout_s,
        )
        headers = {"Authorization": f"Bearer {token_path.read_text()}"} if config.token_auth else {}
        # The job API answers only once the head's dashboard agent is up: wait for it, not just
        # for the GCS, or the first `ray job submit` races the start-up.
        _wait_http(
            "Ray",
            f"{env['RAY_ADDRESS']}/api/jobs/",
            pids["ray"],
            logs / "ray.log",
            config.timeout_s,
            headers,
        )
    except BaseException:
        down(state_dir)
        raise
    return stack


def _save(stack: Stack) -> None:
    path = Path(stack.state_dir) / STATE_FILE
    path.write_text(json.dumps(asdict(stack), indent=2))


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=FAKE_ACCESS_KEY,
        aws_secret_access_key=FAKE_SECRET_KEY,
        region_name=REGION,
    )
    client.create_bucket(Bucket=bucket)


def down(state_dir: Path | str | None = None, *, timeout_s: float = 60.0) -> list[str]:
    """Stop every process of the stack; return what was stopped. Raises ConfigError when a
    process survives SIGKILL (which only a process stuck in the kernel does)."""
    stack = load(state_dir)
    if stack is None:
        return []
    # Ray first: its `ray start --block` leader drains and stops raylet, GCS and dashboard on
    # SIGTERM; then its job drivers and workers are gone before the storage they write to.
    order = sorted(stack.pids, key=lambda name: -COMPONENTS.index(name))
    for name in order:
        _stop_group(stack.pids[name], leader_first=name == "ray", timeout_s=timeout_s)
    stragglers = stack_processes(stack.id)
    for pid in stragglers:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack_processes(stack.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = stack_processes(stack.id)
    if left:
        raise ConfigError(f"stack processes still running after SIGKILL: {left}")
    (Path(stack.state_dir) / STATE_FILE).unlink(missing_ok=True)
    (Path(stack.state_dir) / "ray_auth_token").unlink(missing_ok=True)
    shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)
    return list(order)


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig) if group else os.kill(pid, sig)


def _stop_group(pid: int, *, leader_first: bool, timeout_s: float) -> None:
    """SIGTERM (to the leader only, or to its whole session), then SIGKILL to the session."""
    _signal(pid, signal.SIGTERM, group=not leader_first)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal(pid, signal.SIGKILL, group=True)


# --- a local mlflow server for one block of work (a search, a chain) -----------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In a child before it runs its program: on Linux the kernel sends it SIGTERM when the
    process that started it dies, however that dies (SIGKILL included), so a search killed
    outright leaves no `mlflow server` behind. Elsewhere a no-op (the `finally` below and the
    SIGTERM handler of `vgg-ray tune` cover the other exits)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def serve_mlflow(
    backend_uri: str, artifacts: Path, *, log_path: Path, timeout_s: float = 120
) -> Iterator[str]:
    """A local `mlflow server` on 127.0.0.1 over `backend_uri` (a sqlite:/// database) for the
    duration of the block; yields its http:// tracking URI."""
    port = _free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if backend_uri.startswith("sqlite:///"):
        Path(backend_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command = mlflow_server_command(backend_uri, str(artifacts), "127.0.0.1", port)
    with open(log_path, "ab") as output:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=subprocess.STDOUT, env=server_environment(),
                                  start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http("mlflow server", f"{uri}/health", server.pid, log_path, timeout_s)
        yield uri
    finally:
        # The server's workers share its session: stop them all (this process started it).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 9)
            server.wait()


def serve_sqlite(tracking_uri: str) -> contextlib.AbstractContextManager[str]:
    """`serve_mlflow` over a sqlite:/// store, its artifacts and log beside the database: how
    several processes (a search's trials, a chain's concurrent stages) share the embedded
    default, which SQLite alone would not survive."""
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return serve_mlflow(tracking_uri, database.parent / "mlartifacts",
                        log_path=database.parent / "logs" / "mlflow-server.log")  # fmt: skip


def mlflow_server_command(backend_uri: str, artifacts: str, host: str, port: int) -> list[str]:
    """The `mlflow server` vgg-ray runs: one worker, the one writer a SQLite store takes."""
    return [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts, "--host", host, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
