"""Feature extraction throughput (Appendix B): images/s of `vgg-ray features` at the paper's
three scales, Q in {256, 384, 512} stacked, net D (VGG-16).

Two figures from one run, on the same images:
- job: `vgg_ray.features_job.extract` itself (what `vgg-ray features` runs): a folder of JPEGs
  read by Ray Data tasks, converted as `prepare` converts, decoded and described in the
  actors, Parquet written; timed from the job's start to features.json (Ray already up);
- describer: `vgg_ray.features.Describer` alone on the decoded images in this process (the
  net's arithmetic: the ceiling the job approaches).
The net's weights do not change its cost: it is a freshly built D saved as a plain state_dict
(the torchvision path). JPEGs are ImageNet-like 500x375, generated.

    python benchmarks/features_throughput.py                 # GPU if present: 512 images, bf16
    python benchmarks/features_throughput.py --images 6      # CPU: a few images (seconds each)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import generate_jpegs  # noqa: E402

from vgg_ray.evaluate import NetInfo  # noqa: E402
from vgg_ray.features import PAPER_SCALES, Describer  # noqa: E402
from vgg_ray.models import build_vgg  # noqa: E402
from vgg_ray.transforms import decode_cpu  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--arch", default="D", help="net of Table 1 (default D, VGG-16)")
    parser.add_argument("--width", type=float, default=1.0, help="net width (default 1)")
    parser.add_argument("--images", type=int, help="default: 512 on GPU, 6 on CPU")
    parser.add_argument("--scales", type=int, nargs="+", default=list(PAPER_SCALES))
    parser.add_argument("--aggregate", default="stack", choices=["stack", "mean"])
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    from vgg_ray import runtime
    from vgg_ray.features_job import FeaturesConfig, extract

    count = args.images or (512 if on_gpu else 6)
    data = generate_jpegs(min(count, 64))
    data = [data[i % len(data)] for i in range(count)]
    torch.manual_seed(0)
    model = build_vgg(args.arch, 1000, args.width, "glorot").eval()
    scales = tuple(args.scales)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "all").mkdir(parents=True)
        for i, jpeg in enumerate(data):
            (root / "images" / "all" / f"{i:06d}.jpg").write_bytes(jpeg)
        torch.save(model.state_dict(), root / "net.pt")
        # One actor with every core's threads (as the describer below has), the reading tasks
        # on one more logical CPU: on a CPU box the net, not the reading, is the cost.
        cores = os.cpu_count() or 1
        runtime.start_local(num_cpus=cores + 1, dashboard=False)
        started = time.perf_counter()
        result = extract(FeaturesConfig(
            models=(str(root / "net.pt"),), source=str(root / "images"), scales=scales,
            aggregate=args.aggregate, output=str(root / "features"), actors=1,
            cpus_per_actor=1 if on_gpu else cores, progress_every=max(1, count // 4),
        ))  # fmt: skip
        job_rate = result.images / (time.perf_counter() - started)

    device = torch.device("cuda" if on_gpu else "cpu")
    info = NetInfo(name=args.arch, normalize="torchvision")
    describe = Describer([model], [info], scales=scales, aggregate=args.aggregate, device=device,
                         max_crops=16, bf16=on_gpu, channels_last=on_gpu)  # fmt: skip
    images = decode_cpu(data)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    describe(images[:1])  # warm-up: allocator, cuDNN
    sync()
    started = time.perf_counter()
    for start in range(0, count, 16):
        describe(images[start : start + 16])
    sync()
    describer_rate = count / (time.perf_counter() - started)

    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    print(f"net {args.arch} width {args.width:g}, Q {','.join(map(str, scales))} {args.aggregate}"
          f" ({result.dim}-d), {count} images 500x375, {device_name}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'path':<12} {'img/s':>9}  hours per million images")
    for label, rate in (("job", job_rate), ("describer", describer_rate)):
        print(f"{label:<12} {rate:>9.3f}  {1e6 / rate / 3600:,.0f}")
    out = args.out or RESULTS / f"features_throughput{'-cuda' if on_gpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "features_throughput", "date": date.today().isoformat(),
        "device": device_name, "torch": torch.__version__, "arch": args.arch,
        "width": args.width, "scales": list(scales), "aggregate": args.aggregate,
        "dim": result.dim, "images": count, "job_images_per_s": job_rate,
        "describer_images_per_s": describer_rate,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
