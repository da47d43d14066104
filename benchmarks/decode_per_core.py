"""A decode core's work per training image, window decoder vs whole-image decodes (issue 16):

  window  `TrainingPreset.prepare_jpegs`, what a Ray Data decode task runs: each record decodes
          only its crop window (`_vgg_ray_jpeg`), large windows shrunk inside the IDCT;
  whole   torchvision.io whole-image decodes, then `TrainingPreset.prepare`: the path before
          the window decoder, and the one where it is not built.

Both then resize the crop window to crop x crop, flip and stack (`to_float` runs on the
trainer's device in a run, so it is not a decode core's work). One thread; each pass runs the
same images (same draws) both ways in turn, and the ratio is taken pass by pass (the median of
`--passes`), which holds on a noisy machine.

    python benchmarks/decode_per_core.py                      # generated 500x375 JPEGs
    python benchmarks/decode_per_core.py --size 2000 1500     # generated 3 MP JPEGs
    python benchmarks/decode_per_core.py --photos             # real photos (sklearn, matplotlib)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import RESULTS, STATS, generate_jpegs  # noqa: E402

from vgg_ray import transforms  # noqa: E402
from vgg_ray.demo import real_photos  # noqa: E402
from vgg_ray.transforms import decode_cpu, training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--images", type=int, default=64, help="distinct generated JPEGs")
    parser.add_argument("--photos", action="store_true", help="real photos instead")
    parser.add_argument("--scale", type=int, nargs=2, default=[256, 512], metavar=("SMIN", "SMAX"))
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--passes", type=int, default=25)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    if transforms._jpeg is None:
        sys.exit("_vgg_ray_jpeg is not built (libjpeg-dev missing at install): nothing to compare")

    torch.set_num_threads(1)
    if args.photos:
        data = [path.read_bytes() for _, path in real_photos()] * 8
    else:
        data = generate_jpegs(args.images, size=tuple(args.size))
    preset = training(scale=tuple(args.scale), crop=args.crop, stats=STATS)
    indices = range(len(data))
    window_s, whole_s, ratios = [], [], []
    for epoch in range(args.passes + 1):  # the first pass warms up
        started = time.perf_counter()
        preset.prepare_jpegs(data, epoch=epoch, indices=indices)
        middle = time.perf_counter()
        preset.prepare(decode_cpu(data), epoch=epoch, indices=indices)
        ended = time.perf_counter()
        if epoch:
            window_s.append((middle - started) / len(data))
            whole_s.append((ended - middle) / len(data))
            ratios.append((ended - middle) / (middle - started))
    window, whole, ratio = (statistics.median(v) for v in (window_s, whole_s, ratios))
    source = "real photos" if args.photos else f"generated {args.size[0]}x{args.size[1]}"
    kb = sum(map(len, data)) / len(data) / 1e3
    print(f"{source}, {kb:.0f} KB on average, S in {args.scale}, crop {args.crop}, one thread")
    print(f"window decoder {window * 1e3:.2f} ms/img ({1 / window:.0f} img/s), whole decode "
          f"{whole * 1e3:.2f} ms/img ({1 / whole:.0f} img/s): {ratio:.2f}x per core "
          f"(pass by pass {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    result = {
        "benchmark": "decode_per_core",
        "date": date.today().isoformat(),
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "jpeg_kb": kb,
        "window_ms": window * 1e3,
        "whole_ms": whole * 1e3,
        "ratio": ratio,
    }
    name = "photos" if args.photos else f"{args.size[0]}x{args.size[1]}"
    out = args.out or RESULTS / f"decode_per_core-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
