"""Decode + the paper's training transform, images/s, side by side in one run (issues 3, 16):

  ours/per-image      `vgg_ray.transforms` as a Ray Data decode task runs it, one thread:
                      `prepare_jpegs` (each record decodes only its crop window, crop-window
                      resize, flip) then `to_float` (colour shift + mean, fused);
  ours/whole-decode   the same with whole-image decodes (torchvision.io) then `prepare`: the
                      path before the window decoder, and where `_vgg_ray_jpeg` is not built;
  baseline/per-image  the usual PIL pipeline with the paper's ops: PIL decode, RandomResize(S in
                      [Smin, Smax]) of the whole image, RandomCrop, flip, to tensor, PCA shift,
                      mean; one thread;
  ours/stream         `vgg_ray.data.SplitStream` end to end over Parquet shards on all cores
                      (Ray Data read + decode tasks, shuffle buffer, float batches);
  baseline/loader     torch DataLoader (one worker process per core) over the same shards,
                      with the PIL pipeline above.

`benchmarks/decode_per_core.py` compares the two `ours` decodes alone, paired pass by pass.

`--device cuda` measures the nvjpeg path instead (decode on the GPU + the same transform there,
batched): torch and torchvision only, JPEGs generated in memory, no ray or pyarrow needed.

    python benchmarks/data_pipeline.py                        # CPU, generated ~500x375 JPEGs
    python benchmarks/data_pipeline.py --size 2000 1500 --no-stream   # large photos, per image
    python benchmarks/data_pipeline.py --manifest /data/shards   # CPU, real shards (train split)
    python benchmarks/data_pipeline.py --device cuda          # GPU nvjpeg path
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from torchvision.io import encode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgg_ray import transforms  # noqa: E402
from vgg_ray.transforms import ColorStats, decode_cpu, decode_gpu, to_float, training  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STATS = ColorStats()  # ImageNet's mean and PCA (fb.resnet.torch), as prepare would compute


def generate_jpegs(count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """ImageNet-like JPEGs: 500x375 by default (`size`, width x height; a quarter portrait),
    quality 90, smooth random content plus grain, so they cost a real photo's decode (~100 KB
    each at 500x375)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        height, width = size[::-1] if i % 4 != 3 else size
        low = torch.from_numpy(rng.integers(0, 256, (3, height // 25, width // 25), np.uint8))
        image = v2.functional.resize(low, [height, width], antialias=True).to(torch.int16)
        image += torch.from_numpy(rng.integers(-32, 33, (3, height, width), np.int16))
        images.append(encode_jpeg(image.clamp(0, 255).to(torch.uint8), quality=90).numpy())
    return [bytes(image) for image in images]


def write_shards(data: list[bytes], root: Path, *, repeat: int, val: int = 0) -> str:
    """`data` x `repeat` as a train split in vgg_ray.prepare's shard format (and the first `val`
    images as a val split, for a training run's validation); the manifest URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits = {}
    heights = [375 if i % 4 != 3 else 500 for i in range(len(data))] * repeat
    for split, rows in (("train", data * repeat), ("val", data[:val])):
        if not rows:
            continue
        table = pa.table({
            "image": pa.array(rows, pa.binary()),
            "label": pa.array([i % 1000 for i in range(len(rows))], pa.int32()),
            "key": pa.array([f"{split}-{i:06d}" for i in range(len(rows))], pa.string()),
            "height": pa.array(heights[: len(rows)], pa.int32()),
            "width": pa.array([875 - h for h in heights[: len(rows)]], pa.int32()),
        })  # fmt: skip
        (root / split).mkdir(parents=True)
        path = f"{split}/{split}-00000.parquet"
        pq.write_table(table, root / path, row_group_size=256)
        groups = [min(256, len(rows) - s) for s in range(0, len(rows), 256)]
        shard = {"path": path, "rows": len(rows), "row_groups": groups,
                 "bytes": (root / path).stat().st_size}  # fmt: skip
        splits[split] = {"rows": len(rows), "shards": [shard]}
    manifest = {
        "format": "vgg-ray-shards/1",
        "classes": [{"index": i, "wnid": f"n{i:08d}", "name": str(i)} for i in range(1000)],
        "splits": splits,
        "stats": {"mean_rgb": list(STATS.mean_rgb), "eigval": list(STATS.eigval),
                  "eigvec": [list(r) for r in STATS.eigvec]},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / "manifest.json")


class PilPaperTransform:
    """The plain baseline: torchvision's PIL-based recipe with the paper's ops."""

    def __init__(self, scale: tuple[int, int], crop: int):
        self.geometry = v2.Compose([
            v2.RandomResize(scale[0], scale[1] + 1),  # smaller side S, uniform in [Smin, Smax]
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32),
        ])  # fmt: skip
        eigvec = torch.tensor(STATS.eigvec)
        self.basis = eigvec * (torch.tensor(STATS.eigval) / 255)  # column i: lambda_i p_i
        self.mean = torch.tensor(STATS.mean_rgb)[:, None, None]

    def __call__(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        image = self.geometry(Image.open(io.BytesIO(data)).convert("RGB"))
        shift = self.basis @ (torch.randn(3) * 0.1)  # AlexNet's PCA colour shift
        return image + (shift[:, None, None] - self.mean)


def per_image_ours(data: list[bytes], args, device: torch.device, *, window: bool = True) -> float:
    """Images/s of one thread: the decode task's work (`window`: the shipped `prepare_jpegs`;
    else whole decodes + `prepare`), then `to_float`."""
    preset = training(scale=args.scale, crop=args.crop, stats=STATS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    done, index = 0, 0

    def batch() -> None:
        nonlocal index
        chunk = [data[(index + i) % len(data)] for i in range(args.batch)]
        indices = range(index, index + len(chunk))
        if device.type == "cuda":
            prepared = preset.prepare(decode_gpu(chunk, device), epoch=0, indices=indices)
        elif window:
            prepared, _decoded = preset.prepare_jpegs(chunk, epoch=0, indices=indices)
        else:
            prepared = preset.prepare(decode_cpu(chunk), epoch=0, indices=indices)
        to_float(prepared, dtype)
        index += len(chunk)

    batch()  # warm-up: nvjpeg handles, allocator, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        batch()
        done += args.batch
    sync()
    return done / (time.perf_counter() - started)


def per_image_baseline(data: list[bytes], args) -> float:
    transform = PilPaperTransform(tuple(args.scale), args.crop)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        torch.stack([transform(data[(done + i) % len(data)]) for i in range(args.batch)])
        done += args.batch
    return done / (time.perf_counter() - started)


class ShardRows(torch.utils.data.IterableDataset):
    """The baseline's reader: a worker process per core, row groups dealt out round robin."""

    def __init__(self, manifest: str, transform: PilPaperTransform):
        self.root = Path(manifest).parent
        shards = json.loads(Path(manifest).read_text())["splits"]["train"]["shards"]
        self.pieces = [(s["path"], g) for s in shards for g in range(len(s["row_groups"]))]
        self.transform = transform

    def __iter__(self):
        import pyarrow.parquet as pq

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for path, group in self.pieces[worker::workers]:
            table = pq.ParquetFile(self.root / path).read_row_group(group, ["image", "label"])
            for data, label in zip(*(c.to_pylist() for c in table.columns), strict=True):
                yield self.transform(data), label


def stream_baseline(manifest: str, args) -> float:
    dataset = ShardRows(manifest, PilPaperTransform(tuple(args.scale), args.crop))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, num_workers=args.cores, persistent_workers=True
    )
    return _epochs(lambda: loader, args)


def stream_ours(manifest: str, args) -> float:
    import ray

    from vgg_ray.data import SplitStream, StreamConfig
    from vgg_ray.manifest import load_manifest

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=args.cores, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)  # fmt: skip
    config = StreamConfig(manifest=manifest, scale=tuple(args.scale), crop=args.crop,
                          shuffle_buffer=args.batch * 4)  # fmt: skip
    loaded = load_manifest(manifest)
    epoch = iter(range(100))
    try:
        return _epochs(
            lambda: SplitStream(loaded, "train", config, epoch=next(epoch), batch_size=args.batch),
            args,
        )
    finally:
        ray.shutdown()


def _epochs(make, args) -> float:
    """Images/s over the second pass (the first warms up workers, caches and pools)."""
    rate = 0.0
    for _ in range(2):
        done, started = 0, time.perf_counter()
        for images, _labels in make():
            done += len(images)
        rate = done / (time.perf_counter() - started)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--manifest", help="prepared shards (train split); default: generated")
    parser.add_argument("--images", type=int, default=256, help="distinct generated JPEGs")
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                        help="generated JPEGs' size")  # fmt: skip
    parser.add_argument("--no-stream", action="store_true", help="per-image rows only")
    parser.add_argument("--repeat", type=int, default=6, help="times the shards hold each one")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scale", type=int, nargs=2, default=[256, 512], metavar=("SMIN", "SMAX"))
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0, help="per per-image measurement")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.manifest:
        import pyarrow.parquet as pq

        from vgg_ray.manifest import load_manifest

        loaded = load_manifest(args.manifest)
        shard = loaded.shards("train")[0]
        data = pq.read_table(f"{loaded.base}/{shard.path}", columns=["image"])["image"]
        data = data.to_pylist()[: args.images]
    else:
        data = generate_jpegs(args.images, size=tuple(args.size))
    size_kb = sum(map(len, data)) / len(data) / 1e3
    rows: list[dict] = []

    def record(name: str, rate: float, cores: float) -> None:
        rows.append({"pipeline": name, "images_per_s": rate, "cores": cores,
                     "images_per_s_per_core": rate / cores})  # fmt: skip
        print(f"{name:<22} {rate:>10.0f} img/s {rate / cores:>10.0f} img/s/core ({cores:g} cores)")

    print(f"{len(data)} JPEGs, {size_kb:.0f} KB on average; S in {args.scale}, crop {args.crop}")
    if device.type == "cuda":
        for batch in (args.batch, 256):
            args.batch = batch
            record(f"ours/nvjpeg batch {batch}", per_image_ours(data, args, device), 1)
    else:
        torch.set_num_threads(1)
        if transforms._jpeg is None:
            print("_vgg_ray_jpeg is not built: ours/per-image decodes whole images")
        record("ours/per-image", per_image_ours(data, args, device), 1)
        record("ours/whole-decode", per_image_ours(data, args, device, window=False), 1)
        record("baseline/per-image", per_image_baseline(data, args), 1)
        rate = {row["pipeline"]: row["images_per_s"] for row in rows}
        print(
            f"per image: ours / baseline {rate['ours/per-image'] / rate['baseline/per-image']:.2f}x"
            f", window / whole decode {rate['ours/per-image'] / rate['ours/whole-decode']:.2f}x"
        )
        if not args.no_stream:
            with tempfile.TemporaryDirectory() as folder:
                manifest = args.manifest or write_shards(data, Path(folder), repeat=args.repeat)
                record("ours/stream", stream_ours(manifest, args), args.cores)
                record("baseline/loader", stream_baseline(manifest, args), args.cores)
            end_to_end = rows[-2]["images_per_s"] / rows[-1]["images_per_s"]
            print(f"ours / baseline end to end: {end_to_end:.2f}x")

    result = {
        "benchmark": "data_pipeline",
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "jpeg_kb": size_kb,
        "results": rows,
    }
    out = args.out or RESULTS / f"data_pipeline{'-cuda' if device.type == 'cuda' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
