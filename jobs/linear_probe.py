"""The linear probe of Appendix B: a linear SVM on features written by jobs/extract_features.py,
C chosen on 20% of the training set; accuracy, mean class recall and mAP to MLflow. The options
are `vgg-ray probe`'s (docs/features.md).

    python jobs/linear_probe.py --features vgg-ray-runs/features/caltech101-<id> \\
        --train-per-class 30 --splits 3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
