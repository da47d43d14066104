"""The paper's experiment plan in one resumable job: A -> B..E at S = 256 -> 384 -> jittered,
Tables 3-6, and the registry (docs/reproduce.md).

    python jobs/reproduce_paper.py               # embedded default: the chain at demo scale
    python jobs/reproduce_paper.py --dry-run     # the plan and its GPU-hours
    ray job submit --working-dir . -- python jobs/reproduce_paper.py \
        --manifest s3://bucket/imagenet/manifest.json --workers 8 --tracking-uri http://mlflow:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import reproduce_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(reproduce_main(sys.argv[1:]))
