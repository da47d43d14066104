"""Stream a split's shards into Ray Train workers: deterministic, exactly once, elastic.

Why not `Dataset.streaming_split`: it hands blocks to workers as they ask for them, so what a
worker sees in an epoch depends on timing, not on (seed, epoch). Here every worker plans its own
epoch from the manifest alone:

1. Training: the epoch's global order (`EpochOrder`), a function of (manifest, seed, epoch)
   only: the split's row groups permuted, then the rows of each window of consecutive row groups
   (`shuffle_buffer` rows or more) permuted among themselves (rows were shuffled across classes
   at prepare time too). Step k is positions [k * global_batch, (k + 1) * global_batch); each of
   the N workers takes a contiguous part of the step's rows sorted by row group. So the step is
   the same images for any N, every row is trained on once per epoch, and a checkpoint's
   position (steps done x global batch) means the same thing after the run lost or gained
   workers. Every rank has rows in every step: DDP needs equal step counts.
2. Evaluation: the split in manifest order, np.array_split over the N workers (nothing
   dropped); the caller all-reduces its counts.
3. A Ray Dataset over the worker's read tasks (`from_items`, order preserved). A training task
   covers a few steps: it reads each row group it needs once, with pyarrow from local disk or
   S3, and handles only this worker's rows of them; a resume starts at its step, so nothing
   before the position is read or decoded. An evaluation task reads one row group. Then either
   the task decodes and crops (decode "cpu": uint8 crops leave the task, 4x smaller than float)
   or passes the JPEG bytes through (decode "gpu": the worker decodes them with nvjpeg on its
   GPU, one batch ahead on a side stream). Either way the same `vgg_ray.transforms` preset runs,
   with each image's draws seeded by (seed, epoch, row index): the same whichever worker.
4. The worker cuts its rows into its micro-batches and finishes them on its device (colour
   shift, mean, float).

A record that fails to decode, or whose label is not a class of the manifest, is skipped and
counted (`SplitStream.skipped`), never fatal. A shard that is not what the manifest says (another
size, unreadable Parquet, a page checksum that fails) stops the run with an error naming it;
`verify_shards` (`vgg-ray verify`) checks every shard's sha256. Reads wait out a storage outage
(`vgg_ray.storage.retry_transient`).
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from vgg_ray.boxes import crop_target
from vgg_ray.errors import ConfigError, require
from vgg_ray.manifest import Manifest, shard_sizes
from vgg_ray.storage import (
    is_transient,
    open_storage,
    retry_transient,
)
from vgg_ray.transforms import (
    PAPER_CROP,
    PAPER_SCALE,
    ColorStats,
    EvalPreset,
    Prepared,
    TrainingPreset,
    Window,
    decode_gpu,
    to_float,
)

DECODERS = ("cpu", "gpu")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Where a run's shards are and how they become the net's input (the paper's recipe)."""

    manifest: str = ""
    """The shards' manifest.json, or the folder holding it: a local path or s3://bucket/prefix."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint (http://host:port) for s3:// URIs; None: AWS_ENDPOINT_URL[_S3]
    or AWS itself."""
    scale: tuple[int, int] = PAPER_SCALE
    """Training scale (Smin, Smax): S per image uniform in [Smin, Smax] ("scale jittering",
    Sect. 3.1); Smin = Smax trains at the fixed scale S."""
    crop: int = PAPER_CROP
    """Side of the square crop fed to the net (224 in the paper)."""
    eval_scale: int = 0
    """Q of validation during training: smaller side before the centre crop (Sect. 3.2).
    0: the paper's single test scale for the training scale, Q = S for a fixed S and
    (Smin + Smax) / 2 for a jittered one (Table 3: 384 for [256, 512])."""
    color_shift_std: float = 0.1
    """Std of AlexNet's PCA colour shift multipliers alpha_i; 0 turns the shift off."""
    normalize: str = "paper"
    """"paper" (0..255 minus mean RGB) or "torchvision" (ImageNet mean/std on 0..1)."""
    decode: str = "cpu"
    """Where JPEGs are decoded: "cpu" in Ray Data tasks, or "gpu" with nvjpeg on the training
    worker's device (the tasks then only read bytes; needs a CUDA device)."""
    shuffle_buffer: int = 4096
    """Training: rows shuffled together, on top of the per-epoch permutation of row groups
    (windows of consecutive row groups holding at least this many rows; 0: row groups keep
    their rows' order). Global, so the same for any worker count."""
    seed: int = 0
    """Fixes every epoch's order and every image's augmentation."""
    prefetch_batches: int = 2
    """Batches each worker prepares ahead of the one it is training on."""
    read_cpus: float = 1.0
    """Logical CPUs each read/decode task reserves. Inside Ray Train workers that hold the
    node's CPUs, lower it (e.g. 0.5) or give the cluster more logical CPUs than cores, or
    the tasks never get scheduled."""

    def validate(self) -> StreamConfig:
        """Raise ConfigError for the first problem found; return self for chaining."""
        # The presets check the recipe (scales, crop, colour shift, normalisation).
        self.training_preset(ColorStats())
        self.eval_preset(ColorStats())
        checks = [
            (self.decode in DECODERS,
             f"unknown decode {self.decode!r}; choose one of {', '.join(DECODERS)}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (self.prefetch_batches >= 0, "prefetch_batches must be >= 0"),
            (self.read_cpus > 0, f"read_cpus must be > 0, got {self.read_cpus}"),
            # Every VGG net halves its input five times (2x2 max-pools): 32 px leave 1 pixel.
            (self.crop >= 32, f"crop must be >= 32 px (five 2x2 max-pools), got {self.crop}"),
        ]  # fmt: skip
        require(checks)
        return self

    def training_preset(self, stats: ColorStats) -> TrainingPreset:
        return TrainingPreset(
            scale=(int(self.scale[0]), int(self.scale[1])), crop=self.crop,
            color_shift_std=self.color_shift_std, normalize=self.normalize, stats=stats,
            seed=self.seed,
        )  # fmt: skip

    def eval_preset(self, stats: ColorStats) -> EvalPreset:
        return EvalPreset(
            scale=self.validation_scale, crop=self.crop, normalize=self.normalize, stats=stats
        )

    @property
    def validation_scale(self) -> int:
        """Q of validation: `eval_scale`, or the paper's single test scale for `scale`."""
        return self.eval_scale or (int(self.scale[0]) + int(self.scale[1])) // 2


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group: the unit a read task handles."""

    path: str  # shard path, relative to the manifest's folder
    row_group: int
    start: int
    stop: int
    first_index: int  # the split's row index of row `start`


def epoch_order(
    manifest: Manifest, split: str, *, seed: int, epoch: int, training: bool, boxed: bool = False
):
    """All pieces of the split (`boxed`: of its shards with boxes) in this epoch's order: row
    groups permuted by (seed, epoch) in training, manifest order in evaluation."""
    pieces = []
    for shard in manifest.shards(split, boxed=boxed):
        offset = 0
        for group, rows in enumerate(shard.row_groups):
            pieces.append(Piece(shard.path, group, 0, rows, shard.first_index + offset))
            offset += rows
    if not training:
        return pieces
    order = np.random.default_rng((seed, epoch)).permutation(len(pieces))
    return [pieces[i] for i in order]


def worker_span(rows: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """Evaluation: positions [start, stop) of the split that worker `rank` reads, np.array_split
    sizes (nothing dropped; the caller all-reduces its counts)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def worker_pieces(order: list[Piece], *, rank: int, world_size: int) -> tuple[list[Piece], int]:
    """Evaluation: the pieces (cut to size) covering worker `rank`'s span of `order`, and its
    row count."""
    rows = sum(p.stop - p.start for p in order)
    start, stop = worker_span(rows, rank=rank, world_size=world_size)
    mine, position = [], 0
    for piece in order:
        size = piece.stop - piece.start
        lo, hi = max(start, position), min(stop, position + size)
        if lo < hi:
            skip = lo - position
            mine.append(Piece(piece.path, piece.row_group, piece.start + skip,
                              piece.start + skip + hi - lo, piece.first_index + skip))  # fmt: skip
        position += size
    return mine, stop - start


class EpochOrder:
    """A training epoch's order of the split's rows: a function of (manifest, seed, epoch) alone,
    the same for any worker count, so a run can change its worker count mid-epoch and a resume
    starts at a global position without replaying what lies before it.

    The row groups are permuted (`epoch_order`); each window of consecutive row groups holding
    at least `window_rows` rows has its rows permuted among themselves (the shuffle a local
    buffer would give, but global). Step k trains on positions [k * B, (k + 1) * B) of this
    order; a last step of fewer than `max_workers` rows joins the one before, so every worker
    has rows in every step. A worker's share of a step is a contiguous part of the step's rows
    sorted by row group (np.array_split sizes): the step is the same set of images whatever the
    worker count, and each worker reads only about 1/N of the step's row groups."""

    def __init__(self, manifest: Manifest, split: str, *, seed: int, epoch: int,
                 window_rows: int, global_batch: int, max_workers: int = 1,
                 boxed: bool = False):  # fmt: skip
        self.pieces = epoch_order(manifest, split, seed=seed, epoch=epoch, training=True,
                                  boxed=boxed)  # fmt: skip
        sizes = np.array([p.stop - p.start for p in self.pieces], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        self.rows = int(sizes.sum())
        self.piece = np.repeat(np.arange(len(sizes)), sizes)  # per position: its row group
        self.offset = np.arange(self.rows) - np.repeat(starts, sizes)  # ... and row in it
        if window_rows > 1:
            window_start, window = 0, 0
            ends = np.cumsum(sizes).tolist()  # each row group's end position
            for i, end in enumerate(ends):
                if end - window_start >= window_rows or i == len(ends) - 1:
                    rng = np.random.default_rng((seed, epoch, window, 3))
                    shuffle = window_start + rng.permutation(end - window_start)
                    self.piece[window_start:end] = self.piece[shuffle]
                    self.offset[window_start:end] = self.offset[shuffle]
                    window_start, window = end, window + 1
        self.global_batch = global_batch
        steps = max(1, math.ceil(self.rows / global_batch))
        if steps > 1 and self.rows - (steps - 1) * global_batch < max_workers:
            steps -= 1  # the few last rows join the step before
        self.steps = steps

    def step_span(self, step: int) -> tuple[int, int]:
        """Positions [start, stop) of step `step`."""
        stop = self.rows if step == self.steps - 1 else (step + 1) * self.global_batch
        return step * self.global_batch, stop

    def share(self, step: int, *, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Worker `rank`'s rows of step `step`: (row group index into `pieces`, row in it)."""
        start, stop = self.step_span(step)
        piece, offset = self.piece[start:stop], self.offset[start:stop]
        mine = np.array_split(np.lexsort((offset, piece)), world_size)[rank]
        return piece[mine], offset[mine]


# --- the read task (runs in Ray Data workers) --------------------------------------------------


@dataclass(frozen=True)
class _ReadSpec:
    """What a read task needs; plain values, so it pickles (no filesystem object)."""

    manifest_uri: str
    s3_endpoint: str | None
    base: str
    decode: str
    preset: TrainingPreset | EvalPreset
    epoch: int
    sizes: Mapping[str, int] | None = None  # shard path -> bytes, from the manifest
    classes: int = 0  # labels outside [0, classes) are skipped and counted
    trace: str = ""  # test-only: a folder where read tasks log what they read
    boxes: bool = False  # localisation: read the boxes too, each crop gets its box target


@functools.lru_cache(maxsize=4)
def _filesystem(uri: str, s3_endpoint: str | None) -> pafs.FileSystem:
    return open_storage(uri, s3_endpoint=s3_endpoint)[0]


@functools.lru_cache(maxsize=16)
def _parquet(uri: str, s3_endpoint: str | None, path: str) -> pq.ParquetFile:
    # Cached per task process: the footer is read once per shard, not once per row group.
    # CRC32 per page where the writer stored one (vgg-ray prepare does): corruption is an error
    # naming the shard, not silently wrong pixels or labels.
    file = _filesystem(uri, s3_endpoint).open_input_file(path)
    return pq.ParquetFile(file, page_checksum_verification=True)


RECORD_COLUMNS = ["image", "label", "key"]


def _read_piece(uri: str, s3_endpoint: str | None, path: str, size: int, group: int,
                boxes: bool = False):  # fmt: skip
    """One row group of one shard (with its boxes column if asked), retried through storage
    outages; a shard that is broken is a ConfigError naming it."""
    columns = RECORD_COLUMNS + ["boxes"] * boxes

    def read():
        try:
            # One HEAD per row group, not cached: task processes outlive runs, and a shard
            # truncated or replaced since it was last opened must not be read.
            info = _filesystem(uri, s3_endpoint).get_file_info(path)
            if size and info.size != size:
                found = "missing" if info.type == pafs.FileType.NotFound else f"{info.size} bytes"
                raise ConfigError(
                    f"shard {path} is {found} but the manifest says {size} bytes: truncated or "
                    "replaced; run `vgg-ray prepare` again"
                )
            parquet = _parquet(uri, s3_endpoint, path)
            return parquet.read_row_group(group, columns=columns)
        except ConfigError:
            raise
        except (OSError, ValueError, pa.ArrowException) as error:
            if is_transient(error):
                raise  # retried below
            raise ConfigError(
                f"shard {path} (row group {group}) is unreadable: "
                f"{str(error).splitlines()[0][:200]}; check it with `vgg-ray verify`"
            ) from None

    return retry_transient(read, what=f"reading shard {path}")


def read_records(
    batch: dict[str, np.ndarray],
    *,
    manifest_uri: str,
    s3_endpoint: str | None,
    base: str,
    sizes: Mapping[str, int] | None = None,
    classes: int = 0,
    boxes: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data batch fn: pieces -> raw rows: "image" (JPEG bytes, object), "label", "index"
    (the split's row index) and "key" (and "boxes" if asked: per row a (k, 5) array of label,
    xmin, ymin, xmax, ymax). Whoever decodes them (e.g. an evaluation actor on its GPU) works
    on these. `sizes` (shard path -> bytes) checks each shard's size on first open; with
    `classes`, a label outside [0, classes) becomes -1: skipped and counted downstream like a
    record that does not decode."""
    tables = []
    for path, group, start, stop in zip(
        batch["path"], batch["row_group"], batch["start"], batch["stop"], strict=True
    ):
        size = (sizes or {}).get(path, 0)
        table = _read_piece(manifest_uri, s3_endpoint, f"{base}/{path}", size, int(group), boxes)
        tables.append(table.slice(int(start), int(stop) - int(start)))
    index = np.concatenate(
        [np.arange(f, f + t.num_rows) for f, t in zip(batch["first_index"], tables, strict=True)]
    )
    return _raw_rows(pa.concat_tables(tables), index, classes)


def _raw_rows(table: pa.Table, index: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """A table's records as raw rows ("image" bytes, "label", "index", "key"); with `classes`,
    a label outside [0, classes) becomes -1 (skipped and counted downstream)."""
    label = table.column("label").to_numpy().astype(np.int64)
    if classes:
        label[(label < 0) | (label >= classes)] = -1
    image = np.array(table.column("image").to_pylist(), dtype=object)
    key = np.array(table.column("key").to_pylist(), dtype=object)
    rows = {"image": image, "label": label, "index": index, "key": key}
    if "boxes" in table.column_names:
        rows["boxes"] = np.empty(len(label), dtype=object)
        rows["boxes"][:] = [
            np.array([[b["label"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in boxes],
                     np.float32).reshape(-1, 5)
            for boxes in table.column("boxes").to_pylist()
        ]  # fmt: skip
    return rows


def box_targets(
    windows: Sequence[Window], rows: dict[str, np.ndarray], good: list[int], crop: int
) -> np.ndarray:
    """float32 (len(good), 4): the box target of each row of `good` in its crop (NaN: none
    shows), `windows` being the crops a preset made of them (`Prepared.windows`)."""
    return np.array(
        [crop_target(rows["boxes"][i], int(rows["label"][i]), window, crop)
         for i, window in zip(good, windows, strict=True)], np.float32,
    ).reshape(-1, 4)  # fmt: skip


def read_pieces(batch: dict[str, np.ndarray], *, spec: _ReadSpec) -> dict[str, np.ndarray]:
    """Ray Data batch fn: pieces -> rows. decode "cpu": uint8 crops with their gain/bias, label
    -1 where a record did not decode; decode "gpu": the JPEG bytes."""
    rows = read_records(
        batch, manifest_uri=spec.manifest_uri, s3_endpoint=spec.s3_endpoint, base=spec.base,
        sizes=spec.sizes, classes=spec.classes, boxes=spec.boxes,
    )  # fmt: skip
    return rows if spec.decode == "gpu" else _decoded(rows, spec)


def _decoded(rows: dict[str, np.ndarray], spec: _ReadSpec) -> dict[str, np.ndarray]:
    """Raw rows -> uint8 crops with their gain/bias; label -1 where a record did not decode."""
    data, label, index, key = rows["image"], rows["label"], rows["index"], rows["key"]
    prepared, good = spec.preset.prepare_jpegs(list(data), epoch=spec.epoch,
                                               indices=index.tolist())  # fmt: skip
    crop = spec.preset.crop
    pixels = np.zeros((len(data), 3, crop, crop), np.uint8)
    gain, bias = np.zeros((len(data), 3), np.float32), np.zeros((len(data), 3), np.float32)
    pixels[good], gain[good], bias[good] = prepared.pixels.numpy(), prepared.gain, prepared.bias
    decoded = np.zeros(len(data), bool)
    decoded[good] = True
    label[~decoded] = -1  # with bad labels
    out = {"pixels": pixels, "gain": gain, "bias": bias, "label": label, "index": index,
           "key": key}  # fmt: skip
    if spec.boxes:
        out["target"] = np.full((len(data), 4), np.nan, np.float32)
        out["target"][good] = box_targets(prepared.windows, rows, good, crop)
    return out


TRACE = "VGG_RAY_TRACE"


def trace(folder: str, kind: str, lines: list[str]) -> None:
    """Test-only: with a folder (from $VGG_RAY_TRACE where the run started), append `lines` to
    its `<kind>-<pid>.log`: what read tasks read, what workers trained on, so tests can prove
    exactly-once across restarts and worker counts. No folder: nothing."""
    if folder:
        with open(f"{folder}/{kind}-{os.getpid()}.log", "a") as log:
            log.writelines(f"{line}\n" for line in lines)


def read_steps(batch: dict[str, np.ndarray], *, spec: _ReadSpec) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch fn, training: one task -> a worker's rows of a few consecutive steps, one
    output batch per step, in order. Each row group the task needs is read once; rows of it
    that other workers or earlier steps take are not decoded."""
    task = pickle.loads(batch["task"][0])  # what `SplitStream._tasks` planned
    tables: dict[int, pa.Table] = {}  # row groups read so far, each read when a step needs it
    first_index = np.asarray(task["first_index"])
    for piece, offset in zip(task["piece"], task["offset"], strict=True):
        needed = np.unique(piece).tolist()
        for local in needed:
            if local not in tables:
                path, group = task["pieces"][local]
                size = (spec.sizes or {}).get(path, 0)
                tables[local] = _read_piece(spec.manifest_uri, spec.s3_endpoint,
                                            f"{spec.base}/{path}", size, int(group),
                                            spec.boxes)  # fmt: skip
                trace(spec.trace, "read", [f"{path} {group}"])
        parts = [tables[p] for p in needed]
        starts = np.cumsum([0] + [t.num_rows for t in parts[:-1]])
        rows = starts[np.searchsorted(needed, piece)] + offset
        table = pa.concat_tables(parts).take(pa.array(rows))
        raw = _raw_rows(table, first_index[piece] + offset, spec.classes)
        yield raw if spec.decode == "gpu" else _decoded(raw, spec)


# --- the worker side ---------------------------------------------------------------------------


def one_batch_ahead(batches: Iterator[tuple], device: torch.device) -> Iterator[tuple]:
    """Make batch k+1 (nvjpeg decode + augmentation) on a side CUDA stream while the caller's
    step k runs on the current one: the decode kernels fill the gaps of the step's instead of
    adding to its time. The batches are the same; each is handed over only once its stream's
    work is done (the current stream waits on an event), and its tensors are marked as used on
    the current stream so the allocator does not reuse them early."""
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    ready = None
    while True:
        with torch.cuda.stream(side):
            upcoming = next(batches, None)  # launches k+1's work before k is handed over
        if ready is not None:
            yield ready
        if upcoming is None:
            return
        current.wait_stream(side)
        for tensor in upcoming:
            if isinstance(tensor, torch.Tensor):
                tensor.record_stream(current)
        ready = upcoming


def _micro_batches(blocks: Iterable[dict], steps: list[tuple[int, int]]) -> Iterator[dict]:
    """Ray blocks, in order -> each step's (rows, micro-batches) rows cut into that many
    micro-batches (np.array_split sizes). Blocks may be split or merged on the way; only the
    order of rows counts."""
    blocks, pending, have = iter(blocks), [], 0
    for rows, count in steps:
        while have < rows:
            block = next(blocks)
            pending.append(block)
            have += len(block["label"])
        merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
        for part in np.array_split(np.arange(rows), count):
            yield {k: v[part] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        pending, have = ([rest] if have > rows else []), have - rows


def _started(items: Iterable) -> Iterator:
    """`items`, its first one asked for now in a thread (Ray Data starts a dataset's execution
    only when its first batch is asked for), so it is made while the caller is busy."""
    items, ready = iter(items), Future()

    def ask() -> None:
        try:
            ready.set_result(next(items, ready))  # `ready` itself marks an empty iterator
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread)
            ready.set_exception(error)

    threading.Thread(target=ask, daemon=True, name="vgg-ray-stream-start").start()

    def resumed() -> Iterator:
        if (item := ready.result()) is not ready:
            yield item
            yield from items

    return resumed()


class SplitStream:
    """One worker's batches of one split for one epoch.

    ```
    stream = SplitStream(manifest, "train", config, epoch=e, rank=r, world_size=n, batch_size=b,
                         device=device, training=True, global_batch=B)
    for micro_batches in stream.steps():   # training: this worker's share of each step
        ...                                # [(images, labels, keys), ...], on `device`
    for images, labels in stream:          # every batch (evaluation; or training, flattened)
    ```
    Training follows the epoch's global order (`EpochOrder`): step k is the same images for any
    worker count, each worker's share at most `batch_size` rows per micro-batch, and from
    `start_step` on nothing before it is read or decoded: a resume costs no replay, and a run
    that lost or gained workers continues the same epoch. Every rank yields the same number of
    steps. Evaluation: the split in manifest order, np.array_split over the ranks, batches of
    `batch_size` (the last smaller). Records that fail to decode are counted in `skipped`; in
    training they are replaced by other images of the same micro-batch (it keeps its size), in
    evaluation they are dropped (the batch shrinks). Needs a running Ray (as in a Ray Train
    worker).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        config: StreamConfig,
        *,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int,
        device: torch.device | str | None = None,
        training: bool = True,
        dtype: torch.dtype = torch.float32,
        global_batch: int = 0,
        max_workers: int = 0,
        start_step: int = 0,
        boxes: bool = False,
    ):
        config.validate()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or "cpu")
        if config.decode == "gpu" and self.device.type != "cuda":
            raise ConfigError(f"decode 'gpu' needs a CUDA device, got {self.device}")
        self.manifest, self.split, self.config = manifest, split, config
        self.epoch, self.rank, self.training = epoch, rank, training
        self.batch_size, self.dtype, self.boxes = batch_size, dtype, boxes
        if training:
            self.order = EpochOrder(manifest, split, seed=config.seed, epoch=epoch,
                                    window_rows=config.shuffle_buffer,
                                    global_batch=global_batch or batch_size * world_size,
                                    max_workers=max(max_workers, world_size),
                                    boxed=boxes)  # fmt: skip
            self.start_step = start_step
            self.shares = [self.order.share(k, rank=rank, world_size=world_size)
                           for k in range(start_step, self.order.steps)]  # fmt: skip
            # Micro-batches per step: as few as `batch_size` allows, np.array_split sizes.
            self.micro_batches = [max(1, math.ceil(len(p) / batch_size)) for p, _ in self.shares]
            self.rows = sum(len(p) for p, _ in self.shares)
        else:
            order = epoch_order(manifest, split, seed=config.seed, epoch=epoch, training=False,
                                boxed=boxes)  # fmt: skip
            self.pieces, self.rows = worker_pieces(order, rank=rank, world_size=world_size)
        stats = manifest.stats
        self.preset = config.training_preset(stats) if training else config.eval_preset(stats)
        self.skipped = 0

    def __len__(self) -> int:
        """The batches `iter(self)` yields (training: micro-batches over all steps left)."""
        if self.training:
            return sum(self.micro_batches)
        return math.ceil(self.rows / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.iter_batches():
            yield images, labels

    def _spec(self) -> _ReadSpec:
        return _ReadSpec(self.manifest.uri, self.manifest.s3_endpoint, self.manifest.base,
                         self.config.decode, self.preset, self.epoch, shard_sizes(self.manifest),
                         len(self.manifest.classes), os.environ.get(TRACE, ""),
                         self.boxes)  # fmt: skip

    def _batches(self, tasks: Sequence[bytes] = ()) -> Iterable[dict[str, np.ndarray]]:
        """The output of a Ray Dataset over `tasks` (training: read tasks of `_tasks`, in
        Ray's blocks) or, in evaluation, over the worker's pieces (batches of `batch_size`)."""
        import ray.data

        if self.training:
            items, read = [{"task": task} for task in tasks], read_steps
        else:
            items, read = [p.__dict__ for p in self.pieces], read_pieces
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read, batch_size=1, fn_kwargs={"spec": self._spec()}, num_cpus=self.config.read_cpus
        )
        # The epoch's order is part of the result: keep the pieces' order through the tasks.
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False
        return dataset.iter_batches(batch_size=None if self.training else self.batch_size,
                                    batch_format="numpy",
                                    prefetch_batches=self.config.prefetch_batches)  # fmt: skip

    def _tasks(self) -> Iterator[bytes]:
        """Read tasks over the steps left, each about one shuffle window's steps: the row
        groups it needs (each read once) and, per step, which of their rows, in order. The
        first tasks are shorter (1, 2, 4, ... steps): Ray Data hands a task's output on in
        large blocks, so a stream's first batch would otherwise wait for a window's work."""
        per_task = max(1, math.ceil(self.config.shuffle_buffer / self.order.global_batch))
        first, size = 0, 1
        while first < len(self.shares):
            chunk = self.shares[first : first + size]
            first, size = first + len(chunk), min(2 * size, per_task)
            used = np.unique(np.concatenate([piece for piece, _ in chunk]))
            pieces = [self.order.pieces[i] for i in used]
            yield pickle.dumps({
                "pieces": [(p.path, p.row_group) for p in pieces],
                "first_index": [p.first_index for p in pieces],
                "piece": [np.searchsorted(used, piece) for piece, _ in chunk],
                "offset": [offset for _, offset in chunk],
            })  # fmt: skip

    def steps(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
        """Training: this worker's share of each step left, as its micro-batches."""
        batches = self.iter_batches()
        for count in self.micro_batches:
            yield [next(batches) for _ in range(count)]

    def iter_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like iterating the stream, with each batch's record keys (for per-image results)."""
        if not self.rows:
            return
        if self.training:
            blocks = _micro_batches(
                self._training_blocks(),
                [(len(p), n) for (p, _), n in zip(self.shares, self.micro_batches, strict=True)],
            )
        else:
            blocks = self._batches()
        finished = (self._finish(batch) for batch in blocks)
        if self.config.decode == "gpu":
            finished = one_batch_ahead(finished, self.device)
        count = 0
        for batch in finished:
            count += 1
            yield batch
        if count != len(self):  # would break DDP's equal step counts: a bug, not bad data
            raise RuntimeError(f"rank {self.rank} yielded {count} batches, expected {len(self)}")

    def _training_blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """The read tasks' output in order, the first task run alone: a (re)started stream's
        first step is decoded with the node's cores to itself, not shared with the following
        tasks (on a busy node those would take most of them), so the time to the first step is
        the same wherever in the epoch the stream starts. The rest starts the moment the first
        is done, before its step is handed over."""
        first, *rest = self._tasks()
        head = list(self._batches([first]))  # one step's rows
        following = _started(self._batches(rest)) if rest else iter(())
        yield from head
        yield from following

    def _finish(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """A Ray batch -> the net's input on the device, minus records that failed to decode,
        with the labels (N,), or with `boxes` the targets (N, 5): label, then the crop's box
        target (centre x, centre y, width, height over the crop side; NaN where none shows)."""
        labels, keys = batch["label"], list(batch["key"])
        if self.config.decode == "gpu":
            images = decode_gpu(list(batch["image"]), self.device)
            good = [i for i, image in enumerate(images) if image is not None and labels[i] >= 0]
            prepared = self.preset.prepare(
                [images[i] for i in good], epoch=self.epoch, indices=batch["index"][good].tolist()
            )
            if self.boxes:
                batch["target"] = np.full((len(labels), 4), np.nan, np.float32)
                batch["target"][good] = box_targets(prepared.windows, batch, good,
                                                    self.preset.crop)  # fmt: skip
        else:
            good = np.flatnonzero(labels >= 0).tolist()
            pixels = torch.from_numpy(batch["pixels"][good])
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            prepared = Prepared(pixels, torch.from_numpy(batch["gain"][good]),
                                torch.from_numpy(batch["bias"][good]))  # fmt: skip
        self.skipped += len(labels) - len(good)
        rows = good
        if self.training and good and len(good) < len(labels):
            # Keep the batch's size in training: stand-ins from the same batch for the bad ones.
            stand_ins = np.resize(np.arange(len(good)), len(labels) - len(good)).tolist()
            prepared = Prepared(
                torch.cat([prepared.pixels, prepared.pixels[stand_ins]]),
                torch.cat([prepared.gain, prepared.gain[stand_ins]]),
                torch.cat([prepared.bias, prepared.bias[stand_ins]]),
            )
            rows = good + [good[i] for i in stand_ins]
        images = to_float(prepared, self.dtype)
        targets = labels[rows]
        if self.boxes:
            targets = np.concatenate([targets[:, None].astype(np.float32), batch["target"][rows]],
                                     axis=1)  # fmt: skip
        label_tensor = torch.from_numpy(targets).to(self.device, non_blocking=True)
        return images, label_tensor, [str(keys[i]) for i in rows]
