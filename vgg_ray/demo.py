"""The embedded default's data set: a small ImageNet-style tree of real JPEG files.

Each class is a distinct pattern (a disc, stripes, a checkerboard, ...) drawn at a random
position and scale, with jittered colours and pixel noise, so a small CNN learns it in minutes
on a CPU but cannot memorise single images. `oddities=True` adds the files real ImageNet holds
that break naive pipelines (CMYK, grayscale, a PNG named .JPEG, truncated and empty files).
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vgg_ray.errors import ConfigError
from vgg_ray.manifest import read_manifest
from vgg_ray.prepare import PrepareConfig, prepare

NAMES_FILE = "LOC_synset_mapping.txt"
DEMO_VERSION = "v2"  # bump when the generator or the demo's prepare settings change


def _disc(draw, box, fg, rng):
    draw.ellipse(box, fill=fg)


def _square(draw, box, fg, rng):
    draw.rectangle(box, fill=fg)


def _triangle(draw, box, fg, rng):
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fg)


def _ring(draw, box, fg, rng):
    width = max(2, int((box[2] - box[0]) / 6))
    draw.ellipse(box, outline=fg, width=width)


def _cross(draw, box, fg, rng):
    x0, y0, x1, y1 = box
    width = max(2, int((x1 - x0) / 5))
    draw.line([(x0, y0), (x1, y1)], fill=fg, width=width)
    draw.line([(x0, y1), (x1, y0)], fill=fg, width=width)


def _stripes(vertical: bool):
    def pattern(draw, box, fg, rng):
        x0, y0, x1, y1 = box
        period = max(4, int(rng.integers(4, 9)))
        for offset in range(0, int(max(x1 - x0, y1 - y0)), period):
            if vertical:
                draw.rectangle([x0 + offset, y0, x0 + offset + period // 2, y1], fill=fg)
            else:
                draw.rectangle([x0, y0 + offset, x1, y0 + offset + period // 2], fill=fg)

    return pattern


def _checker(draw, box, fg, rng):
    x0, y0, x1, y1 = box
    cell = max(3, int(rng.integers(4, 9)))
    for i, x in enumerate(range(int(x0), int(x1), cell)):
        for j, y in enumerate(range(int(y0), int(y1), cell)):
            if (i + j) % 2 == 0:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)


# (name, drawing, base colour): shape and colour both separate the classes.
PATTERNS = [
    ("disc", _disc, (220, 60, 50)),
    ("horizontal stripes", _stripes(vertical=False), (40, 160, 60)),
    ("checkerboard", _checker, (50, 80, 210)),
    ("triangle", _triangle, (230, 200, 40)),
    ("ring", _ring, (200, 60, 200)),
    ("vertical stripes", _stripes(vertical=True), (40, 200, 200)),
    ("cross", _cross, (240, 140, 30)),
    ("square", _square, (140, 90, 40)),
]


def wnid(index: int) -> str:
    return f"n{index:08d}"


def draw_example(
    label: int,
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    extent: tuple[float, float] = (0.4, 0.8),
    photo: Image.Image | None = None,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of class `label` (size is width, height) and the object's box, ILSVRC-style
    (xmin, ymin, xmax, ymax: inclusive pixels). The pattern's side is a random share
    `extent` of the image's smaller side; on a random region of `photo` (dimmed) if given,
    else on a plain dark background."""
    name, pattern, colour = PATTERNS[label % len(PATTERNS)]
    width, height = size
    if photo is None:
        image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 90, 3)))
    else:  # a random region of the photo, at least half its smaller side, resized to fit
        side = rng.uniform(0.5, 1.0) * min(photo.size) / max(width, height)
        region_w, region_h = width * side, height * side
        left = rng.uniform(0, photo.width - region_w)
        top = rng.uniform(0, photo.height - region_h)
        region = photo.resize((width, height), Image.Resampling.BILINEAR,
                              box=(left, top, left + region_w, top + region_h))  # fmt: skip
        # dimmed to the plain background's range (0..90), so the bright pattern stands out
        image = region.point(lambda v: v * 90 // 255)
    side = rng.uniform(*extent) * min(width, height)
    x0 = rng.uniform(0, width - side)
    y0 = rng.uniform(0, height - side)
    fg = tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in colour)
    pattern(ImageDraw.Draw(image), (x0, y0, x0 + side, y0 + side), fg, rng)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
    # The pixels the pattern may touch: columns floor(x0) .. ceil(x0 + side) - 1, inclusive.
    box = (int(x0), int(y0), min(width, math.ceil(x0 + side)) - 1,
           min(height, math.ceil(y0 + side)) - 1)  # fmt: skip
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), box


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


def make_demo_tree(
    root: str | os.PathLike,
    *,
    classes: int = 4,
    train_per_class: int = 100,
    val_per_class: int = 25,
    size: tuple[int, int] = (64, 96),
    seed: int = 0,
    oddities: bool = False,
    extent: tuple[float, float] = (0.4, 0.8),
    photos: list[Image.Image] | None = None,
) -> Path:
    """Write root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG, root/LOC_synset_mapping.txt,
    and each object's box in Kaggle's layout, root/LOC_{train,val}_solution.csv.

    Image sides are drawn uniformly from `size` (min, max) pixels, so aspect ratios vary; the
    pattern's side is a share `extent` of the smaller side, drawn on a region of one of `photos`
    where given, else on a plain background. Returns the root folder.
    """
    if not 1 <= classes <= len(PATTERNS):
        raise ConfigError(f"classes must be 1..{len(PATTERNS)}, got {classes}")
    if train_per_class < 1 or val_per_class < 0:
        raise ConfigError(
            f"need >= 1 training and >= 0 validation images per class, got {train_per_class} "
            f"and {val_per_class}"
        )
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        solution = [("ImageId", "PredictionString")]
        for label in range(classes):
            folder = root / split / wnid(label)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a file in the way, no permission, ...
                raise ConfigError(f"cannot write the demo tree to {root}: {error}") from None
            for i in range(count):
                side = tuple(int(s) for s in rng.integers(size[0], size[1] + 1, 2))
                photo = photos[int(rng.integers(len(photos)))] if photos else None
                image, box = draw_example(label, rng, side, extent=extent, photo=photo)
                stem = f"{wnid(label)}_{split}_{i:05d}"
                (folder / f"{stem}.JPEG").write_bytes(_jpeg(image))
                solution.append((stem, " ".join(map(str, (wnid(label), *box)))))
        with open(root / f"LOC_{split}_solution.csv", "w", newline="") as file:
            csv.writer(file).writerows(solution)
    names = "".join(f"{wnid(i)} {PATTERNS[i][0]}\n" for i in range(classes))
    (root / NAMES_FILE).write_text(names)
    if oddities:
        _add_oddities(root, classes, rng, size)
    return root


def _add_oddities(root: Path, classes: int, rng: np.random.Generator, size) -> None:
    """The kinds of file ILSVRC2012 really holds, spread over the training classes."""
    side = (size[0], size[0])
    folder = lambda label: root / "train" / wnid(label % classes)  # noqa: E731
    sample, _ = draw_example(0, rng, side)
    (folder(0) / "odd_grayscale.JPEG").write_bytes(_jpeg(sample.convert("L")))
    (folder(0) / "odd_cmyk.JPEG").write_bytes(_jpeg(sample.convert("CMYK")))
    png = io.BytesIO()
    draw_example(1, rng, side)[0].save(png, format="PNG")
    (folder(1) / "odd_png_named.JPEG").write_bytes(png.getvalue())
    good = _jpeg(draw_example(2, rng, side)[0])
    (folder(2) / "odd_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder(3) / "odd_empty.JPEG").write_bytes(b"")
    wide, _ = draw_example(3, rng, (size[1] * 2, size[0] // 2))
    (folder(3) / "odd_wide.jpg").write_bytes(_jpeg(wide))
    tall, _ = draw_example(1, rng, (size[0] // 2, size[1] * 2))
    (folder(1) / "odd_tall.jpeg").write_bytes(_jpeg(tall))


def default_cache_dir() -> Path:
    return Path(os.environ.get("VGG_RAY_CACHE") or Path.home() / ".cache" / "vgg-ray") / "demo"


def ensure_demo_shards(cache_dir: str | os.PathLike | None = None) -> str:
    """The demo set's manifest path, generating and preparing it on first use.

    The cache (default ~/.cache/vgg-ray/demo, or $VGG_RAY_CACHE/demo) is filled once under a
    file lock, so two processes that ask at once (two Ray workers, two tests) wait for one build.
    """
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    home = base / DEMO_VERSION
    home.mkdir(parents=True, exist_ok=True)
    manifest = home / "shards" / "manifest.json"
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        if manifest.exists():
            read_manifest(str(manifest))  # a corrupt cache is an error, not a silent rebuild
            return str(manifest)
        tree = make_demo_tree(home / "tree")
        # Small shards and row groups, so even the demo streams from several pieces in parallel.
        config = PrepareConfig(
            src=str(tree),
            dest=str(home / "shards"),
            class_names=str(tree / NAMES_FILE),
            boxes=(str(tree / "LOC_train_solution.csv"), str(tree / "LOC_val_solution.csv")),
            shard_size=256 * 1024,
            row_group_rows=32,
            workers=1,
            progress=False,
        )
        return prepare(config).manifest


def real_photos() -> list[tuple[str, Path]]:
    """Three real photographs that ship with scikit-learn and matplotlib (both installed with
    vgg-ray): (name, path) of JPEGs of 640x427, 640x427 and 512x600, for tests and benchmarks
    that need a camera's images rather than generated ones."""
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    return [("china", sk / "china.jpg"), ("flower", sk / "flower.jpg"),
            ("hopper", mpl / "grace_hopper.jpg")]  # fmt: skip
