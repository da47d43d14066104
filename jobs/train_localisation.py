"""Train a localisation net (Appendix A) on Ray: net D whose last layer regresses boxes, from a
trained classifier of the same net and scale; the options are `vgg-ray train`'s, with the
paper's defaults for this net (per-class regression, all layers, lr 1e-3, fixed S).

    python jobs/train_localisation.py --init <D at S=256 checkpoint>       # demo data
    ray job submit --working-dir . -- python jobs/train_localisation.py \\
        --manifest s3://bucket/imagenet --init models:/vgg-D@champion --scale 384
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    defaults = [] if any(a.startswith("--regression") for a in args) else ["--regression", "pcr"]
    arch = [] if any(a.startswith("--arch") for a in args) else ["--arch", "D"]
    sys.exit(main(["train", *arch, *defaults, *args]))
