"""The cluster definitions: ray-cluster.yaml against the Ray autoscaler's own schema, the KubeRay
manifests' structure, and every image, Ray and Python version against pyproject.toml."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)-(cpu|gpu)$")


def _load(path: str):
    return yaml.safe_load((ROOT / path).read_text())


def _ray_pin() -> str:
    """ "2.60" from "ray[default,train,tune,data]==2.60.*"."""
    [pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    return re.search(r"==(\d+\.\d+)", pin).group(1)


def _check_image(image: str) -> None:
    match = IMAGE.match(image)
    assert match, f"{image}: not a current rayproject/ray image (ray-ml is discontinued)"
    assert match["ray"].rsplit(".", 1)[0] == _ray_pin(), image
    # The image's Python must be one pyproject allows (>=3.11,<3.13) and the one tests run on,
    # or pickled functions and checkpoints do not travel between client and cluster.
    assert (int(match["py"]), int(match["minor"])) in {(3, 11), (3, 12)}, image
    assert (int(match["py"]), int(match["minor"])) == sys.version_info[:2], image


def _images(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("image", "head_image", "worker_image")]
        return found + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


# ------------------------------------------------------------------------------ ray up


def test_ray_cluster_yaml_validates_against_the_autoscaler_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load("ray-cluster.yaml"), schema)


def test_ray_cluster_yaml_passes_rays_own_config_checks():
    """What `ray up` runs first: defaults filled in, then the schema and node-type checks."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(_load("ray-cluster.yaml")))


def test_ray_cluster_has_cpu_head_gpu_and_cpu_workers_on_aws():
    config = _load("ray-cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and t not in gpu]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] == 8
    assert gpu[0]["node_config"]["InstanceType"].split(".")[0] in {"p4d", "p4de", "p5", "p5e"}
    assert cpu and all("GPU" not in t["resources"] for t in cpu)
    for worker in gpu + cpu:
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
        assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in gpu + cpu)
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"]  # S3 without keys


def test_ray_cluster_has_no_keys_and_installs_the_package_at_its_ray_version():
    text = (ROOT / "ray-cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET", text, re.I)
    config = _load("ray-cluster.yaml")
    for image in _images(config["docker"]):
        _check_image(image)
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "/home/ray/vgg-ray" in setup
    assert f"ray[default,train,tune,data]=={_ray_pin()}." in setup
    assert config["file_mounts"]["/home/ray/vgg-ray"] == "."
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


# ------------------------------------------------------------------------------ KubeRay


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].rsplit(".", 1)[0] == _ray_pin()
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    pod = gpu["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    for image in _images(spec):
        _check_image(image)
        assert image.split(":")[1].startswith(spec["rayVersion"])
    for group in [head, *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # not inline


@pytest.mark.parametrize("path", ["cluster/raycluster.yaml", "cluster/rayjob.yaml"])
def test_kuberay_manifests_have_kind_apiversion_and_metadata(path):
    manifest = _load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"raycluster": "RayCluster", "rayjob": "RayJob"}[Path(path).stem]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


def test_raycluster_manifest():
    _check_cluster_spec(_load("cluster/raycluster.yaml")["spec"])


def test_rayjob_runs_train_e_on_its_own_cluster():
    spec = _load("cluster/rayjob.yaml")["spec"]
    assert spec["entrypoint"].startswith("python jobs/train_E.py ")
    assert "--manifest s3://" in spec["entrypoint"]
    assert (ROOT / "jobs/train_E.py").exists()
    # The entrypoint's options are ones train_E.py accepts.
    from vgg_ray.cli import Parser, add_train_options

    parser = Parser()
    add_train_options(parser, arch="E")
    args = parser.parse_args(spec["entrypoint"].split()[2:])
    # --workers 16: (most, fewest) = (16, 0), a fixed count of 16
    assert args.workers == (16, 0) and args.storage_path.startswith("s3://")
    _check_cluster_spec(spec["rayClusterSpec"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"] == _load("cluster/runtime_env.yaml")["pip"]
    assert spec["shutdownAfterJobFinishes"] is True
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    _check_image(submitter["image"])


def test_runtime_env_has_the_dependencies_but_not_ray_and_excludes_big_folders():
    runtime_env = _load("cluster/runtime_env.yaml")
    dependencies = [
        d.split("  ")[0] for d in PYPROJECT["project"]["dependencies"] if not d.startswith("ray")
    ]
    assert runtime_env["pip"] == dependencies
    assert {".venv/", "vgg-ray-runs/", "mlruns/", ".git/"} <= set(runtime_env["excludes"])
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(runtime_env["env_vars"])
    assert not any("SECRET" in k or "ACCESS_KEY" in k for k in runtime_env["env_vars"])
