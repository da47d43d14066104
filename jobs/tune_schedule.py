"""Search learning-rate schedules for a VGG net with Ray Tune (docs/tune.md).

    python jobs/tune_schedule.py                 # embedded default: 4 small trials, demo data
    ray job submit --working-dir . -- python jobs/tune_schedule.py --arch E --scheduler pbt \
        --manifest s3://bucket/imagenet/manifest.json --tracking-uri http://mlflow:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import tune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune_main(sys.argv[1:]))
