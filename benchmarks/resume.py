"""Time from a mid-epoch restart to the first training batch (issue 17): ours vs replay.

  ours    `vgg_ray.data.SplitStream(start_step=k)`: the epoch's global order is known, so the
          stream starts at step k: nothing before it is read or decoded;
  replay  what Ray's own image benchmark and most loaders do: a fresh iterator from the epoch's
          start, the first k batches read, decoded and thrown away.

Both on the same JPEG shards (generated, ImageNet-like 500x375 at quality 90), on a local Ray,
at 10%, 50% and 90% of the epoch; the paper's training transform at --crop.

    .venv/bin/python benchmarks/resume.py                  # 4096 images, batch 64, 224 px
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import generate_jpegs, write_shards  # noqa: E402

from vgg_ray.data import SplitStream, StreamConfig  # noqa: E402
from vgg_ray.manifest import load_manifest  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def first_step_seconds(manifest, config: StreamConfig, *, batch: int, step: int,
                       replay: bool) -> float:  # fmt: skip
    """Seconds from building the stream to holding step `step`'s batch."""
    started = time.perf_counter()
    stream = SplitStream(manifest, "train", config, epoch=0, batch_size=batch,
                         global_batch=batch, start_step=0 if replay else step)  # fmt: skip
    steps = stream.steps()
    for _ in range(step if replay else 0):
        next(steps)  # replay: read, decode and drop what lies before the position
    next(steps)
    seconds = time.perf_counter() - started
    steps.close()  # a restart's old stream is gone with its worker: none left to share the cores
    _wait_idle()
    return seconds


def _wait_idle(timeout_s: float = 120) -> None:
    """Until the stream's read tasks have all stopped (every CPU free again)."""
    import ray

    total, deadline = ray.cluster_resources()["CPU"], time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from vgg_ray import runtime

    runtime.start_local(num_cpus=max(4, os.cpu_count() or 1), dashboard=False)
    root = Path(tempfile.mkdtemp(prefix="vgg-ray-resume-"))
    data = generate_jpegs(256)
    manifest = load_manifest(write_shards(data, root, repeat=max(1, args.images // len(data))))
    config = StreamConfig(scale=(args.crop * 8 // 7, args.crop * 16 // 7), crop=args.crop)
    steps = manifest.rows("train") // args.batch
    first_step_seconds(manifest, config, batch=args.batch, step=0, replay=False)  # warm-up
    rows = []
    for share in (0.1, 0.5, 0.9):
        step = int(share * steps)
        # The median of 3 of each: one shared VM's noise is larger than the effect at 10%.
        ours, replay = (
            statistics.median(first_step_seconds(manifest, config, batch=args.batch, step=step,
                                                 replay=again) for _ in range(3))
            for again in (False, True)
        )  # fmt: skip
        rows.append({"position": share, "step": step, "ours_s": ours, "replay_s": replay})
        print(f"restart at {share:.0%} of the epoch (step {step} of {steps}): ours {ours:.2f} s, "
              f"replay {replay:.2f} s ({replay / ours:.1f}x)")  # fmt: skip
    ray.shutdown()
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out = args.out or RESULTS / "resume.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "hardware": hardware,
                               "args": {k: str(v) for k, v in vars(args).items()},
                               "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
