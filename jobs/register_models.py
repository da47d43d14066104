"""Register trained nets from their MLflow runs as `vgg-<arch>` versions with @challenger, tagged
with the run, data manifest (and its sha256), training scale and evaluation metrics; the options
are `vgg-ray register`'s (docs/registry.md).

    python jobs/register_models.py --run <D run id> --run <E run id>     # -> vgg-D, vgg-E
    ray job submit --working-dir . -- python jobs/register_models.py \\
        --run <run id> --tracking-uri http://mlflow:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
