"""Gated promotion: evaluate @challenger and @champion of a registered model with the same
protocol on the same held-out split (Ray Data, as jobs/evaluate.py) and move @champion only if
the challenger's top-5 error is lower by more than --margin. Exit status 0: promoted, 1: refused,
2: an error. The options are `vgg-ray promote`'s (docs/registry.md).

    python jobs/promote.py vgg-DE --mode dense --margin 0.001
    ray job submit --working-dir . -- python jobs/promote.py vgg-DE \\
        --manifest s3://bucket/imagenet/manifest.json --tracking-uri http://mlflow:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
