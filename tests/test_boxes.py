"""Appendix A's box arithmetic (`vgg_ray.boxes`) against hand-computed cases: a box moves
exactly as its pixels do under rescale, crop and flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from vgg_ray import boxes


def _mask(height: int, width: int, box) -> torch.Tensor:
    """A (1, h, w) image: 255 inside the integer box, 0 outside."""
    x0, y0, x1, y1 = (int(v) for v in box)
    image = torch.zeros(1, height, width, dtype=torch.uint8)
    image[:, y0:y1, x0:x1] = 255
    return image


def _box_of(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_rescale_crop_and_flip_move_a_box_as_they_move_its_pixels():
    box = [10, 6, 30, 22]
    image = _mask(40, 60, box)
    # Crop, then flip: pixel operations, exact.
    cropped = image[:, 4:36, 8:40]
    moved, kept = boxes.crop([box], top=4, left=8, height=32, width=32)
    assert kept.tolist() == [True] and moved.tolist() == [[2, 2, 22, 18]] == [_box_of(cropped)]
    flipped = cropped.flip(-1)
    assert boxes.flip(moved, 32).tolist() == [_box_of(flipped)] == [[10, 2, 30, 18]]
    # Rescale by 2 (nearest: every pixel becomes a 2x2 block, so the box doubles exactly).
    bigger = TF.resize(image, [80, 120], interpolation=TF.InterpolationMode.NEAREST)
    assert boxes.rescale([box], (40, 60), (80, 120)).tolist() == [_box_of(bigger)]


def test_a_crop_clips_boxes_and_drops_those_left_outside():
    moved, kept = boxes.crop([[0, 0, 10, 10], [50, 50, 60, 60], [5, 5, 100, 8]], top=2, left=3,
                             height=20, width=20)  # fmt: skip
    assert kept.tolist() == [True, False, True]
    assert moved.tolist() == [[0, 0, 7, 8], [2, 3, 20, 6]]


def test_the_regression_target_is_centre_and_size_over_the_crop_side():
    target = boxes.to_target([[0, 0, 224, 224], [56, 112, 112, 224]], 224)
    np.testing.assert_allclose(target, [[0.5, 0.5, 1, 1], [0.375, 0.75, 0.25, 0.5]])
    np.testing.assert_allclose(boxes.from_target(target, 224), [[0, 0, 224, 224],
                                                                [56, 112, 112, 224]])  # fmt: skip


def test_iou_of_hand_cases():
    got = boxes.iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 2, 1]])
    np.testing.assert_allclose(got, [[1 / 7, 1.0, 0.0, 0.5]])


def test_greedy_merging_averages_close_boxes_and_ranks_by_summed_score():
    merged, scores = boxes.merge(
        [[0, 0, 10, 10], [1, 1, 11, 11], [0, 1, 10, 11], [50, 50, 60, 60]], [0.2, 0.3, 0.1, 0.5]
    )
    # The three overlapping boxes become their mean, score 0.6; the far one stays alone.
    np.testing.assert_allclose(merged, [[1 / 3, 2 / 3, 31 / 3, 32 / 3], [50, 50, 60, 60]])
    np.testing.assert_allclose(scores, [0.6, 0.5])
    merged, scores = boxes.merge([[0, 0, 10, 10], [6, 0, 16, 10]], [1, 1])  # IoU 0.25: kept apart
    assert len(merged) == 2


def test_top5_localisation_error_needs_the_class_and_iou_above_one_half():
    truth = [[(3, np.array([0, 0, 10, 10]))], [(1, np.array([0, 0, 10, 10])),
                                               (2, np.array([20, 20, 30, 30]))]]  # fmt: skip
    right_box_wrong_class = [(7, np.array([0, 0, 10, 10]))]
    right_class_wrong_box = [(3, np.array([5, 5, 15, 15]))]  # IoU 25/175
    fifth_guess_right = [(9, np.zeros(4))] * 4 + [(2, np.array([21, 21, 30, 30]))]  # IoU 0.81
    assert boxes.localisation_error([right_box_wrong_class, fifth_guess_right], truth) == 0.5
    assert boxes.localisation_error([right_class_wrong_box, fifth_guess_right], truth) == 0.5
    sixth_guess = [(9, np.zeros(4))] * 5 + [(1, np.array([0, 0, 10, 10]))]
    assert boxes.localisation_error([right_class_wrong_box, sixth_guess], truth) == 1.0
    with pytest.raises(ValueError, match="1 images guessed but 2"):
        boxes.localisation_error([[]], truth)
