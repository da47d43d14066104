"""Bounding boxes for localisation (Appendix A): how the training augmentation moves them, the
regression target, IoU, OverFeat's greedy merging, and the ILSVRC top-5 localisation error.

numpy only. A box is (xmin, ymin, xmax, ymax) in pixel coordinates of its image, continuous:
pixel column i spans [i, i + 1), so a box over the whole h x w image is (0, 0, w, h), and a
transform that moves pixels (rescale, crop, flip) moves box edges by the same map.
"""

from __future__ import annotations

import numpy as np

IOU_CORRECT = 0.5  # ILSVRC: a guess is right when IoU with a ground-truth box of its class > 0.5


def as_boxes(boxes) -> np.ndarray:
    """(N, 4) float64 array of boxes (an empty input gives (0, 4))."""
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def rescale(boxes, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Boxes of an (h, w) image after it is resized to `new_size` (h', w')."""
    (h, w), (nh, nw) = size, new_size
    return as_boxes(boxes) * np.array([nw / w, nh / h, nw / w, nh / h])


def crop(boxes, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in the frame of the crop [top, top + height) x [left, left + width), clipped to it;
    and which boxes keep some area there (the others are dropped from the result)."""
    moved = as_boxes(boxes) - np.array([left, top, left, top])
    clipped = np.clip(moved, 0, [width, height, width, height])
    kept = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[kept], kept


def flip(boxes, width: int) -> np.ndarray:
    """Boxes of a width-wide image after a horizontal flip (column x goes to width - x)."""
    b = as_boxes(boxes)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)


def into_window(boxes, window, side: int) -> np.ndarray:
    """Boxes of a decoded image in the frame of one crop of it: `window` (top, left, height,
    width, flip; `vgg_ray.transforms.Window`) resized to side x side, then mirrored if flip.
    Not clipped: a box may reach past the crop."""
    top, left, height, width, flipped = window
    scale = np.array([side / width, side / height, side / width, side / height])
    moved = (as_boxes(boxes) - np.array([left, top, left, top])) * scale
    return flip(moved, side) if flipped else moved


def out_of_window(boxes, window, side: int) -> np.ndarray:
    """The inverse of `into_window`: boxes in a crop's frame back in its image's pixels."""
    top, left, height, width, flipped = window
    b = flip(boxes, side) if flipped else as_boxes(boxes)
    scale = np.array([width / side, height / side, width / side, height / side])
    return b * scale + np.array([left, top, left, top])


def crop_target(records, label: int, window, side: int) -> np.ndarray:
    """The regression target (4,) of one crop: of the image's boxes `records` ((k, 5): label,
    xmin, ymin, xmax, ymax), the box of class `label` that shows most inside the crop, whole
    (not clipped to it: the net learns the object's extent), as `to_target` gives it; NaN
    where no box of the class shows (such a crop trains nothing)."""
    records = np.asarray(records, np.float64).reshape(-1, 5)
    moved = into_window(records[records[:, 0] == label, 1:], window, side)
    visible = area(np.clip(moved, 0, side)) if len(moved) else np.zeros(1)
    if visible.max() <= 0:
        return np.full(4, np.nan)
    return to_target(moved[np.argmax(visible)], side)[0]


def to_target(boxes, side: int) -> np.ndarray:
    """The regression target of boxes in a side x side crop: (centre x, centre y, width,
    height), each divided by the side (a box over the whole crop is (0.5, 0.5, 1, 1))."""
    b = as_boxes(boxes)
    centre = (b[:, :2] + b[:, 2:]) / 2
    return np.concatenate([centre, b[:, 2:] - b[:, :2]], axis=1) / side


def from_target(target, side: int) -> np.ndarray:
    """Boxes from regression outputs (the inverse of `to_target`); widths below 0 become 0."""
    t = np.asarray(target, np.float64).reshape(-1, 4) * side
    half = np.maximum(t[:, 2:], 0) / 2
    return np.concatenate([t[:, :2] - half, t[:, :2] + half], axis=1)


def area(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou(a, b) -> np.ndarray:
    """(len(a), len(b)) intersection over union of every pair."""
    a, b = as_boxes(a), as_boxes(b)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def merge(boxes, scores, *, threshold: float = IOU_CORRECT) -> tuple[np.ndarray, np.ndarray]:
    """OverFeat's greedy merging (Sermanet et al. 2014, as Appendix A uses it): while two boxes
    overlap with IoU above `threshold`, the closest pair (highest IoU) becomes one box, the mean
    of the boxes merged into it so far; its score is their summed score, so a box many positions
    agree on outranks a lone one. Returns (boxes, scores), best score first."""
    means = as_boxes(boxes).copy()
    weights = np.asarray(scores, np.float64).reshape(-1).copy()
    counts = np.ones(len(means))
    alive = np.ones(len(means), bool)
    overlap = iou(means, means)
    np.fill_diagonal(overlap, -1.0)
    while alive.sum() > 1:
        i, j = np.unravel_index(np.argmax(overlap), overlap.shape)
        if overlap[i, j] <= threshold:
            break
        i, j = min(i, j), max(i, j)
        # the mean of all boxes merged into i and j, weighted by how many each holds
        means[i] = (means[i] * counts[i] + means[j] * counts[j]) / (counts[i] + counts[j])
        counts[i] += counts[j]
        weights[i] += weights[j]
        alive[j] = False
        overlap[j, :] = overlap[:, j] = -1.0
        row = np.where(alive, iou(means[i : i + 1], means)[0], -1.0)
        row[i] = -1.0
        overlap[i, :] = overlap[:, i] = row
    order = np.flatnonzero(alive)[np.argsort(-weights[alive], kind="stable")]
    return means[order], weights[order]


def localisation_error(
    guesses: list[list[tuple[int, np.ndarray]]],
    truths: list[list[tuple[int, np.ndarray]]],
) -> float:
    """The ILSVRC top-5 localisation error: the share of images none of whose (up to 5) guesses
    (class, box) names a ground-truth class with IoU > 0.5 against one of that class's boxes."""
    if len(guesses) != len(truths):
        raise ValueError(f"{len(guesses)} images guessed but {len(truths)} with ground truth")
    wrong = 0
    for image_guesses, image_truths in zip(guesses, truths, strict=True):
        hit = False
        for label, box in image_guesses[:5]:
            same = [b for c, b in image_truths if c == label]
            if same and iou([box], same).max() > IOU_CORRECT:
                hit = True
                break
        wrong += not hit
    return wrong / max(1, len(truths))
