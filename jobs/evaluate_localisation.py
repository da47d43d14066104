"""Localisation (Appendix A) on Ray: Tables 8 and 9 of trained localisation nets over the val
split's boxes; the options are `vgg-ray localise`'s (docs/localisation.md).

    python jobs/evaluate_localisation.py --model <loc-D-384 checkpoint> --classifier <D-384>
    ray job submit --working-dir . -- python jobs/evaluate_localisation.py \\
        --model models:/vgg-loc-D@champion --classifier models:/vgg-D@champion --scales 352,384
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under ray job submit

from vgg_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["localise", *sys.argv[1:]]))
