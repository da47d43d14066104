"""Build the D+E fusion ensemble (Table 6) as one MLflow pyfunc model and register it (vgg-DE,
@challenger); any list of members works. The options are `vgg-ray register-ensemble`'s
(docs/registry.md).

    python jobs/register_ensemble.py --member models:/vgg-D@champion --member models:/vgg-E@champion
    ray job submit --working-dir . -- python jobs/register_ensemble.py \\
        --member models:/vgg-D@champion --member models:/vgg-E@champion \\
        --mode dense --tracking-uri http://mlflow:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["register-ensemble", *sys.argv[1:]]))
