"""ILSVRC's bounding boxes (Appendix A), as the two published layouts hold them.

- Kaggle's `LOC_train_solution.csv` / `LOC_val_solution.csv`: `ImageId,PredictionString`, the
  string being `wnid xmin ymin xmax ymax` once per object (several objects per image).
- The original layout's PASCAL-VOC XML files (`Annotations/CLS-LOC/train/<wnid>/*.xml`,
  `.../val/*.xml`): one `<object>` with `<name>` (the wnid) and `<bndbox>` per object.

Both give pixel coordinates of the original image, inclusive and 0-based as in ILSVRC's devkit
(its IoU counts `xmax - xmin + 1` pixels): a box over pixels xmin..xmax becomes the continuous
box [xmin, xmax + 1) of `vgg_ray.boxes`. `vgg-ray prepare` clips boxes to the stored image and
counts what it clips or skips. A file that does not parse at all is a ConfigError naming it; a
box inside one that is malformed (not numbers, no area) is skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from vgg_ray.errors import ConfigError

RawBox = tuple[str, float, float, float, float]  # (wnid, xmin, ymin, xmax, ymax), continuous


@dataclass
class Annotations:
    """Boxes by image: the file stem (`n01440764_10026`, `ILSVRC2012_val_00000001`) -> boxes."""

    boxes: dict[str, list[RawBox]] = field(default_factory=dict)
    malformed: int = 0  # boxes skipped while reading: not numbers, wrong token count, no area

    def add(self, stem: str, wnid: str, coordinates: list[str]) -> None:
        try:
            xmin, ymin, xmax, ymax = (float(c) for c in coordinates)
        except ValueError:  # not 4 values, or not numbers
            self.malformed += 1
            return
        if not (xmax >= xmin and ymax >= ymin):  # NaN fails too
            self.malformed += 1
            return
        self.boxes.setdefault(stem, []).append((wnid, xmin, ymin, xmax + 1, ymax + 1))

    def update(self, other: Annotations) -> None:
        for stem, boxes in other.boxes.items():
            self.boxes.setdefault(stem, []).extend(boxes)
        self.malformed += other.malformed

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.boxes.values())


def read_kaggle_csv(path: str | Path) -> Annotations:
    """Boxes from a Kaggle LOC_*_solution.csv (ImageId,PredictionString)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.reader(file))
    except FileNotFoundError:
        raise ConfigError(f"box file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"box file {path} does not parse: {error}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise ConfigError(f"box file {path} does not parse: expected Kaggle's header "
                          "'ImageId,PredictionString' (LOC_train_solution.csv)")  # fmt: skip
    found = Annotations()
    for row in rows[1:]:
        if len(row) < 2 or not row[0].strip():
            found.malformed += 1
            continue
        tokens = row[1].split()
        for start in range(0, len(tokens), 5):
            wnid, *coordinates = tokens[start : start + 5]
            found.add(row[0].strip(), wnid, coordinates)
    return found


def read_voc_xml(path: str | Path) -> Annotations:
    """Boxes from one PASCAL-VOC XML file (ILSVRC's Annotations/CLS-LOC/...)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ConfigError(f"box file {path} does not parse: {error}") from None
    if root.tag != "annotation":
        raise ConfigError(f"box file {path} does not parse: its root is <{root.tag}>, "
                          "expected PASCAL-VOC's <annotation>")  # fmt: skip
    found = Annotations()
    stem = Path(path).stem
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        wnid = (obj.findtext("name") or "").strip()
        coordinates = [box.findtext(k) or "" for k in ("xmin", "ymin", "xmax", "ymax")] if (
            box is not None) else []  # fmt: skip
        found.add(stem, wnid, coordinates)
    return found


def read_annotations(paths: list[str] | tuple[str, ...]) -> Annotations:
    """Boxes from each path: a Kaggle CSV, one XML file, or a folder searched for XML files."""
    found = Annotations()
    for path in paths:
        source = Path(path).expanduser()
        if source.is_dir():
            files = sorted(
                Path(folder, name)
                for folder, _, names in os.walk(source)
                for name in names
                if name.lower().endswith(".xml") and not name.startswith(".")
            )
            if not files:
                raise ConfigError(f"box folder {path} holds no .xml files (PASCAL-VOC layout, "
                                  "e.g. Annotations/CLS-LOC)")  # fmt: skip
            for file in files:
                found.update(read_voc_xml(file))
        elif source.suffix.lower() == ".xml":
            found.update(read_voc_xml(source))
        else:
            found.update(read_kaggle_csv(source))
    return found
