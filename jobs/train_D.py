"""Train VGG net D (Table 1) on Ray with the paper's recipe.

    python jobs/train_D.py                       # embedded default: local Ray, demo data
    ray job submit --working-dir . -- python jobs/train_D.py --manifest s3://bucket/imagenet/manifest.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:], arch="D"))
