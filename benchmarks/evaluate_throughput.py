"""Test-time protocol throughput (issue 5): images/s of each evaluation mode of Sect. 3.2 on the
same net and the same images, side by side in one run.

The paper's argument for dense evaluation: the fully convolutional net on the whole image (x2
flips) costs far less than 150 crops (5x5 grid x 2 flips x 3 scales). Reported: images/s per
mode, inputs pushed through the net per image, and the multicrop / dense time ratio.

Measured from decoded uint8 images (decode costs the same in every mode and is left out):
rescale per scale, crops, normalisation, forward, soft-max averaging, top-5: the code
`vgg-ray evaluate` runs in its actors (`vgg_ray.evaluate.Evaluator`). torch + torchvision only
(no ray, mlflow or pyarrow), JPEGs generated in memory (ImageNet-like 500x375).

    python benchmarks/evaluate_throughput.py                    # GPU if present: VGG-16, bf16
    python benchmarks/evaluate_throughput.py --device cpu       # CPU: VGG-16 at width 1/8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import generate_jpegs  # noqa: E402

from vgg_ray.evaluate import Evaluator, NetInfo, Protocol  # noqa: E402
from vgg_ray.models import build_vgg  # noqa: E402
from vgg_ray.transforms import decode_cpu, decode_gpu  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def measure(evaluator: Evaluator, images: list[torch.Tensor], batch: int, device) -> float:
    """Images/s over all `images`, after one warm-up batch (cuDNN autotuning, allocator)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    evaluator.top_k(images[:batch])
    sync()
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        evaluator.top_k(images[start : start + batch])
    sync()
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="D", help="net of Table 1 (default D, VGG-16)")
    parser.add_argument("--width", type=float, help="default: 1 on GPU, 1/8 on CPU")
    parser.add_argument("--images", type=int, help="default: 256 on GPU, 8 on CPU")
    parser.add_argument("--batch", type=int, default=8, help="images per Evaluator call")
    parser.add_argument("--max-crops", type=int, default=128, help="inputs per forward pass")
    parser.add_argument("--scales", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="default: on GPU")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    width = args.width or (1.0 if on_gpu else 1 / 8)
    count = args.images or (256 if on_gpu else 8)
    bf16 = on_gpu if args.bf16 is None else args.bf16
    data = generate_jpegs(min(count, 64))
    data = [data[i % len(data)] for i in range(count)]
    images = decode_gpu(data, device) if on_gpu else decode_cpu(data)
    torch.manual_seed(0)
    model = build_vgg(args.arch, 1000, width, "glorot").eval()
    info = NetInfo(name=args.arch, crop=224, train_scale=(min(args.scales), max(args.scales)))
    scales = tuple(args.scales)
    middle = scales[len(scales) // 2]
    cases = [
        ("single", (middle,)),
        ("single", scales),
        ("dense", scales),
        ("multicrop", scales),
        ("dense+multicrop", scales),
    ]
    print(f"net {args.arch} width {width:g}, {count} images 500x375/375x500, {args.device}"
          f"{' bf16' if bf16 else ''}, batch {args.batch}")  # fmt: skip
    print(f"{'mode':<16} {'Q':<12} {'img/s':>9} {'net inputs/img':>15}")
    rows = []
    for mode, qs in cases:
        evaluator = Evaluator(
            [model], [info], [Protocol(members=(0,), mode=mode, scales=(qs,))], device=device,
            max_crops=args.max_crops, bf16=bf16, channels_last=on_gpu,
        )  # fmt: skip
        rate = measure(evaluator, images, args.batch, device)
        inputs = evaluator.scorers[0].forwarded / (count + min(args.batch, count))
        label = ",".join(map(str, qs))
        rows.append({"mode": mode, "scales": list(qs), "images_per_s": rate,
                     "net_inputs_per_image": inputs})  # fmt: skip
        print(f"{mode:<16} {label:<12} {rate:>9.2f} {inputs:>15.0f}")
        del evaluator
    rate = {(r["mode"], len(r["scales"])): r["images_per_s"] for r in rows}
    ratio = rate["dense", len(scales)] / rate["multicrop", len(scales)]
    print(f"dense / multicrop throughput over {len(scales)} scales: {ratio:.1f}x "
          f"(dense is {ratio:.1f}x cheaper than {50 * len(scales)} crops)")  # fmt: skip
    result = {
        "benchmark": "evaluate_throughput",
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if on_gpu
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "arch": args.arch,
        "width": width,
        "images": count,
        "batch": args.batch,
        "bf16": bf16,
        "rows": rows,
        "dense_over_multicrop": ratio,
    }
    out = args.out or RESULTS / f"evaluate_throughput{'-cuda' if on_gpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
