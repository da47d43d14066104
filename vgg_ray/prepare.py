"""`vgg-ray prepare SRC DEST`: an ImageNet-style tree into Parquet shards plus a manifest.

Input: SRC/train/<wnid>/*.JPEG, and optionally SRC/val/ as <wnid>/ folders or flat files with a
labels file. Output at DEST (a folder or s3://bucket/prefix):

    DEST/train/train-00000-<hash8>.parquet ...   shards (schema `SHARD_SCHEMA`)
    DEST/val/val-00000-<hash8>.parquet ...
    DEST/_state/<shard>.json                     per-shard facts, written right after the shard
    DEST/manifest.json                           written last: readers only ever see whole shards

A shard's name carries a hash of what goes into it (keys, labels, sizes, ...), so a rerun finds
finished shards by name and skips them without decoding, and a changed input gets new names.
Each shard is written under a temporary name (local) or uploaded in one piece (S3, where an
object appears only when its upload completes), so a crash never leaves a partial shard under
a final name.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageFile

from vgg_ray.annotations import read_annotations
from vgg_ray.errors import ConfigError
from vgg_ray.manifest import MANIFEST_FORMAT, MANIFEST_NAME, write_manifest
from vgg_ray.storage import (
    join,
    open_storage,
    read_bytes,
    storage_errors,
    write_bytes_atomic,
)

# The streaming side depends on exactly this schema.
SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # encoded JPEG bytes
        ("label", pa.int32()),  # class index in sorted-wnid order
        ("key", pa.string()),  # path relative to SRC, e.g. train/n01440764/n01440764_10026.JPEG
        ("height", pa.int32()),  # decoded size, pixels
        ("width", pa.int32()),
        # Appendix A: the objects' boxes in pixels of the stored image (`vgg_ray.boxes`' frame);
        # empty where the source has none. Shards written before it lack the column: readers
        # ask for it only in shards with boxes, which always have it.
        (
            "boxes",
            pa.list_(
                pa.struct(
                    [
                        ("label", pa.int32()),
                        ("xmin", pa.float32()),
                        ("ymin", pa.float32()),
                        ("xmax", pa.float32()),
                        ("ymax", pa.float32()),
                    ]
                )
            ),
        ),  # fmt: skip
    ]
)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
JPEG_QUALITY = 95  # for images we must re-encode (CMYK, PNG, palette, ...)
MB = 2**20


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """What `vgg-ray prepare` does; the defaults suit full ILSVRC2012."""

    src: str
    """Local folder holding train/<wnid>/ and optionally val/."""
    dest: str
    """Output folder or s3://bucket/prefix."""
    val_labels: str | None = None
    """Labels for flat val/ files: Kaggle's LOC_val_solution.csv or 'filename wnid' lines."""
    boxes: tuple[str, ...] = ()
    """Bounding boxes (Appendix A): Kaggle LOC_*_solution.csv files and/or folders (or files) of
    PASCAL-VOC XML (Annotations/CLS-LOC). A Kaggle --val-labels file gives the val boxes too."""
    class_names: str | None = None
    """LOC_synset_mapping.txt-style ('n01440764 tench, Tinca tinca'); names default to wnids."""
    s3_endpoint: str | None = None
    """http(s)://host:port of an S3-compatible store; default AWS_ENDPOINT_URL(_S3) or AWS."""
    shard_size: int = 256 * MB
    """Target shard size in bytes (of source files; converted images change it slightly)."""
    row_group_rows: int = 256
    """Rows per Parquet row group: the unit the streaming reader splits shards into."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Worker processes; 1 runs everything in this process."""
    seed: int = 0
    """Seeds the per-split shuffle (so every shard mixes classes) and the stats sample."""
    stats_sample: int = 10_000
    """Training images whose pixels give the mean RGB and the PCA lighting eigen-decomposition."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclass(frozen=True)
class PrepareSummary:
    manifest: str
    images: int
    bytes: int
    shards: int
    reused_shards: int
    converted: int
    rejected: int
    seconds: float
    images_per_s: float
    boxes: dict[str, int] = field(default_factory=dict)  # the manifest's box counts, all splits

    def line(self) -> str:
        b = self.boxes
        box_part = (f"; {b['boxes']:,} boxes on {b['images']:,} images ({b['clipped']} clipped, "
                    f"{b['skipped']} skipped, {b.get('malformed', 0)} malformed)"
                    if b.get("boxes") else "")  # fmt: skip
        return (
            f"{self.images:,} images, {_human(self.bytes)} in {self.shards} shards "
            f"({self.reused_shards} reused); {self.converted} converted, {self.rejected} "
            f"rejected{box_part}; {self.images_per_s:,.0f} images/s; manifest {self.manifest}"
        )


def _human(size: float) -> str:
    units = iter(("KB", "MB", "GB", "TB"))
    unit = "B"
    while size >= 1000 and unit != "TB":
        size, unit = size / 1000, next(units)
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


# ---------------------------------------------------------------------------------------------
# One image


class ImageRejected(Exception):
    """A file that does not decode to an image; it is listed in the manifest, not stored."""


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    height: int
    width: int
    converted: bool
    rgb: Image.Image  # the stored pixels, decoded, for the stats sample


def _reason(error: Exception) -> str:
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    return (text or type(error).__name__).splitlines()[0][:200]


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        # Transparent pixels hold arbitrary colours; show them on white as a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit to 8-bit
    return image.convert("RGB")


def encode_image(data: bytes) -> EncodedImage:
    """Bytes to store for one file: RGB or grayscale JPEGs as they are, anything else that
    decodes converted to RGB JPEG (quality 95). Raises `ImageRejected` with a reason."""
    if not data:
        raise ImageRejected("empty file")
    # A truncated file must fail here, not be padded with grey (another import may flip this).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode every pixel: Image.open alone reads only the header
        # MPO is a JPEG with extra frames appended (some cameras); decoders read the first.
        if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
            return EncodedImage(data, image.height, image.width, False, image.convert("RGB"))
        rgb = _to_rgb(image)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... on bad input
        raise ImageRejected(_reason(error)) from error
    stored = Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    return EncodedImage(out.getvalue(), rgb.height, rgb.width, True, stored)


class PixelMoments:
    """Running sums of RGB pixels (0..255) for the mean and covariance."""

    def __init__(self, total=None, outer=None, pixels: int = 0, images: int = 0):
        self.total = np.zeros(3) if total is None else np.asarray(total, dtype=np.float64)
        self.outer = np.zeros((3, 3)) if outer is None else np.asarray(outer, dtype=np.float64)
        self.pixels, self.images = pixels, images

    def add(self, rgb: Image.Image) -> None:
        x = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        self.pixels += len(x)
        self.images += 1

    def merge(self, other: PixelMoments) -> None:
        self.total += other.total
        self.outer += other.outer
        self.pixels += other.pixels
        self.images += other.images

    def to_json(self) -> dict:
        return {
            "total": self.total.tolist(),
            "outer": self.outer.tolist(),
            "pixels": self.pixels,
            "images": self.images,
        }

    def stats(self) -> dict:
        """Mean RGB and the eigen-decomposition of the RGB covariance, both on the 0..255 scale.

        Covariance is the population one (divide by the pixel count). eigval is sorted
        descending and eigvec[:, i] is the unit eigenvector for eigval[i], the convention of
        AlexNet's PCA lighting noise and torchvision's references."""
        mean = self.total / self.pixels
        cov = self.outer / self.pixels - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        return {
            "mean_rgb": mean.tolist(),
            "eigval": eigval[order].tolist(),
            "eigvec": eigvec[:, order].tolist(),
            "sample_size": self.images,
        }


# ---------------------------------------------------------------------------------------------
# Scanning the source tree


@dataclass(frozen=True)
class Item:
    key: str  # path relative to SRC, "/"-separated
    label: int
    size: int  # bytes on disk: what the shard-size target counts
    boxes: tuple[tuple[int, float, float, float, float], ...] = ()  # (label or -1, box), source px


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _hidden(name: str) -> bool:
    """.DS_Store, macOS's AppleDouble "._x.JPEG" twins, .ipynb_checkpoints/, ...: copies of a
    tree from a Mac or a notebook carry them; they are neither images nor classes."""
    return name.startswith(".")


def _images_in(folder: Path) -> list[os.DirEntry]:
    entries = (e for e in os.scandir(folder) if not _hidden(e.name))
    return sorted((e for e in entries if e.is_file() and _is_image(e.name)), key=lambda e: e.name)


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name))


def _read_lines(path: str, what: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {what} file {path}: {error}") from None


def read_class_names(path: str) -> dict[str, str]:
    """'n01440764 tench, Tinca tinca' lines (LOC_synset_mapping.txt) to {wnid: name}."""
    names = {}
    for line in _read_lines(path, "class-names"):
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return names


def read_val_labels(path: str, wnids: set[str]) -> dict[str, str]:
    """{file stem: wnid} from Kaggle's LOC_val_solution.csv or from 'filename wnid' lines."""
    lines = _read_lines(path, "val-labels")
    kaggle = bool(lines) and lines[0].startswith("ImageId,")
    if kaggle:  # ImageId has no extension; PredictionString starts with the wnid
        rows = csv.DictReader(lines)
        pairs = [
            (n, r["ImageId"], (r["PredictionString"] or "").split()) for n, r in enumerate(rows, 2)
        ]
    else:
        pairs = [(n, *line.split(maxsplit=1)) for n, line in enumerate(lines, 1) if line.strip()]
        pairs = [(n, name, rest[0].split() if rest else []) for n, name, *rest in pairs]
    labels: dict[str, str] = {}
    for number, name, tokens in pairs:
        if not tokens:
            raise ConfigError(f"val-labels file {path}, line {number}: no wnid")
        if tokens[0] not in wnids:
            raise ConfigError(
                f"val-labels file {path}, line {number}: wnid {tokens[0]} is not a class of train/"
            )
        labels[_stem(name)] = tokens[0]
    return labels


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if _is_image(base) else base


def scan_source(config: PrepareConfig) -> tuple[list[dict], dict[str, list[Item]]]:
    """Classes (sorted by wnid) and each split's files, checked for the mistakes users make."""
    src = Path(config.src).expanduser()
    if not src.is_dir():
        raise ConfigError(f"SRC {config.src} does not exist or is not a folder")
    train = src / "train"
    if not train.is_dir():
        raise ConfigError(f"SRC {config.src} has no train/ folder (expected train/<wnid>/*.JPEG)")
    wnids = _class_folders(train)
    if not wnids:
        raise ConfigError(f"{train} has no class folders (expected train/<wnid>/*.JPEG)")
    if len(wnids) == 1:  # a classifier of one class learns nothing and scores 0% error
        raise ConfigError(f"{train} has one class folder ({wnids[0]}); a classifier needs at "
                          "least two (train/<class>/ per class)")  # fmt: skip
    index = {wnid: i for i, wnid in enumerate(wnids)}

    names = read_class_names(config.class_names) if config.class_names else {}
    if config.class_names and (missing := [w for w in wnids if w not in names]):
        raise ConfigError(f"class-names file {config.class_names} has no entry for {missing[0]}")
    classes = [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)]

    splits: dict[str, list[Item]] = {"train": []}
    for wnid in wnids:
        entries = _images_in(train / wnid)
        if not entries:
            raise ConfigError(
                f"class folder train/{wnid} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        splits["train"] += [
            Item(f"train/{wnid}/{e.name}", index[wnid], e.stat().st_size) for e in entries
        ]

    val = src / "val"
    if val.is_dir() and (val_items := _scan_val(val, index, config.val_labels)):
        splits["val"] = val_items
    return classes, splits


def box_files(config: PrepareConfig) -> list[str]:
    """--boxes, and a Kaggle --val-labels file (LOC_val_solution.csv holds the val boxes)."""
    files = list(config.boxes)
    labels = config.val_labels
    first = _read_lines(labels, "val-labels")[:1] if labels and labels not in files else []
    if first and first[0].startswith("ImageId,"):
        files.append(labels)
    return files


def attach_boxes(
    splits: dict[str, list[Item]], classes: list[dict], config: PrepareConfig
) -> tuple[dict[str, list[Item]], dict]:
    """Each item with its boxes from the box files (matched by file stem), labelled by class
    index; a box of a wnid that is no class gets -1 (the shard build skips and counts it).
    Also what the manifest records of the box files: their names and the boxes in them that
    did not parse."""
    files = box_files(config)
    if not files:
        return splits, {}
    index = {c["wnid"]: c["index"] for c in classes}
    found = read_annotations(files)
    matched = 0
    for split, items in splits.items():
        with_boxes = []
        for item in items:
            raw = found.boxes.get(_stem(item.key), ())
            matched += bool(raw)
            boxes = tuple((index.get(wnid, -1), *box) for wnid, *box in raw)
            with_boxes.append(dataclasses.replace(item, boxes=boxes))
        splits[split] = with_boxes
    if config.boxes and not matched:
        raise ConfigError(f"no box in {', '.join(config.boxes)} names an image of {config.src} "
                          "(boxes are matched by file name without extension)")  # fmt: skip
    return splits, {"files": [Path(f).name for f in files], "malformed": found.malformed}


def _scan_val(val: Path, index: dict[str, int], labels_path: str | None) -> list[Item]:
    items = []
    for folder in _class_folders(val):
        if folder not in index:
            raise ConfigError(f"val/{folder} is not a class of train/")
        items += [
            Item(f"val/{folder}/{e.name}", index[folder], e.stat().st_size)
            for e in _images_in(val / folder)
        ]
    flat = _images_in(val)
    if flat:
        if not labels_path:
            raise ConfigError(
                f"val/ holds {len(flat)} files without class folders; pass --val-labels "
                "(LOC_val_solution.csv or 'filename wnid' lines)"
            )
        labels = read_val_labels(labels_path, set(index))
        if unlabelled := [e.name for e in flat if _stem(e.name) not in labels]:
            raise ConfigError(
                f"{len(unlabelled)} val files have no entry in {labels_path}, e.g. {unlabelled[0]}"
            )
        items += [
            Item(f"val/{e.name}", index[labels[_stem(e.name)]], e.stat().st_size) for e in flat
        ]
    return items


# ---------------------------------------------------------------------------------------------
# Planning shards


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to build one shard (picklable)."""

    split: str
    name: str  # e.g. train-00000-ab12cd34
    items: tuple[tuple[str, int, bool, tuple], ...]  # (key, label, in the stats sample, boxes)
    src: str
    dest: str
    s3_endpoint: str | None
    row_group_rows: int

    @property
    def path(self) -> str:  # relative to DEST
        return f"{self.split}/{self.name}.parquet"

    @property
    def state_path(self) -> str:
        return f"_state/{self.name}.json"


def plan_shards(
    split: str, items: list[Item], sample: set[str], config: PrepareConfig
) -> list[ShardTask]:
    """Shuffle (seeded, so each shard mixes classes) and cut by the byte-size target. Images
    with boxes and those without go to shards of their own, so that localisation reads only
    the first (ILSVRC has boxes for about 40% of its training images)."""
    order = np.random.default_rng(config.seed).permutation(len(items))
    groups: list[list[Item]] = []
    for boxed in (True, False):
        group, size = [], 0
        for i in order:
            item = items[i]
            if bool(item.boxes) != boxed:
                continue
            if group and size + item.size > config.shard_size:
                groups.append(group)
                group, size = [], 0
            group.append(item)
            size += item.size
        if group:
            groups.append(group)
    tasks = []
    for number, group in enumerate(groups):
        members = tuple((it.key, it.label, it.key in sample, it.boxes) for it in group)
        # Everything that changes the shard's bytes or its sidecar goes into its name.
        digest = hashlib.sha256(f"{MANIFEST_FORMAT}\n{config.row_group_rows}\n".encode())
        for (key, label, sampled, boxes), it in zip(members, group, strict=True):
            digest.update(f"{key}\t{label}\t{it.size}\t{int(sampled)}\n".encode())
            if boxes:  # (shards without boxes keep the names they had before boxes existed)
                digest.update(f"{boxes}\n".encode())
        name = f"{split}-{number:05d}-{digest.hexdigest()[:8]}"
        tasks.append(
            ShardTask(split, name, members, str(Path(config.src).expanduser().resolve()),
                      config.dest, config.s3_endpoint, config.row_group_rows)
        )  # fmt: skip
    return tasks


def stats_sample(items: list[Item], config: PrepareConfig) -> set[str]:
    count = min(config.stats_sample, len(items))
    chosen = np.random.default_rng(config.seed + 1).choice(len(items), size=count, replace=False)
    return {items[i].key for i in chosen}


# ---------------------------------------------------------------------------------------------
# Building one shard (runs in a worker process)


def build_shard(task: ShardTask) -> dict:
    """Decode-check and write one shard, then its sidecar; returns the sidecar's facts."""
    fs, root = open_storage(task.dest, s3_endpoint=task.s3_endpoint)
    local = isinstance(fs, pafs.LocalFileSystem)
    final = f"{root}/{task.path}"
    if local:
        os.makedirs(os.path.dirname(final), exist_ok=True)
    # Local: a temp file beside the final one, renamed when whole. S3: a local temp file,
    # uploaded in one piece once whole.
    handle, temp = tempfile.mkstemp(
        prefix=f".tmp-{task.name}-",
        suffix=".parquet",
        dir=os.path.dirname(final) if local else None,
    )
    os.close(handle)
    rejected, converted, moments, row_groups = [], 0, PixelMoments(), []
    box_counts = {"images": 0, "boxes": 0, "clipped": 0, "skipped": 0}
    try:
        writer = pq.ParquetWriter(
            temp,
            SHARD_SCHEMA,
            # JPEG bytes do not compress; the small columns do.
            compression={"image": "NONE", "label": "SNAPPY", "key": "SNAPPY",
                         "height": "SNAPPY", "width": "SNAPPY", "boxes": "SNAPPY"},
            use_dictionary=["label", "height", "width"],
            write_statistics=["label", "key", "height", "width"],
            write_page_checksum=True,  # readers verify each page's CRC32 (vgg_ray.data)
        )  # fmt: skip
        with writer:
            batch: list[tuple] = []
            for key, label, sampled, raw_boxes in task.items:
                try:
                    image = encode_image(Path(task.src, key).read_bytes())
                except ImageRejected as reason:
                    rejected.append({"key": key, "reason": str(reason)})
                    continue
                except OSError as error:  # unreadable on disk (permissions, I/O error)
                    rejected.append({"key": key, "reason": f"cannot read file: {error.strerror}"})
                    continue
                converted += image.converted
                if sampled:
                    moments.add(image.rgb)
                boxes = stored_boxes(raw_boxes, image.height, image.width, box_counts)
                batch.append((image.data, label, key, image.height, image.width, boxes))
                if len(batch) == task.row_group_rows:
                    _write_row_group(writer, batch, row_groups)
            if batch:
                _write_row_group(writer, batch, row_groups)
        rows, size = sum(row_groups), os.path.getsize(temp)
        with open(temp, "rb") as file:
            sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        if rows and local:
            os.replace(temp, final)  # atomic: the shard appears whole or not at all
        elif rows:
            write_bytes_atomic(fs, final, Path(temp).read_bytes())
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    facts = {
        "path": task.path if rows else None,  # None: every file of this shard was rejected
        "rows": rows,
        "bytes": size if rows else 0,
        "sha256": sha256 if rows else None,
        "row_groups": row_groups,
        "rejected": rejected,
        "converted": converted,
        "moments": moments.to_json(),
        "boxes": box_counts,
    }
    write_bytes_atomic(fs, f"{root}/{task.state_path}", json.dumps(facts).encode())
    return facts


def stored_boxes(
    raw: tuple, height: int, width: int, counts: dict[str, int]
) -> list[dict[str, float]]:
    """An image's boxes as the shard stores them: clipped to the image; a box of no class
    (label -1) or with no area left inside the image skipped. Both are counted in `counts`."""
    kept = []
    for label, *box in raw:
        clipped = np.clip(box, 0, [width, height, width, height])
        if label < 0 or not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
            counts["skipped"] += 1
            continue
        counts["clipped"] += bool((clipped != box).any())
        xmin, ymin, xmax, ymax = clipped.tolist()
        kept.append({"label": label, "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax})
    counts["images"] += bool(kept)
    counts["boxes"] += len(kept)
    return kept


def _write_row_group(writer: pq.ParquetWriter, batch: list[tuple], row_groups: list[int]) -> None:
    columns = list(zip(*batch, strict=True))
    table = pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, SHARD_SCHEMA, strict=True)],
        schema=SHARD_SCHEMA,
    )
    writer.write_table(table, row_group_size=len(batch))
    row_groups.append(len(batch))
    batch.clear()


# ---------------------------------------------------------------------------------------------
# The whole run


def _finished_shards(fs: pafs.FileSystem, root: str, tasks: list[ShardTask]) -> dict[str, dict]:
    """Sidecars of shards a previous run completed (shard first, then sidecar, so a sidecar
    means its shard is whole). Also removes temp files a killed run left behind."""

    def listing(folder: str) -> dict[str, pafs.FileInfo]:
        selector = pafs.FileSelector(f"{root}/{folder}", allow_not_found=True)
        return {info.base_name: info for info in fs.get_file_info(selector)}

    states = listing("_state")
    done = {}
    for split in {t.split for t in tasks}:
        files = listing(split)
        for name, info in files.items():
            if name.startswith(".tmp-") and isinstance(fs, pafs.LocalFileSystem):
                fs.delete_file(info.path)
        for task in (t for t in tasks if t.split == split):
            if f"{task.name}.json" not in states:
                continue
            facts = json.loads(read_bytes((fs, f"{root}/{task.state_path}")))
            if facts["rows"] == 0 or f"{task.name}.parquet" in files:
                done[task.name] = facts
    return done


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", disable=not enabled, smoothing=0.1)


def prepare(config: PrepareConfig) -> PrepareSummary:
    """Write DEST's shards (skipping those a previous run finished) and then its manifest."""
    if config.shard_size <= 0 or config.row_group_rows <= 0 or config.workers <= 0:
        raise ConfigError("--shard-size, --row-group-rows and --workers must be positive")
    start = time.perf_counter()
    classes, splits = scan_source(config)
    splits, box_sources = attach_boxes(splits, classes, config)
    sample = stats_sample(splits["train"], config)
    tasks = [
        t for split, items in splits.items() for t in plan_shards(split, items, sample, config)
    ]

    fs, root = open_storage(config.dest, s3_endpoint=config.s3_endpoint)
    with storage_errors(config.dest, config.s3_endpoint):
        fs.create_dir(root, recursive=True)
        facts = _finished_shards(fs, root, tasks)
    reused = len(facts)
    todo = [t for t in tasks if t.name not in facts]
    total = sum(len(t.items) for t in tasks)
    bar = _progress(total, total - sum(len(t.items) for t in todo), config.progress)
    with bar:
        if config.workers == 1 or len(todo) <= 1:
            for task in todo:
                facts[task.name] = build_shard(task)
                bar.update(len(task.items))
        else:
            # spawn: callers (tests, Ray drivers) run threads, which fork would copy mid-state.
            context = get_context("spawn")
            with ProcessPoolExecutor(min(config.workers, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(build_shard, task): task for task in todo}
                for future in as_completed(futures):
                    facts[futures[future].name] = future.result()
                    bar.update(len(futures[future].items))

    manifest = build_manifest(classes, tasks, facts, box_sources)
    write_manifest(fs, root, manifest)

    seconds = time.perf_counter() - start
    built = sum(facts[t.name]["rows"] for t in todo)
    return PrepareSummary(
        manifest=join(config.dest, MANIFEST_NAME),
        images=sum(s["rows"] for s in manifest["splits"].values()),
        bytes=sum(s["bytes"] for s in manifest["splits"].values()),
        shards=sum(len(s["shards"]) for s in manifest["splits"].values()),
        reused_shards=reused,
        converted=manifest["converted"],
        rejected=len(manifest["rejected"]),
        seconds=seconds,
        images_per_s=built / seconds if seconds > 0 else 0.0,
        boxes=box_totals(manifest),
    )


def box_totals(manifest: dict) -> dict[str, int]:
    """The manifest's box counts summed over its splits, and the boxes of the box files that
    did not parse ({} where it has no boxes)."""
    totals: dict[str, int] = {}
    for split in manifest["splits"].values():
        for name, count in split.get("boxes", {}).items():
            totals[name] = totals.get(name, 0) + count
    if "box_sources" in manifest:
        totals["malformed"] = manifest["box_sources"]["malformed"]
    return totals


def build_manifest(
    classes: list[dict], tasks: list[ShardTask], facts: dict[str, dict], box_sources: dict
) -> dict:
    splits: dict[str, dict] = {}
    rejected, converted, moments = [], 0, PixelMoments()
    for task in tasks:  # plan order, so a rerun writes the same bytes
        fact = facts[task.name]
        split = splits.setdefault(task.split, {"rows": 0, "bytes": 0, "shards": []})
        rejected += fact["rejected"]
        converted += fact["converted"]
        if task.split == "train":
            moments.merge(PixelMoments(**fact["moments"]))
        boxes = fact.get("boxes") or {}  # (sidecars of shards built before boxes had none)
        if any(boxes.values()):
            totals = split.setdefault("boxes", dict.fromkeys(boxes, 0))
            for name, count in boxes.items():
                totals[name] += count
        if fact["rows"]:
            split["rows"] += fact["rows"]
            split["bytes"] += fact["bytes"]
            shard = {k: fact[k] for k in ("path", "rows", "bytes", "sha256", "row_groups")}
            if boxes.get("images"):  # the rows with boxes: what localisation reads
                shard["boxed_rows"] = boxes["images"]
            split["shards"].append(shard)
    if not moments.images:
        raise ConfigError("no training image could be decoded; see the rejected files")
    return {
        "format": MANIFEST_FORMAT,
        "classes": classes,
        "splits": splits,
        "rejected": sorted(rejected, key=lambda r: r["key"]),
        "converted": converted,
        "stats": moments.stats(),
        **({"box_sources": box_sources} if box_sources else {}),
    }
