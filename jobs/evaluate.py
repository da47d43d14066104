"""The paper's test protocol (Sect. 3.2) on Ray: dense, multi-crop and multi-scale evaluation
of one net or an ensemble over the val shards; the options are `vgg-ray evaluate`'s
(docs/evaluation.md).

    python jobs/evaluate.py --model runs:/<run id>                 # embedded default: local Ray
    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --model models:/vgg-D@champion --model models:/vgg-E@champion \\
        --manifest s3://bucket/imagenet/manifest.json --tracking-uri http://mlflow:5000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
