"""The Ray Data stream: exactly once across workers, an epoch's order a function of (seed, epoch),
evaluation complete, bad records skipped and counted, S3 like local disk, clear errors."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vgg_ray.data import EpochOrder, SplitStream, StreamConfig
from vgg_ray.errors import ConfigError
from vgg_ray.manifest import load_manifest

CLASSES = ["n01440764", "n01443537", "n01484850"]
# Train: 83 rows (odd: one leftover row with 2 workers, two with 3) in row groups of up to 8.
SPLITS = {"train": [45, 38], "val": [21], "corrupt": [10], "empty": []}
CORRUPT = {"corrupt-0003", "corrupt-0007"}  # garbage bytes instead of a JPEG
COLUMNS = ["image", "label", "key", "height", "width"]
CONFIG = StreamConfig(scale=(32, 48), crop=32, eval_scale=40, shuffle_buffer=16, read_cpus=0.5)


def _jpeg(rng: np.random.Generator, label: int) -> tuple[bytes, int, int]:
    height, width = int(rng.integers(32, 64)), int(rng.integers(32, 64))
    pixels = np.full((height, width, 3), 60 + 60 * label, np.uint8)
    pixels += rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("L" if label == 2 else "RGB").save(buffer, "JPEG")
    return buffer.getvalue(), height, width


def write_shards(root: Path) -> Path:
    """Shards + manifest.json in vgg_ray.prepare's format (vgg-ray-shards/1)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, shard_rows in SPLITS.items():
        shards, row = [], 0
        for number, rows in enumerate(shard_rows):
            records = []
            for _ in range(rows):
                key, label = f"{split}-{row:04d}", int(rng.integers(0, len(CLASSES)))
                data, height, width = _jpeg(rng, label)
                records.append((b"\x00garbage" if key in CORRUPT else data, label, key, height,
                                width))  # fmt: skip
                row += 1
            table = pa.table(
                dict(zip(COLUMNS, zip(*records, strict=True), strict=True)),
                schema=pa.schema([("image", pa.binary()), ("label", pa.int32()),
                                  ("key", pa.string()), ("height", pa.int32()),
                                  ("width", pa.int32())]),
            )  # fmt: skip
            path = f"{split}/{split}-{number:05d}-0000abcd.parquet"
            (root / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / path, row_group_size=8)
            groups = [min(8, rows - start) for start in range(0, rows, 8)]
            shards.append(
                {"path": path, "rows": rows, "bytes": 0, "sha256": "", "row_groups": groups}
            )
        splits[split] = {"rows": sum(shard_rows), "bytes": 0, "shards": shards}
    manifest = {
        "format": "vgg-ray-shards/1",
        "classes": [{"index": i, "wnid": w, "name": w} for i, w in enumerate(CLASSES)],
        "splits": splits,
        "rejected": [],
        "converted": 0,
        "stats": {"mean_rgb": [120.0, 115.0, 100.0], "eigval": [3000.0, 300.0, 30.0],
                  "eigvec": np.eye(3).tolist(), "sample_size": 10},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from vgg_ray import runtime

    # 4 logical CPUs on 2 cores (DESIGN.md): otherwise Ray Data's tasks can starve.
    runtime.start_local(num_cpus=4, dashboard=False)
    yield
    ray.shutdown()


def run(manifest, split="train", config=CONFIG, **kwargs):
    """All batches of one worker's stream, as (images, labels, keys) concatenated, plus it."""
    kwargs = {"epoch": 0, "batch_size": 8, **kwargs}
    stream = SplitStream(manifest, split, config, **kwargs)
    batches = list(stream.iter_batches())
    assert len(batches) == len(stream)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return images, labels, [k for b in batches for k in b[2]], stream


def test_the_epoch_order_is_global_exactly_once_and_a_function_of_seed_and_epoch(shards):
    """Every row once per epoch for any worker count, each step the same images whatever the
    count (so a run may change it mid-epoch), and the order a function of (seed, epoch)."""
    manifest = load_manifest(str(shards))
    assert len(manifest.classes) == 3 and manifest.rows("train") == 83

    def order(seed=0, epoch=1, **kwargs):
        values = dict(seed=seed, epoch=epoch, window_rows=16, global_batch=16, max_workers=4)
        return EpochOrder(manifest, "train", **{**values, **kwargs})

    plan = order()
    # 83 rows, 16 a step: 5 steps, the last one 19 rows (the 3 left over join it: < 4 workers).
    assert plan.steps == 5 and plan.step_span(4) == (64, 83)
    steps = {}
    for world_size in (1, 2, 3):
        for step in range(plan.steps):
            shares = [plan.share(step, rank=r, world_size=world_size) for r in range(world_size)]
            rows = [{(int(p), int(o)) for p, o in zip(*share, strict=True)} for share in shares]
            assert all(rows) and sum(map(len, rows)) == len(set().union(*rows))  # disjoint
            steps.setdefault(step, set().union(*rows))
            assert set().union(*rows) == steps[step]  # the same images for 1, 2 or 3 workers
    positions = [row for rows in steps.values() for row in rows]
    assert len(positions) == len(set(positions)) == 83  # every row once, none dropped
    assert sorted((plan.pieces[p].first_index + o for p, o in positions)) == list(range(83))
    # Rows mix across the row groups of a window: a step is not one row group in order.
    assert len({p for p, _ in steps[0]}) > 1
    # A function of (seed, epoch) alone; another seed or epoch, another order.
    assert np.array_equal(plan.piece, order().piece) and np.array_equal(plan.offset, order().offset)

    def first_step(seed, epoch):  # the split's row indices of step 0
        plan = order(seed, epoch)
        piece, offset = plan.share(0, rank=0, world_size=1)
        return tuple(plan.pieces[p].first_index + o for p, o in zip(piece, offset, strict=True))

    assert len({first_step(seed, epoch) for seed in (0, 1) for epoch in (0, 1)}) == 4


def test_two_workers_read_every_row_exactly_once(shards, ray_cluster):
    manifest = load_manifest(str(shards))
    results = [run(manifest, epoch=2, rank=r, world_size=2) for r in range(2)]
    keys = [set(k) for _, _, k, _ in results]
    assert len(keys[0]) + len(keys[1]) == 83 and len(keys[0] | keys[1]) == 83  # none dropped
    assert keys[0] | keys[1] == {f"train-{i:04d}" for i in range(83)}
    # 83 rows, global batch 16 (2 x 8): 6 steps, the last of 3 rows split 2 + 1.
    streams = [stream for *_, stream in results]
    assert [len(s.micro_batches) for s in streams] == [6, 6]
    assert [len(p) for p, _ in streams[0].shares] == [8, 8, 8, 8, 8, 2]
    images, labels, batch_keys, stream = results[0]
    assert images.shape == (42, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    assert stream.rows == 42 and stream.skipped == 0
    # Labels travel with their images: class c is grey level ~80 + 60c before the mean.
    brightness = images.mean((1, 2, 3)) + torch.tensor([120.0, 115.0, 100.0]).mean()
    assert (brightness[labels == 0] < 120).all() and (brightness[labels == 2] > 160).all()


def test_a_resume_reads_and_decodes_nothing_before_its_position(shards, ray_cluster, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """From step 3 of 5 on, the stream holds exactly the rows of steps 3 and 4, and its read
    tasks read only the row groups those steps need (counted through the trace hook)."""
    monkeypatch.setenv("VGG_RAY_TRACE", str(tmp_path))
    manifest = load_manifest(str(shards))
    whole = run(manifest, epoch=1, rank=0, world_size=1, batch_size=16)
    for log in tmp_path.glob("read-*.log"):
        log.unlink()
    late = run(manifest, epoch=1, rank=0, world_size=1, batch_size=16, start_step=3)
    order = late[3].order
    assert late[2] == whole[2][48:]  # the same rows, in the same order, as without the resume
    needed = {(order.pieces[p].path, order.pieces[p].row_group)
              for step in (3, 4) for p in order.share(step, rank=0, world_size=1)[0]}  # fmt: skip
    reads = [tuple(line.rsplit(" ", 1)) for log in tmp_path.glob("read-*.log")
             for line in log.read_text().splitlines()]  # fmt: skip
    assert {(path, int(group)) for path, group in reads} == needed  # nothing before step 3
    assert len(needed) < sum(len(s.row_groups) for s in manifest.shards("train"))
    # A row group a window shares with the next task's steps is read by both tasks, no more.
    assert len(reads) <= 2 * len(needed)


def test_the_following_tasks_start_early_and_keep_their_order_and_errors():
    """The tasks after a stream's first are started in a thread before the first step is
    handed over (`data._started`): their items arrive in order, and an error in them (a shard
    found broken late in the epoch) reaches the training loop, not the thread."""
    import threading

    from vgg_ray.data import _started

    asked = threading.Event()

    def later():
        asked.set()
        yield from (1, 2)
        raise OSError("shards/train-00003.parquet: checksum mismatch")

    items = _started(later())
    assert asked.wait(10)  # asked for before the caller asks
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(OSError, match="train-00003"):
        next(items)
    assert list(_started(iter(()))) == []


def test_epoch_is_a_function_of_seed_and_epoch(shards, ray_cluster):
    manifest = load_manifest(str(shards))
    first = run(manifest, epoch=1, rank=1, world_size=2)
    again = run(manifest, epoch=1, rank=1, world_size=2)
    assert first[2] == again[2]
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    assert first[2] != run(manifest, epoch=2, rank=1, world_size=2)[2]
    other_seed = StreamConfig(**{**CONFIG.__dict__, "seed": 5})
    assert first[2] != run(manifest, config=other_seed, epoch=1, rank=1, world_size=2)[2]


def test_evaluation_covers_every_row_once(shards, ray_cluster):
    manifest = load_manifest(str(shards))
    results = [run(manifest, "val", rank=r, world_size=2, training=False) for r in range(2)]
    keys = [k for _, _, k, _ in results]
    assert [len(k) for k in keys] == [11, 10]  # np.array_split sizes: nothing dropped
    assert sorted(keys[0] + keys[1]) == [f"val-{i:04d}" for i in range(21)]
    assert keys[0] == sorted(keys[0])  # evaluation reads in manifest order, unshuffled
    assert results[0][0].shape[1:] == (3, 32, 32)


def test_bad_records_are_skipped_and_counted(shards, ray_cluster):
    manifest = load_manifest(str(shards))
    images, labels, keys, stream = run(manifest, "corrupt", batch_size=4)
    assert stream.skipped == 2 and len(keys) == 10  # training: stand-ins keep batches full
    assert not CORRUPT & set(keys) and torch.isfinite(images).all()
    images, labels, keys, stream = run(manifest, "corrupt", batch_size=4, training=False)
    assert stream.skipped == 2 and sorted(keys) == sorted(
        f"corrupt-{i:04d}" for i in range(10) if f"corrupt-{i:04d}" not in CORRUPT
    )
    assert len(images) == len(labels) == 8


def test_s3_round_trip(shards, ray_cluster, s3):
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.removeprefix("http://"), scheme="http",
                           region="us-east-1")  # fmt: skip
    pafs.copy_files(str(shards.parent), f"{s3.bucket}/shards", destination_filesystem=fs)
    manifest = load_manifest(s3.uri("shards"), s3_endpoint=s3.endpoint)
    local = run(load_manifest(str(shards)), "val", training=False)
    remote = run(manifest, "val", training=False)
    assert remote[2] == local[2]
    torch.testing.assert_close(remote[0], local[0], rtol=0, atol=0)


def test_clear_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match="cannot read manifest"):
        load_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="no manifest given"):
        load_manifest("")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_manifest(str(tmp_path))
    broken = json.loads(shards.read_text())
    del broken["stats"]
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="invalid manifest .* missing 'stats'"):
        load_manifest(str(tmp_path))
    manifest = load_manifest(str(shards))
    with pytest.raises(ConfigError, match="no split 'test'"):
        SplitStream(manifest, "test", CONFIG, epoch=0, batch_size=8)
    with pytest.raises(ConfigError, match="'empty' .* has no rows"):
        SplitStream(manifest, "empty", CONFIG, epoch=0, batch_size=8)
    bad = {
        "Smin <= Smax": {"scale": (48, 32)},
        "larger than the smallest scale": {"crop": 40},
        "larger than the eval scale": {"eval_scale": 24},
        "unknown decode": {"decode": "tpu"},
        "unknown normalize": {"normalize": "imagenet"},
        "shuffle_buffer": {"shuffle_buffer": -1},
    }
    for message, change in bad.items():
        with pytest.raises(ConfigError, match=message):
            StreamConfig(**{**CONFIG.__dict__, **change}).validate()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        SplitStream(manifest, "val", StreamConfig(**{**CONFIG.__dict__, "decode": "gpu"}),
                    epoch=0, batch_size=8, device="cpu")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_path_matches_cpu_path(shards):
    """decode "gpu": the task passes bytes, the worker decodes with nvjpeg and transforms on its
    device; same rows, labels and (up to decoder rounding) pixels as the CPU path."""
    from vgg_ray.data import _ReadSpec, read_pieces

    manifest = load_manifest(str(shards))
    gpu_config = StreamConfig(**{**CONFIG.__dict__, "decode": "gpu"})
    for training in (True, False):
        outputs = []
        for config in (CONFIG, gpu_config):
            stream = SplitStream(manifest, "corrupt", config, epoch=0, batch_size=10,
                                 device="cuda", training=training)  # fmt: skip
            columns = ("path", "row_group", "start", "stop", "first_index")
            batch = {c: np.array([getattr(p, c) for p in stream.pieces]) for c in columns}
            spec = _ReadSpec(manifest.uri, None, manifest.base, config.decode, stream.preset, 0)
            outputs.append((*stream._finish(read_pieces(batch, spec=spec)), stream.skipped))
        (cpu, cpu_labels, cpu_keys, cpu_skipped), (gpu, gpu_labels, gpu_keys, gpu_skipped) = outputs
        assert gpu.is_cuda and gpu_labels.is_cuda and gpu_skipped == cpu_skipped == 2
        assert gpu_keys == cpu_keys and torch.equal(gpu_labels, cpu_labels)
        assert (gpu - cpu).abs().mean() < 1.0  # H200: 0.24 grey levels
