"""Training throughput, side by side in one run (issue 4):

  (a) baseline: the usual plain PyTorch loop on torchvision's VGG, AMP (bf16 on GPU), synthetic
      data;
  (b) ours: `vgg_ray.models` + `vgg_ray.parallel.parallelize` + `vgg_ray.steps.train_step` on the
      same synthetic data;
  (c) ours fed with real JPEG bytes through our decode + the paper's training transform, the
      default path: CPU worker processes decode and crop to uint8 (as the Ray Data tasks do),
      the trainer finishes colour shift + mean on its device; the same code, a DataLoader in
      place of Ray Data (the GPU machine has no Ray);
  (d) on GPU: the `--decode gpu` path, nvjpeg decode + transform on the training GPU, in line.

Reports images/s, (b)/(a), (c)/(b) and, on GPU, model FLOP utilisation against the device's
datasheet bf16 peak (benchmarks/peak.py: SXM and NVL parts told apart; --peak-tflops overrides),
the bf16 matrix-product rate measured in the same run beside it, and (b) with fused SGD.
Needs torch and torchvision only (no ray, no mlflow), so it runs on a bare GPU machine; the real
pipeline (Ray Train worker, Ray Data) is benchmarks/train_pipeline.py.

    python benchmarks/train_throughput.py                              # CPU: small images
    python benchmarks/train_throughput.py --device cuda --archs D --size 224 --batch 128
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgg_ray.models import TORCHVISION_NAMES, build_vgg, forward_macs  # noqa: E402
from vgg_ray.parallel import parallelize  # noqa: E402
from vgg_ray.steps import sgd, train_step  # noqa: E402
from vgg_ray.transforms import decode_cpu, decode_gpu, to_float, training  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _timed(step, steps: int, warmup: int, sync) -> float:
    """Seconds per step, after warm-up steps (compilation, cuDNN autotuning)."""
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - started) / steps


def _jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs (default 500x375, quality 90) of smooth random content."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


class _CropBatches(torch.utils.data.Dataset):
    """Endless batches of the same JPEGs, each epoch's draws new: what a Ray Data read task
    returns (uint8 crops + per-image colour gain/bias), made by DataLoader workers."""

    def __init__(self, jpegs: list[bytes], preset):
        self.jpegs, self.preset = jpegs, preset

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, epoch: int):
        torch.set_num_threads(1)  # one core per worker, as a Ray task
        images = decode_cpu(self.jpegs)
        return self.preset.prepare(images, epoch=epoch, indices=range(len(images)))


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    classes = 1000
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, classes, (args.batch,), device=device)

    # (a) the usual loop: torchvision's VGG, AMP, nothing else.
    if arch in TORCHVISION_NAMES:
        base = getattr(torchvision.models, TORCHVISION_NAMES[arch])(num_classes=classes)
    else:  # A-LRN and C have no torchvision twin: the same table-built net, unwrapped
        base = build_vgg(arch, classes)
    base = base.to(device)
    base_opt = torch.optim.SGD(base.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def baseline_step():
        base_opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = F.cross_entropy(base(images), labels)
        loss.backward()
        base_opt.step()

    seconds_a = _timed(baseline_step, args.steps, args.warmup, sync)
    base.to("meta")  # free the baseline's memory before ours is built
    if on_gpu:
        torch.cuda.empty_cache()

    # (b) ours, the code the training loop runs.
    model = parallelize(
        build_vgg(arch, classes), device, channels_last=on_gpu, compile=args.compile
    )
    opt = sgd(model, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    nhwc = images.contiguous(memory_format=torch.channels_last) if on_gpu else images
    seconds_b = _timed(
        lambda: train_step(model, opt, [(nhwc, labels)], bf16=on_gpu), args.steps, args.warmup, sync
    )
    if on_gpu:  # the same step with one fused kernel for the update
        fused = sgd(model, lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
        step = lambda: train_step(model, fused, [(nhwc, labels)], bf16=True)  # noqa: E731
        seconds_fused = _timed(step, args.steps, args.warmup, sync)

    # (c) ours from JPEG bytes, decoded and cropped by CPU workers, finished on the device.
    jpegs = _jpegs(args.batch, (500, 375))
    preset = training(scale=(args.size * 8 // 7, args.size * 16 // 7), crop=args.size)
    loader = torch.utils.data.DataLoader(
        _CropBatches(jpegs, preset),
        batch_size=None,
        num_workers=args.decode_workers,
        pin_memory=on_gpu,
        persistent_workers=True,
        prefetch_factor=4,
    )
    batches = iter(loader)

    def streamed_step():
        prepared = next(batches)
        batch = to_float(type(prepared)(*(t.to(device, non_blocking=True) for t in prepared)))
        if on_gpu:
            batch = batch.contiguous(memory_format=torch.channels_last)
        train_step(model, opt, [(batch, labels)], bf16=on_gpu)

    seconds_c = _timed(streamed_step, args.steps, args.warmup, sync)

    # (d) ours from JPEG bytes decoded by nvjpeg on the training GPU, in line with the step.
    counter = iter(range(10**9))

    def gpu_decoded_step():
        batch = preset(decode_gpu(jpegs, device), epoch=next(counter), indices=range(len(jpegs)))
        train_step(
            model, opt, [(batch.contiguous(memory_format=torch.channels_last), labels)], bf16=True
        )

    seconds_d = _timed(gpu_decoded_step, args.steps, args.warmup, sync) if on_gpu else None

    flop_per_image = 3 * 2 * forward_macs(build_vgg(arch, classes).to("meta"), args.size)
    row = {
        "arch": arch,
        "size": args.size,
        "batch": args.batch,
        "baseline_img_s": args.batch / seconds_a,
        "ours_synthetic_img_s": args.batch / seconds_b,
        "ours_jpeg_img_s": args.batch / seconds_c,
        "decode_workers": args.decode_workers,
    }
    row["ours_vs_baseline"] = row["ours_synthetic_img_s"] / row["baseline_img_s"]
    row["jpeg_vs_synthetic"] = row["ours_jpeg_img_s"] / row["ours_synthetic_img_s"]
    if on_gpu:
        row["ours_gpu_decode_img_s"] = args.batch / seconds_d
        row["gpu_decode_vs_synthetic"] = row["ours_gpu_decode_img_s"] / row["ours_synthetic_img_s"]
        row["ours_fused_sgd_img_s"] = args.batch / seconds_fused
        peak, ceiling = args.peak["spec_peak_tflops"] * 1e12, args.peak["matmul_tflops"] * 1e12
        for name in ("ours_synthetic", "ours_fused_sgd", "baseline"):
            rate = row[f"{name}_img_s"]
            row[f"mfu_{name}"] = rate * flop_per_image / peak
            row[f"of_matmul_{name}"] = rate * flop_per_image / ceiling
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="A,B,C,D,E")
    parser.add_argument("--size", type=int, default=None, help="default: 224 on GPU, 64 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 16 on CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 2),
        help="CPU decode processes for (c)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak; default: the device's datasheet figure")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.size = args.size or (224 if on_gpu else 64)
    args.batch = args.batch or (128 if on_gpu else 16)
    args.steps = args.steps or (20 if on_gpu else 5)
    if on_gpu:
        from peak import device_peak

        args.peak = device_peak(device, args.peak_tflops)
        peak = args.peak
        print(f"{peak['name']}: datasheet bf16 peak {peak['spec_peak_tflops']:.0f} TFLOP/s, "
              f"measured bf16 matmul {peak['matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    # cuDNN's autotuner: `parallelize` turns it on for (b)-(d) as it does in training; it is a
    # process-wide switch, so the baseline (a) has it too, as torchvision's reference recipe does.
    rows = [bench_arch(arch, args, device) for arch in args.archs.split(",")]
    hardware = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    )
    print(
        f"train throughput on {hardware}, {args.size}px, batch {args.batch}, torch "
        f"{torch.__version__}, compile={args.compile}"
    )
    header = f"{'arch':<6}{'(a) base':>10}{'(b) ours':>10}{'(c) jpeg':>10}{'b/a':>7}{'c/b':>7}"
    print(header + (f"{'(d) nvjpeg':>11}{'d/b':>6}{'MFU b':>8}{'fused':>8}" if on_gpu else ""))
    for r in rows:
        line = (
            f"{r['arch']:<6}{r['baseline_img_s']:>10.1f}{r['ours_synthetic_img_s']:>10.1f}"
            f"{r['ours_jpeg_img_s']:>10.1f}{r['ours_vs_baseline']:>7.2f}"
            f"{r['jpeg_vs_synthetic']:>7.2f}"
        )
        if on_gpu:
            line += (
                f"{r['ours_gpu_decode_img_s']:>11.1f}{r['gpu_decode_vs_synthetic']:>6.2f}"
                f"{100 * r['mfu_ours_synthetic']:>7.1f}%{100 * r['mfu_ours_fused_sgd']:>7.1f}%"
            )
        print(line)
    out = Path(args.out) if args.out else RESULTS / f"train_throughput_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"date": str(date.today()), "hardware": hardware, "args": vars(args), "rows": rows},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
