"""A prepared data set's manifest: the model of it, reading and writing it, and checking its
shards against it.

`vgg-ray prepare` writes manifest.json last, beside the shards it lists (`write_manifest`);
every reader loads it with `load_manifest`, which checks its form and that no shard path leaves
its folder. `check_shards` is the driver's pre-flight (sizes and footers, in seconds);
`verify_shards` (`vgg-ray verify`) hashes every byte.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vgg_ray.errors import ConfigError
from vgg_ray.storage import (
    StorageUnreachable,
    open_storage,
    read_bytes,
    retry_transient,
    storage_errors,
    write_bytes_atomic,
)
from vgg_ray.transforms import ColorStats

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vgg-ray-shards/1"


@dataclass(frozen=True)
class Shard:
    """One Parquet file of a split."""

    path: str  # relative to the manifest's folder
    rows: int
    row_groups: tuple[int, ...]  # rows in each row group
    first_index: int  # the split's row index of its first row (shards in manifest order)
    bytes: int = 0  # file size; 0: unknown (not checked)
    sha256: str = ""  # of the whole file; "": unknown
    boxed_rows: int = 0  # rows with bounding boxes (prepare puts them in shards of their own)


@dataclass(frozen=True)
class ClassInfo:
    """One class; `index` is the label stored in the shards."""

    index: int
    wnid: str  # WordNet id, e.g. n01440764
    name: str  # readable, e.g. "tench"


@dataclass(frozen=True)
class Manifest:
    """A prepared data set: what `vgg_ray.prepare` wrote to manifest.json."""

    uri: str  # of manifest.json itself
    s3_endpoint: str | None
    base: str  # its folder, as a path on its filesystem (no scheme)
    classes: tuple[ClassInfo, ...]  # by index
    splits: Mapping[str, tuple[Shard, ...]] = field(repr=False)
    stats: ColorStats

    def shards(self, split: str, *, boxed: bool = False) -> tuple[Shard, ...]:
        """The split's shards (`boxed`: only those holding bounding boxes, what localisation
        reads); ConfigError for an unknown or empty split."""
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise ConfigError(f"manifest {self.uri} has no split {split!r} (it has: {known})")
        if not any(shard.rows for shard in self.splits[split]):
            raise ConfigError(f"split {split!r} of manifest {self.uri} has no rows")
        if not boxed:
            return self.splits[split]
        shards = tuple(shard for shard in self.splits[split] if shard.boxed_rows)
        if not shards:
            raise ConfigError(
                f"split {split!r} of manifest {self.uri} has no bounding boxes; localisation "
                "needs them: run `vgg-ray prepare` with --boxes LOC_train_solution.csv (or "
                "Annotations/CLS-LOC) and a Kaggle --val-labels file"
            )
        return shards

    @property
    def wnids(self) -> tuple[str, ...]:
        return tuple(c.wnid for c in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def rows(self, split: str, *, boxed: bool = False) -> int:
        return sum(shard.rows for shard in self.shards(split, boxed=boxed))


def shard_sizes(manifest: Manifest) -> dict[str, int]:
    """Shard path -> size in bytes, for the shards whose size the manifest records."""
    return {s.path: s.bytes for shards in manifest.splits.values() for s in shards if s.bytes}


def short_sides(manifest: Manifest, split: str = "train") -> np.ndarray:
    """Every image's smaller side in pixels, from the shards' `height` and `width` columns (a
    few bytes per image: no JPEG is read). The shards pass `check_shards` first: a broken one
    is the same one line as in any run's pre-flight."""
    check_shards(manifest)
    filesystem, _ = open_storage(manifest.uri, s3_endpoint=manifest.s3_endpoint)
    sides = []
    for shard in manifest.shards(split):
        path = f"{manifest.base}/{shard.path}"
        with storage_errors(path, manifest.s3_endpoint):
            table = pq.read_table(path, columns=["height", "width"], filesystem=filesystem)
        sides.append(np.minimum(table["height"].to_numpy(), table["width"].to_numpy()))
    return np.concatenate(sides) if sides else np.zeros(0, dtype=np.int32)


def verify_shards(manifest: Manifest) -> list[str]:
    """Hash every shard and compare it with the manifest: one line per shard that is missing,
    of another size or whose sha256 differs (empty: all good). Reads the whole data set."""
    import hashlib

    filesystem, _ = open_storage(manifest.uri, s3_endpoint=manifest.s3_endpoint)
    problems = []
    for shards in manifest.splits.values():
        for shard in shards:
            path = f"{manifest.base}/{shard.path}"

            def digest(path: str = path) -> tuple[int, str]:
                sha, size = hashlib.sha256(), 0
                with (
                    storage_errors(path, manifest.s3_endpoint),
                    filesystem.open_input_stream(path) as stream,
                ):
                    while chunk := stream.read(8 * 2**20):
                        sha.update(chunk)
                        size += len(chunk)
                return size, sha.hexdigest()

            try:
                size, sha256 = retry_transient(digest, what=f"reading shard {shard.path}")
            except StorageUnreachable:
                raise
            except ConfigError:  # missing, or not readable at all
                problems.append(f"{shard.path}: missing or unreadable")
                continue
            if shard.bytes and size != shard.bytes:
                problems.append(f"{shard.path}: {size} bytes, the manifest says {shard.bytes}")
            elif shard.sha256 and sha256 != shard.sha256:
                problems.append(f"{shard.path}: sha256 does not match the manifest")
    return problems


def check_shards(manifest: Manifest, *, threads: int = 16) -> None:
    """The driver's pre-flight of a data set, in seconds: every shard the manifest lists exists,
    has the manifest's size and a readable Parquet footer whose rows and row groups agree with
    the manifest. One listing of the data folder and one footer read per shard (in parallel),
    no image data; `verify_shards` is the full check. ConfigError naming the first problems."""
    from concurrent.futures import ThreadPoolExecutor

    filesystem, _ = open_storage(manifest.uri, s3_endpoint=manifest.s3_endpoint)
    with storage_errors(manifest.base, manifest.s3_endpoint):
        listing = filesystem.get_file_info(pafs.FileSelector(manifest.base, recursive=True))
    sizes = {posixpath.relpath(info.path, manifest.base): info.size for info in listing
             if info.type == pafs.FileType.File}  # fmt: skip
    shards = [shard for split in manifest.splits.values() for shard in split]

    def problem(shard: Shard) -> str | None:
        size = sizes.get(posixpath.normpath(shard.path))
        if size is None:
            return f"{shard.path} is missing"
        if shard.bytes and size != shard.bytes:
            return f"{shard.path} is {size} bytes, the manifest says {shard.bytes}"
        path = f"{manifest.base}/{posixpath.normpath(shard.path)}"
        try:
            footer = retry_transient(lambda: pq.read_metadata(path, filesystem=filesystem),
                                     what=f"reading shard {shard.path}")  # fmt: skip
        except StorageUnreachable:
            raise
        except (ConfigError, OSError, ValueError, pa.ArrowException):
            return f"{shard.path} is not a readable Parquet file"
        groups = tuple(footer.row_group(i).num_rows for i in range(footer.num_row_groups))
        if groups != shard.row_groups:
            return f"{shard.path} holds row groups of {groups} rows, the manifest says " \
                   f"{shard.row_groups}"  # fmt: skip
        return None

    with ThreadPoolExecutor(threads) as pool:
        problems = [p for p in pool.map(problem, shards) if p]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(
            f"data set {manifest.uri}: {'; '.join(problems[:3])}{more}; run `vgg-ray prepare` "
            "again (`vgg-ray verify` checks every byte)"
        )


def _check_shard_path(path: str) -> None:
    """Shard paths are relative to the manifest's folder and stay inside it: a manifest from
    elsewhere must not make readers open (or `verify` hash) any other file."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"shard path {path!r} is not a relative file path")
    normal = posixpath.normpath(path.replace("\\", "/"))
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../") or ":" in path:
        raise ValueError(f"shard path {path!r} leaves the manifest's folder")


def manifest_file_uri(uri: str) -> str:
    """The manifest.json a data set URI names (the file itself, or the folder holding it)."""
    return uri if uri.endswith(".json") else uri.rstrip("/") + "/" + MANIFEST_NAME


def load_manifest(uri: str, *, s3_endpoint: str | None = None) -> Manifest:
    """Read manifest.json at `uri` (the file, or the folder holding it; local or s3://)."""
    if not uri:
        raise ConfigError("no manifest given: set the data's manifest (a folder or s3:// URI)")
    raw = read_manifest(uri, s3_endpoint=s3_endpoint)  # JSON of the right format, or ConfigError
    uri = manifest_file_uri(uri)
    _, path = open_storage(uri, s3_endpoint=s3_endpoint)
    try:
        classes = sorted(raw["classes"], key=lambda c: c["index"])
        if [c["index"] for c in classes] != list(range(len(classes))) or not classes:
            raise ValueError("class indices are not 0..n-1")
        infos = tuple(ClassInfo(c["index"], c["wnid"], c.get("name", c["wnid"])) for c in classes)
        splits = {}
        for name, split in raw["splits"].items():
            shards, first = [], 0
            for shard in split["shards"]:
                groups = tuple(int(n) for n in shard["row_groups"])
                if sum(groups) != shard["rows"]:
                    raise ValueError(f"{shard['path']}: row groups do not add up to its rows")
                _check_shard_path(shard["path"])
                size, sha256 = int(shard.get("bytes") or 0), shard.get("sha256") or ""
                shards.append(Shard(shard["path"], int(shard["rows"]), groups, first, size, sha256,
                                    int(shard.get("boxed_rows") or 0)))  # fmt: skip
                first += shard["rows"]
            splits[name] = tuple(shards)
        stats = raw["stats"]
        color = ColorStats(
            mean_rgb=tuple(float(v) for v in stats["mean_rgb"]),
            eigval=tuple(float(v) for v in stats["eigval"]),
            eigvec=tuple(tuple(float(v) for v in row) for row in stats["eigvec"]),
        )
        if len(color.mean_rgb) != 3 or len(color.eigval) != 3 or len(color.eigvec) != 3:
            raise ValueError("stats must hold 3 channels")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, KeyError):
            detail = f"missing {error}"
        elif isinstance(error, AttributeError | TypeError):  # e.g. a list where an object goes
            detail = ('expected a JSON object with "classes" (a list of {"index", "wnid", '
                      '"name"}), "splits" ({name: {"shards": [{"path", "rows", "row_groups", '
                      '...}]}}) and "stats" ({"mean_rgb", "eigval", "eigvec"}), as `vgg-ray '
                      f'prepare` writes it ({error})')  # fmt: skip
        else:
            detail = str(error)
        raise ConfigError(f"invalid manifest {uri}: {detail}") from None
    return Manifest(
        uri=uri,
        s3_endpoint=s3_endpoint,
        base=posixpath.dirname(path),
        classes=infos,
        splits=splits,
        stats=color,
    )


def read_manifest(uri: str, *, s3_endpoint: str | None = None) -> dict:
    """The manifest at `uri` (manifest.json or the folder holding it), checked for its format.

    Shard paths in it are relative to the manifest's folder."""
    uri = manifest_file_uri(uri)
    try:
        manifest = json.loads(read_bytes(uri, s3_endpoint=s3_endpoint))
    except ConfigError as error:
        raise ConfigError(
            f"cannot read manifest: {error} (did `vgg-ray prepare` finish?)"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{uri} is not a vgg-ray manifest (not valid JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{uri} is not a vgg-ray manifest (expected format {MANIFEST_FORMAT})")
    return manifest


def write_manifest(filesystem: pafs.FileSystem, root: str, manifest: dict) -> None:
    """Write `manifest` (the JSON form `load_manifest` reads) as root/manifest.json, atomically:
    readers see the previous manifest or this one, never a part."""
    data = json.dumps(manifest, indent=1).encode()
    write_bytes_atomic(filesystem, f"{root}/{MANIFEST_NAME}", data)
