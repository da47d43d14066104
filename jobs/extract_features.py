"""VGG as a feature extractor (Appendix B) on Ray: the paper's descriptors of an image set
(prepared shards, or a folder / S3 prefix of images) as Parquet; the options are `vgg-ray
features`'s (docs/features.md).

    python jobs/extract_features.py --model models:/vgg-D@champion --source ./caltech101
    ray job submit --working-dir . -- python jobs/extract_features.py \\
        --model models:/vgg-DE@champion --source s3://bucket/voc2007/train \\
        --aggregate mean --scales 256,384,512,640,768 --output s3://bucket/features/voc07-train
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
