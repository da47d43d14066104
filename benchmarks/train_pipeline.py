"""The shipped training path, end to end (issue 16): `vgg_ray.train_job.train` with one Ray Train
worker, Ray Data read + decode tasks on the machine's cores, the object store, SplitStream,
checkpoints and an MLflow run, on JPEG shards of ImageNet's size (500x375, ~100 KB each).

For each decode path (cpu: Ray Data tasks decode and crop; gpu: nvjpeg on the training GPU) it
reports the images/s and the share of step time spent waiting for data that the training worker
itself measured and logged to MLflow (the last epoch: the first one pays cuDNN's autotuning and
Ray Data's start), next to the synthetic rate of the same net, batch and optimizer step in the
same process (no data at all): the ratio is what the pipeline costs training.

    python benchmarks/train_pipeline.py                     # CPU: a narrow net, small crops
    python benchmarks/train_pipeline.py --arch D --images 40000 --batch 256     # on a GPU box

Needs Ray and MLflow (on a bare GPU machine: ../shared/tools/gpu-bundle).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import generate_jpegs, write_shards  # noqa: E402

from vgg_ray.config import paper  # noqa: E402
from vgg_ray.models import build_vgg  # noqa: E402
from vgg_ray.parallel import parallelize  # noqa: E402
from vgg_ray.steps import sgd, train_step  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def synthetic_rate(config, device: torch.device, steps: int) -> float:
    """Images/s of the worker's own step (`parallelize` + `steps.sgd` + `train_step`, as
    `vgg_ray.train` sets them up) on random tensors already on the device."""
    on_gpu = device.type == "cuda"
    model = parallelize(build_vgg(config.arch, 1000, config.width, "glorot"), device,
                        channels_last=on_gpu, compile=config.compile)  # fmt: skip
    optimizer = sgd(model, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    crop, batch = config.data.crop, config.global_batch
    images = torch.randn(batch, 3, crop, crop, device=device)
    if on_gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(3):  # warm-up: cuDNN's autotuner, allocator, compilation
        train_step(model, optimizer, [(images, labels)], bf16=on_gpu)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, [(images, labels)], bf16=on_gpu)
    sync()
    rate = steps * batch / (time.perf_counter() - started)
    del model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()  # the training worker is a separate process that needs it all
    return rate


def last_epoch(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The worker's own figures for the run's last epoch, from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {name: client.get_metric_history(run_id, name)[-1].value
            for name in ("images_per_s", "data_wait_share")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--arch", default="D" if on_gpu else "A")
    parser.add_argument("--width", type=float, default=1.0 if on_gpu else 1 / 16)
    parser.add_argument("--crop", type=int, default=224 if on_gpu else 32)
    parser.add_argument("--batch", type=int, default=128 if on_gpu else 32)
    parser.add_argument("--images", type=int, default=40000 if on_gpu else 1024,
                        help="training images per epoch (512 JPEGs, repeated)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--decode", default="cpu,gpu" if on_gpu else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile, as --compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if on_gpu else "cpu")
    root = Path(tempfile.mkdtemp(prefix="vgg-ray-pipeline-"))
    data = generate_jpegs(512)
    manifest = write_shards(data, root / "shards", repeat=max(1, args.images // len(data)),
                            val=256)  # fmt: skip
    base = paper(args.arch, width=args.width, epochs=args.epochs, global_batch=args.batch,
                 workers=1, lr_decays=0, storage_path=str(root / "runs"),
                 tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="pipeline-bench",
                 checkpoint_every_steps=0, keep_best=1, compile=args.compile)  # fmt: skip
    scale = (args.crop * 8 // 7, args.crop * 16 // 7)  # the paper's 224 in [256, 512], scaled
    base = replace(base, data=replace(base.data, manifest=manifest, crop=args.crop, scale=scale,
                                      eval_scale=scale[0]))  # fmt: skip
    synthetic = synthetic_rate(base, device, steps=20 if on_gpu else 3)
    print(f"synthetic: {synthetic:.0f} img/s ({args.arch}, batch {args.batch}, {args.crop} px)")

    from vgg_ray.train_job import train

    rows = []
    for decode in args.decode.split(","):
        config = replace(base, run_name=f"pipeline-{decode}",
                         data=replace(base.data, decode=decode))  # fmt: skip
        summary = train(config)
        figures = last_epoch(config.tracking_uri, summary.mlflow_run_id)
        rows.append({"decode": decode, **figures,
                     "vs_synthetic": figures["images_per_s"] / synthetic})  # fmt: skip
        print(f"decode {decode}: {figures['images_per_s']:.0f} img/s, "
              f"{100 * figures['data_wait_share']:.1f}% of step time waiting for data, "
              f"{rows[-1]['vs_synthetic']:.2f} of synthetic")  # fmt: skip
    hardware = (torch.cuda.get_device_name(device) if on_gpu
                else f"{platform.processor() or platform.machine()}")  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / f"train_pipeline_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": str(date.today()), "hardware": hardware, "cpus": os.cpu_count(),
        "args": vars(args), "synthetic_img_s": synthetic, "rows": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
