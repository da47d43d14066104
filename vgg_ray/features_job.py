"""`vgg-ray features`: the paper's descriptors (`vgg_ray.features`, Appendix B) of an image set,
with Ray Data batch inference, written as Parquet shards plus _features.json.

```
nets (checkpoint | runs:/ | models:/ incl. an ensemble | torchvision state_dict) --> ray.put
source: prepared shards (a manifest's split) | a folder or s3:// prefix of images
  --plan: output shards of `shard_size` images, in a fixed order--> read tasks (CPU: bytes;
  odd files converted as `prepare` does) --> FeatureActor pool (GPU, else CPU): decode,
  describe --> driver: each output shard written once complete --> _features.json last
```
Output folder (local or s3://):
- `part-00000.parquet`, ...: `key` (string), `label` (int64, -1 unknown), `class` (string,
  null unknown), `feature` (fixed_size_list<float32>[dim], unit L2 norm). Images that do not
  decode are left out and counted in the file's metadata.
- `_plan.json`: what this extraction is (model fingerprint, source, shard sizes), written first;
  `_features.json`: the manifest, written last (its presence = a finished extraction).
A stopped job rerun with the same command continues: shards already written are not recomputed;
an output folder that holds another extraction is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import posixpath
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from vgg_ray import storage
from vgg_ray.errors import ConfigError, require, user_error
from vgg_ray.evaluate_job import (
    Inference,
    LoadedNet,
    Progress,
    actor_device,
    actor_pool,
    batch_inference,
    decode_on,
    load_net,
)
from vgg_ray.features import (
    AGGREGATES,
    Describer,
    check_descriptor,
    descriptor_dim,
    feature_scales,
)

FORMAT = "vgg-ray-features/1"
# Leading "_": Parquet readers (pyarrow and pandas on the folder, Spark) skip such files, so the
# folder reads as one Parquet data set.
PLAN, MANIFEST = "_plan.json", "_features.json"
FILES_PER_READ = 32  # images per read task of a folder source
METADATA_KEY = b"vgg_ray"  # a shard's own record: images planned, what was skipped and why


@dataclass(frozen=True, kw_only=True)
class FeaturesConfig(Inference):
    """One extraction: which nets, which images, which descriptor, where to."""

    models: tuple[str, ...] = ()
    """Each a vgg-ray checkpoint, `runs:/<id>`, run id, `models:/name/version|@alias` (an
    ensemble's members are taken apart), or a torchvision VGG state_dict file. Several: their
    descriptors stacked (the paper's D & E fusion)."""
    source: str = ""
    """The images: a prepared data set (its manifest.json or folder), or a folder / s3:// prefix
    of images in class folders (or flat, labels from --labels or none)."""
    split: str = "train"
    """For a prepared data set: which split."""
    labels: str = ""
    """For a flat folder: a CSV of `file,class` rows (file relative to the folder, or its name)."""
    output: str = ""
    """Folder or s3:// prefix for the shards; "" = <home>/features/<source>-<fingerprint>."""
    scales: tuple[int, ...] = ()
    """Scales Q (smaller image side); () = the paper's {256, 384, 512}, scaled to the net's crop."""
    aggregate: str = "stack"
    """How the scales combine: "stack" (concatenated: Caltech) or "mean" (averaged: VOC)."""
    shard_size: int = 1000
    """Images per output shard: the unit a rerun resumes at."""
    max_images: int = 0
    """Describe only the first N images in the source's order (0: all)."""
    batch_size: int = 16
    """Images per Ray batch handed to an actor."""
    max_crops: int = 16
    """Images per forward pass (memory only; descriptors do not depend on it)."""
    s3_endpoint: str | None = None
    """For images, models or output on S3; default AWS_ENDPOINT_URL(_S3) or AWS."""
    tracking_uri: str = ""
    """MLflow, for runs:/ and models:/ sources; "" = MLFLOW_TRACKING_URI, else the default."""
    progress_every: int = 200
    """Print a progress line every this many images."""

    def validate(self) -> FeaturesConfig:
        checks = [
            (bool(self.models), "no model given: pass --model (a checkpoint, run, models:/ or "
             "torchvision state_dict)"),
            (bool(self.source), "no source given: pass --source (a prepared data set, or a "
             "folder / s3:// prefix of images)"),
            (self.aggregate in AGGREGATES,
             f"unknown aggregate {self.aggregate!r}; choose one of {', '.join(AGGREGATES)}"),
            (all(q >= 1 for q in self.scales), f"scales must be positive, got {self.scales}"),
            (self.shard_size >= 1, f"shard size must be >= 1, got {self.shard_size}"),
            (self.max_images >= 0, "max_images must be >= 0"),
            *self.inference_checks(),
            (self.progress_every >= 1, "progress_every must be >= 1"),
        ]  # fmt: skip
        require(checks)
        return self


@dataclass(frozen=True)
class FeaturesResult:
    output: str  # the folder (or s3:// prefix) holding the shards and _features.json
    images: int  # descriptors written
    dim: int
    skipped: int  # images that did not decode
    computed_shards: list[str] = field(default_factory=list)  # written by this call
    reused_shards: list[str] = field(default_factory=list)  # found finished from an earlier one


# --- nets -------------------------------------------------------------------------------------


def load_feature_nets(config: FeaturesConfig) -> list[LoadedNet]:
    """Every net, an ensemble's members taken apart (its descriptor is theirs, stacked)."""
    nets = []
    with tempfile.TemporaryDirectory() as directory:
        for source in config.models:
            for member in _members(source, config.tracking_uri, directory):
                nets.append(load_net(member, tracking_uri=config.tracking_uri,
                                     s3_endpoint=config.s3_endpoint))  # fmt: skip
    for net in nets:
        check_descriptor(net.info, feature_scales(net.info, config.scales), config.aggregate)
    return nets


def _members(source: str, tracking_uri: str, directory: str) -> list[str]:
    """[source], or a registered ensemble's member state files (downloaded into `directory`)."""
    if not source.startswith("models:/"):
        return [source]
    from vgg_ray import tracking
    from vgg_ray.registry import KIND, evaluation_sources

    client = tracking.open_client(tracking_uri)
    tracking.use_store(tracking_uri)
    version = tracking.model_version(client, source)
    if version.tags.get(KIND) != "ensemble":
        return [source]
    folder = tempfile.mkdtemp(dir=directory)  # one per ensemble: members may share names
    return evaluation_sources(client, version.name, version, Path(folder))


def fingerprint(nets: list[LoadedNet], scales: tuple[int, ...], aggregate: str) -> str:
    """What makes two descriptors comparable: the nets' weights and input handling, the scale set
    and the aggregation (sha256). Two extractions with one fingerprint can feed one probe."""
    digest = hashlib.sha256()
    for net in nets:
        info = net.info
        stats = info.stats.mean_rgb if info.stats else None
        digest.update(json.dumps([info.name, info.crop, info.normalize, stats,
                                  feature_scales(info, scales), aggregate]).encode())  # fmt: skip
        for name, tensor in net.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --- sources and the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """An image set in a fixed order, cut into read tasks; each task belongs to one output
    shard."""

    uri: str
    kind: str  # "shards" or "folder"
    classes: tuple[str, ...]  # class names by label; () when unlabelled
    tasks: list[dict[str, Any]]  # Ray Data items; each with "shard" and "count"
    read_kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what the scan skipped, for the log


def _is_prepared(config: FeaturesConfig) -> bool:
    from vgg_ray.manifest import manifest_file_uri

    uri = config.source
    return uri.endswith(".json") or storage.exists(manifest_file_uri(uri),
                                                   s3_endpoint=config.s3_endpoint)  # fmt: skip


def plan_source(config: FeaturesConfig) -> Source:
    """The images of `config.source` as read tasks grouped into output shards; ConfigError for
    an empty or unreadable source."""
    return _plan_shards(config) if _is_prepared(config) else _plan_folder(config)


def _plan_shards(config: FeaturesConfig) -> Source:
    from vgg_ray.evaluate_job import _pieces
    from vgg_ray.manifest import check_shards, load_manifest, shard_sizes

    manifest = load_manifest(config.source, s3_endpoint=config.s3_endpoint)
    shards = manifest.shards(config.split)
    check_shards(dataclasses.replace(manifest, splits={config.split: shards}))
    tasks, shard, filled = [], 0, 0
    for piece in _pieces(manifest, config.split, config.max_images):
        count = piece["stop"] - piece["start"]
        tasks.append({**piece, "shard": shard, "count": count})
        filled += count
        if filled >= config.shard_size:
            shard, filled = shard + 1, 0
    return Source(
        manifest.uri, "shards", manifest.wnids, tasks,
        {"manifest_uri": manifest.uri, "s3_endpoint": manifest.s3_endpoint,
         "base": manifest.base, "sizes": shard_sizes(manifest), "classes": len(manifest.classes)},
    )  # fmt: skip


def _plan_folder(config: FeaturesConfig) -> Source:
    from vgg_ray.prepare import _hidden, _is_image

    fs, root = storage.open_storage(config.source, s3_endpoint=config.s3_endpoint)
    with storage.storage_errors(config.source, config.s3_endpoint):
        kind = fs.get_file_info(root).type
        if kind == pafs.FileType.NotFound:
            raise ConfigError(f"{config.source}: no such file or folder")
        if kind != pafs.FileType.Directory:
            raise ConfigError(f"{config.source}: not a folder of images nor a prepared data set "
                              "(no manifest.json)")  # fmt: skip
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files, ignored = [], 0
    for info in listing:
        relative = posixpath.relpath(info.path, root)
        if info.type != pafs.FileType.File or any(_hidden(p) for p in relative.split("/")):
            continue
        if _is_image(relative):
            files.append(relative)
        else:
            ignored += 1
    files.sort()
    notes = [f"{ignored} file(s) without an image suffix ignored"] if ignored else []
    classes_of = _folder_classes(files, config, notes)
    if config.max_images:
        files = files[: config.max_images]
    if not files:
        raise ConfigError(f"{config.source} holds no images (.jpeg, .jpg, .png)")
    names = tuple(sorted({c for c in classes_of.values() if c is not None}))
    index = {name: i for i, name in enumerate(names)}
    tasks = []
    for start in range(0, len(files), FILES_PER_READ):
        chunk = files[start : start + FILES_PER_READ]
        # A read task never spans two output shards: cut at the shard boundary.
        for shard in sorted({(start + i) // config.shard_size for i in range(len(chunk))}):
            part = [f for i, f in enumerate(chunk) if (start + i) // config.shard_size == shard]
            tasks.append({
                "shard": shard, "count": len(part), "keys": part,
                "labels": [index.get(classes_of[f], -1) if classes_of[f] else -1 for f in part],
            })  # fmt: skip
    return Source(config.source, "folder", names, tasks,
                  {"root": config.source, "base": root, "s3_endpoint": config.s3_endpoint},
                  notes)  # fmt: skip


def _folder_classes(files: list[str], config: FeaturesConfig, notes: list[str]) -> dict:
    """file -> class name or None: the labels CSV's, else the top-level folder's (a flat folder
    without a CSV is unlabelled)."""
    if config.labels:
        try:
            text = storage.read_bytes(config.labels, s3_endpoint=config.s3_endpoint).decode(
                "utf-8-sig"
            )
        except UnicodeDecodeError as error:
            raise ConfigError(f"labels file {config.labels} is not UTF-8 text") from error
        by_name: dict[str, str] = {}
        for row in csv.reader(io.StringIO(text)):
            if len(row) >= 2 and row[0].strip() and row[1].strip():
                by_name[row[0].strip()] = row[1].strip()
        stems = {posixpath.splitext(k)[0]: v for k, v in by_name.items()}
        found = {}
        for f in files:
            name = posixpath.basename(f)
            found[f] = by_name.get(f) or by_name.get(name) or stems.get(posixpath.splitext(name)[0])
        if not any(found.values()):
            raise ConfigError(f"labels file {config.labels}: no row names an image of "
                              f"{config.source} (expected rows `file,class`)")  # fmt: skip
        unlabelled = sum(v is None for v in found.values())
        if unlabelled:
            notes.append(f"{unlabelled} image(s) not in {config.labels}: described, unlabelled")
        return found
    return {f: f.split("/")[0] if "/" in f else None for f in files}


def read_folder_images(
    batch: dict[str, np.ndarray], *, root: str, base: str, s3_endpoint: str | None
) -> dict[str, np.ndarray]:
    """Ray Data batch fn: a folder's read tasks -> raw rows ("image" JPEG bytes, "label", "key",
    "shard", "reason"). Odd files are handled as `prepare` handles them: converted to RGB JPEG,
    or left empty with the reason (skipped and counted downstream), never fatal."""
    from vgg_ray.data import _filesystem
    from vgg_ray.prepare import ImageRejected, encode_image

    fs = _filesystem(root, s3_endpoint)  # opened (an S3 probe) once per task process
    rows: dict[str, list] = {"image": [], "label": [], "key": [], "shard": [], "reason": []}
    for keys, labels, shard in zip(batch["keys"], batch["labels"], batch["shard"], strict=True):
        for key, label in zip(keys, labels, strict=True):
            try:
                data = storage.retry_transient(
                    lambda key=key: storage.read_bytes((fs, f"{base}/{key}")), what=key
                )
                image, reason = encode_image(data).data, ""
            except (ImageRejected, ConfigError) as error:
                image, reason = b"", str(error)
            rows["image"].append(image)
            rows["label"].append(label)
            rows["key"].append(key)
            rows["shard"].append(shard)
            rows["reason"].append(reason)
    return {k: np.array(v, dtype=object if k in ("image", "key", "reason") else np.int64)
            for k, v in rows.items()}  # fmt: skip


def read_shard_images(batch: dict[str, np.ndarray], **read_kwargs: Any) -> dict[str, np.ndarray]:
    """Ray Data batch fn: prepared shards' pieces -> raw rows, as `read_folder_images`."""
    from vgg_ray.data import read_records

    rows = read_records(batch, **read_kwargs)
    counts = np.asarray(batch["stop"]) - np.asarray(batch["start"])
    rows["shard"] = np.repeat(np.asarray(batch["shard"], np.int64), counts)
    rows["reason"] = np.array([""] * len(rows["key"]), dtype=object)
    return {k: rows[k] for k in ("image", "label", "key", "shard", "reason")}


class FeatureActor:
    """A Ray Data actor: holds every net on its device; per batch, decodes the JPEGs there and
    returns each image's descriptor ("ok" False, with a reason, where one did not decode)."""

    def __init__(self, nets_ref: list, scales: tuple[int, ...], aggregate: str, max_crops: int,
                 bf16: bool | None, threads: int):  # fmt: skip
        import ray

        nets: list[LoadedNet] = ray.get(nets_ref[0])
        self.device = actor_device(threads)
        on_gpu = self.device.type == "cuda"
        self.describe = Describer(
            [n.model for n in nets], [n.info for n in nets], scales=scales, aggregate=aggregate,
            device=self.device, max_crops=max_crops, bf16=on_gpu if bf16 is None else bf16,
            channels_last=on_gpu,
        )  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = list(batch["image"])
        images = decode_on(self.device, data)
        good = [i for i, image in enumerate(images) if image is not None]
        feature = np.zeros((len(data), self.describe.dim), np.float32)
        if good:
            feature[good] = self.describe([images[i] for i in good])
        ok = np.array([image is not None for image in images])
        reason = [r or ("" if o else "not a decodable JPEG") for r, o in
                  zip(batch["reason"], ok, strict=True)]  # fmt: skip
        return {"key": batch["key"], "label": batch["label"], "shard": batch["shard"],
                "feature": feature, "ok": ok, "reason": np.array(reason, dtype=object)}  # fmt: skip


# --- output -----------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _shard_bytes(rows: list[dict], classes: tuple[str, ...], dim: int, planned: int) -> bytes:
    """One output shard as Parquet bytes, rows in key order; its metadata records how many
    images were planned and which were skipped (a rerun reads it back from the footer)."""
    rows = sorted(rows, key=lambda r: r["key"])
    kept = [r for r in rows if r["ok"]]
    labels = [int(r["label"]) for r in kept]
    flat = np.concatenate([r["feature"] for r in kept]) if kept else np.zeros(0, np.float32)
    table = pa.table({
        "key": pa.array([str(r["key"]) for r in kept], pa.string()),
        "label": pa.array(labels, pa.int64()),
        "class": pa.array([classes[i] if 0 <= i < len(classes) else None for i in labels],
                          pa.string()),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
    })  # fmt: skip
    skipped = [[str(r["key"]), r["reason"]] for r in rows if not r["ok"]]
    record = json.dumps({"planned": planned, "rows": len(kept), "skipped": skipped}).encode()
    table = table.replace_schema_metadata({METADATA_KEY: record})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _shard_record(fs: pafs.FileSystem, path: str) -> dict | None:
    """A written shard's own record (planned, rows, skipped), or None if it is not there."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_file(path) as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None


def default_output(config: FeaturesConfig, source: Source, digest: str) -> str:
    from vgg_ray.config import default_home

    name = posixpath.basename(config.source.rstrip("/").removesuffix("/manifest.json")) or "images"
    if source.kind == "shards":
        name += f"-{config.split}"
    return str(default_home() / "features" / f"{name}-{digest[:12]}")


def _check_plan(fs: pafs.FileSystem, base: str, plan: dict, output: str) -> None:
    """Write the plan, or check the one already there: a rerun continues only the same
    extraction (a shard is only reusable under the same nets, scales and source order)."""
    path = f"{base}/{PLAN}"
    with storage.storage_errors(output):
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as stream:
                old = json.loads(stream.read())
            if old != plan:
                what = "nets, scales or aggregation" if old.get("fingerprint") != plan[
                    "fingerprint"] else "source, split or shard size"  # fmt: skip
                raise ConfigError(f"{output} holds another extraction (other {what}): choose "
                                  "another --output, or remove that folder")  # fmt: skip
            return
        storage.write_bytes_atomic(fs, path, json.dumps(plan, indent=1).encode())


def extract(config: FeaturesConfig) -> FeaturesResult:
    """The whole job: load and check the nets, plan the source, describe every image not yet in
    a finished shard, write the shards, then _features.json. What `vgg-ray features` and
    jobs/extract_features.py call."""
    from vgg_ray.tracking import resolve_uri

    config = dataclasses.replace(config, tracking_uri=resolve_uri(config.tracking_uri)).validate()
    nets = load_feature_nets(config)
    source = plan_source(config)
    digest = fingerprint(nets, config.scales, config.aggregate)
    output = config.output or default_output(config, source, digest)
    fs, base = storage.open_storage(output, s3_endpoint=config.s3_endpoint)
    planned: dict[int, int] = {}
    for task in source.tasks:
        planned[task["shard"]] = planned.get(task["shard"], 0) + task["count"]
    plan = {"format": FORMAT, "fingerprint": digest, "source": source.uri, "split":
            config.split if source.kind == "shards" else "", "shards": [planned[i] for i in
            sorted(planned)]}  # fmt: skip
    _check_plan(fs, base, plan, output)
    with storage.storage_errors(output):
        records = {i: _shard_record(fs, f"{base}/{shard_name(i)}") for i in planned}
    finished = {i for i, r in records.items() if r and r.get("planned") == planned[i]}
    scales = [feature_scales(n.info, config.scales) for n in nets]
    dim = descriptor_dim([n.model for n in nets], scales, config.aggregate)
    names = " & ".join(n.info.name for n in nets)
    total = sum(planned.values())
    todo = [t for t in source.tasks if t["shard"] not in finished]
    print(f"vgg-ray features: {total} images of {source.uri} in {len(planned)} shard(s), net "
          f"{names}, Q {'; '.join(','.join(map(str, s)) for s in scales)} {config.aggregate}, "
          f"{dim}-d -> {output}" + (f"; {len(finished)} shard(s) done already" if finished
                                    else ""), flush=True)  # fmt: skip
    for note in source.notes:
        print(f"vgg-ray features: {note}", flush=True)
    computed: list[str] = []
    if todo:
        try:
            computed = _run(config, nets, source, todo, planned, fs, base, dim, records)
        except Exception as error:  # storage down past its limit, a ConfigError inside Ray
            if cause := user_error(error):
                raise ConfigError(cause) from None
            raise
    manifest = _manifest(digest, dim, config.aggregate, nets, scales, source, plan["split"],
                         [records[i] for i in sorted(planned)])  # fmt: skip
    rows, skipped = manifest["images"], manifest["skipped"]
    if rows == 0:
        raise ConfigError(f"no image of {source.uri} could be decoded")
    storage.write_bytes_atomic(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    print(f"vgg-ray features: {rows} descriptors ({dim}-d) in {output}"
          + (f"; {skipped} image(s) did not decode" if skipped else ""), flush=True)  # fmt: skip
    reused = [shard_name(i) for i in sorted(finished)]
    return FeaturesResult(output, rows, dim, skipped, computed, reused)


def _manifest(digest: str, dim: int, aggregate: str, nets: list[LoadedNet],
              scales: list[tuple[int, ...]], source: Source, split: str,
              records: list[dict]) -> dict:  # fmt: skip
    """_features.json: what a probe (or anyone) needs to know of a finished extraction."""
    return {
        "format": FORMAT, "fingerprint": digest, "dim": dim, "aggregate": aggregate,
        "scales": list(scales[0]),  # each net's own below (they differ only by crop)
        "models": [{"source": n.info.source, "name": n.info.name, "crop": n.info.crop,
                    "normalize": n.info.normalize, "run_id": n.info.run_id,
                    "scales": list(s)} for n, s in zip(nets, scales, strict=True)],
        "source": source.uri, "split": split, "classes": list(source.classes),
        "images": sum(r["rows"] for r in records),
        "skipped": sum(len(r["skipped"]) for r in records),
        "skipped_examples": [s for r in records for s in r["skipped"]][:20],
        "shards": [{"path": shard_name(i), "rows": r["rows"]} for i, r in enumerate(records)],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def _run(config: FeaturesConfig, nets: list[LoadedNet], source: Source, todo: list[dict],
         planned: dict[int, int], fs: pafs.FileSystem, base: str, dim: int,
         records: dict[int, dict | None]) -> list[str]:  # fmt: skip
    """The Ray Data pipeline over the unfinished shards; writes each as it completes and fills
    `records` in. Returns the shards written."""
    import ray

    from vgg_ray import runtime

    runtime.connect()
    pool = actor_pool(config.actors, config.gpus_per_actor)
    reader = read_shard_images if source.kind == "shards" else read_folder_images
    batches = batch_inference(
        todo, reader, source.read_kwargs, FeatureActor,
        {"nets_ref": [ray.put(nets)], "scales": config.scales, "aggregate": config.aggregate},
        config, pool,
    )  # fmt: skip
    pending: dict[int, list[dict]] = {task["shard"]: [] for task in todo}
    written = []
    progress = Progress("features", sum(t["count"] for t in todo), config.progress_every)
    for batch in batches:
        for i, shard in enumerate(batch["shard"]):
            shard = int(shard)
            pending[shard].append({"key": batch["key"][i], "label": batch["label"][i],
                                   "feature": batch["feature"][i], "ok": bool(batch["ok"][i]),
                                   "reason": str(batch["reason"][i])})  # fmt: skip
            if len(pending[shard]) == planned[shard]:
                path = f"{base}/{shard_name(shard)}"
                data = _shard_bytes(pending.pop(shard), source.classes, dim, planned[shard])
                storage.write_bytes_atomic(fs, path, data)
                records[shard] = _shard_record(fs, path)
                written.append(shard_name(shard))
        progress.add(len(batch["shard"]), f"{len(written)} shard(s) written")
    if pending:  # a read gave fewer rows than planned: the source changed under the job
        shards = ", ".join(shard_name(i) for i in sorted(pending))
        raise ConfigError(f"{source.uri} changed while it was read ({shards} short of images): "
                          "rerun to describe what is there now, into a new --output")  # fmt: skip
    return written
