"""Training checkpoints: one `state.pt` per checkpoint directory, loaded with weights_only=True
and verified against the sha256 digest written beside it.

A checkpoint holds everything a resume needs to continue exactly (model, optimizer, scheduler,
epoch, step, batch within the epoch, RNG state, the metrics history) and what later jobs need to
use the net without its run (arch, width, classes, the data statistics it was trained with).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vgg_ray.errors import ConfigError
from vgg_ray.models import VGG, build_vgg, head_size

log = logging.getLogger("vgg_ray.checkpoint")
STATE_FILE = "state.pt"
# The checkpoint's proof of itself, in `sha256sum` format (`sha256sum -c state.sha256` checks it
# by hand). Written after state.pt: a folder without it is a checkpoint whose save did not end.
DIGEST_FILE = "state.sha256"
# What a net's state keeps of a training checkpoint when it travels with a logged or registered
# model: the weights and what the test protocol needs (crop, scales, normalisation, mean RGB,
# classes). The optimizer's momentum would double the upload (VGG-E: 550 MB of weights).
NET_STATE_KEYS = ("arch", "width", "classes", "config", "data_stats", "model")
# Where a logged MLflow model keeps that state and its digest (`log_model(extra_files=...)`), so
# loading the model never needs to unpickle it.
LOGGED_STATE = "extra_files"


def net_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint trimmed to the net (NET_STATE_KEYS)."""
    return {key: state[key] for key in NET_STATE_KEYS if key in state}


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` into `directory`, then its digest. Both go through a temporary file and a
    rename, so a crash mid-write leaves no truncated file, only a checkpoint without digest."""
    path = Path(directory) / STATE_FILE
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)
    digest = Path(directory) / DIGEST_FILE
    partial = digest.with_name(f"{DIGEST_FILE}.partial")
    partial.write_text(f"{_sha256(path)}  {STATE_FILE}\n")
    partial.replace(digest)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: str | Path) -> Path:
    """The state.pt of checkpoint folder `directory`, once its bytes match the recorded digest;
    ConfigError naming the file otherwise (missing, incomplete, damaged)."""
    folder = Path(directory)
    path, digest = folder / STATE_FILE, folder / DIGEST_FILE
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {directory} (expected {STATE_FILE})")
    if not digest.is_file():
        raise ConfigError(f"checkpoint {folder} is incomplete: it has no {DIGEST_FILE} (its "
                          "save did not finish, or an older vgg-ray wrote it; for one you trust, "
                          f"`sha256sum {STATE_FILE} > {DIGEST_FILE}` in its folder)")  # fmt: skip
    recorded = (digest.read_text().split() or [""])[0]
    if _sha256(path) != recorded:
        raise ConfigError(f"checkpoint {path} is damaged: its sha256 differs from {DIGEST_FILE}")
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state: a vgg-ray checkpoint folder (or its state.pt), verified against its
    digest first, or any other torch file (a torchvision state_dict), which carries none."""
    path = Path(directory)
    if path.is_dir() or path.name == STATE_FILE:
        path = verify(path if path.is_dir() else path.parent)
    elif not path.is_file():
        raise ConfigError(f"no checkpoint at {directory} (expected {STATE_FILE})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a corrupt or foreign file is the user's to fix, not a bug
        first = (str(error).splitlines() or [""])[0]
        if "Weights only load failed" in first:
            why = ("it pickles objects other than tensors and plain values (save the model's "
                   "state_dict instead)")  # fmt: skip
        else:
            why = (f"not a PyTorch checkpoint, or a damaged one (torch.load: "
                   f"{type(error).__name__}: {first[:120]})")  # fmt: skip
        raise ConfigError(f"cannot load checkpoint {path}: {why}") from error


# A resume or restart with nothing intact left says this (and the driver, what to do instead).
NOTHING_INTACT = "no checkpoint of the run verifies"


def _newest_first(filesystem: Any, run_folder: str, *, before: str | None = None) -> list[str]:
    """The run's checkpoint folders, newest first (optionally only those older than `before`).
    Names are epoch-EEEE-step-SSSSSSSS[-suffix]: sorted by name is sorted by progress."""
    import pyarrow.fs

    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(run_folder, allow_not_found=True))
    folders = [e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory]
    names = [n for n in folders if n.startswith("epoch-") and (before is None or n < before)]
    return sorted(names, reverse=True)


def _first_intact(
    filesystem: Any, run_folder: str, names: list[str], read: Callable[[str], Any]
) -> tuple[str, Any]:
    """(name, `read(its local folder)`) of the first of `names` that verifies, naming in the
    log each one it skips."""
    from ray.train import Checkpoint

    skipped: tuple[str, ConfigError] | None = None
    for name in names:
        if skipped:
            log.warning("skipping checkpoint %s: %s", *skipped)
        try:
            with Checkpoint(f"{run_folder}/{name}", filesystem).as_directory() as directory:
                result = read(directory)
        except ConfigError as error:
            skipped = (name, error)
            continue
        if skipped:
            log.warning("continuing from the earlier checkpoint %s", name)
        return name, result
    raise ConfigError(f"{skipped[1]}; {NOTHING_INTACT}" if skipped else
                      f"{run_folder} holds no checkpoint; {NOTHING_INTACT}")  # fmt: skip


def load_newest_intact(checkpoint: Any) -> dict[str, Any]:
    """The state of `checkpoint` (a ray.train.Checkpoint) or, where it does not verify, of the
    newest earlier checkpoint of the same run that does: a damaged latest checkpoint costs the
    steps since the one before it, not the run."""
    run_folder, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    earlier = _newest_first(checkpoint.filesystem, run_folder, before=name)
    return _first_intact(checkpoint.filesystem, run_folder, [name, *earlier], load_state)[1]


def newest_intact(filesystem: Any, run_folder: str) -> str:
    """The name of the newest checkpoint in `run_folder` that verifies (what a resume will
    continue from), or ConfigError ending in NOTHING_INTACT: the driver's check before a
    resume, so a run with nothing intact is not retried `max_failures` times on the cluster."""
    return _first_intact(filesystem, run_folder, _newest_first(filesystem, run_folder), verify)[0]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_from_state(state: dict[str, Any]) -> VGG:
    """Rebuild the net a checkpoint was trained as, with its weights."""
    config = state.get("config", {})
    outputs = head_size(len(state["classes"]), config.get("regression", ""))
    model = build_vgg(state["arch"], num_classes=outputs, width=state["width"],
                      init="glorot", batch_norm=bool(config.get("batch_norm", False)))  # fmt: skip
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # a hand-edited or mismatched file: say so in one line
        raise ConfigError(f"checkpoint weights do not fit net {state['arch']} (width "
                          f"{state['width']:g}, {len(state['classes'])} classes): "
                          f"{str(error).splitlines()[-1].strip()[:200]}") from error  # fmt: skip
    return model


def load_logged_state(uri: str) -> dict[str, Any]:
    """The weights-only state a vgg-ray model logged to MLflow carries (`runs:/<id>/model` or
    `models:/name/version|@alias`), verified and loaded with weights_only=True: a model is never
    unpickled."""
    import mlflow.artifacts

    missing = (f"cannot load {uri} from MLflow: no {LOGGED_STATE}/{STATE_FILE} in it (not a "
               "vgg-ray model, or unreachable)")  # fmt: skip
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{uri.rstrip('/')}/{LOGGED_STATE}"
        )
    except Exception as error:
        raise ConfigError(f"{missing}: {str(error).splitlines()[0][:200]}") from error
    if not (Path(local) / STATE_FILE).is_file():
        raise ConfigError(missing)
    return load_state(local)


def load_trained(source: str, *, s3_endpoint: str | None = None) -> tuple[VGG | None, dict]:
    """Trained weights from a checkpoint (folder, state.pt or s3:// URI), an MLflow `models:/` or
    `runs:/` URI, or a torchvision state_dict file. Returns (model or None, checkpoint state);
    a torchvision state_dict gives (None, {"model": state_dict}) since it carries no arch."""
    if source.startswith(("models:/", "runs:/")):
        state = load_logged_state(source)
        return model_from_state(state), state
    if source.startswith("s3://"):
        from vgg_ray.storage import open_storage

        filesystem, path = open_storage(source, s3_endpoint=s3_endpoint)
        with tempfile.TemporaryDirectory() as local:
            name = STATE_FILE if not path.endswith(".pt") else Path(path).name
            remote = path if path.endswith(".pt") else f"{path.rstrip('/')}/{STATE_FILE}"
            # a vgg-ray checkpoint's digest comes along, so the copy is verified as it loads
            files = [(remote, name)]
            if name == STATE_FILE:
                files.append((f"{posixpath.dirname(remote)}/{DIGEST_FILE}", DIGEST_FILE))
            for remote_file, local_name in files:
                try:
                    with filesystem.open_input_stream(remote_file) as stream:
                        (Path(local) / local_name).write_bytes(stream.read())
                except FileNotFoundError:  # load_state names what is missing
                    continue
            state = load_state(Path(local) / name)
    else:
        state = load_state(source)
    if "arch" in state:
        return model_from_state(state), state
    if all(isinstance(v, torch.Tensor) for v in state.values()):  # a torchvision state_dict
        return None, {"model": state}
    raise ConfigError(f"{source} is neither a vgg-ray checkpoint nor a state_dict")
