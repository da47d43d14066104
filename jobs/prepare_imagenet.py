"""Prepare ILSVRC2012 into Parquet shards (docs/data.md); the options are `vgg-ray prepare`'s.

    python jobs/prepare_imagenet.py /data/imagenet s3://bucket/imagenet \
        --val-labels /data/imagenet/LOC_val_solution.csv \
        --class-names /data/imagenet/LOC_synset_mapping.txt
    ray job submit --working-dir . -- python jobs/prepare_imagenet.py /data/imagenet s3://...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
