"""The learning benchmark's reference points: the scores of answers that ignore the expression."""

from __future__ import annotations

import numpy as np
import pytest

from lens_ros.bench.learning import format_references, reference_points, shape_masks
from lens_ros.training.data import Sample

SIZE = 112  # the VLM keeps 112x112 as it is (a multiple of 28), so VLM pixels are image pixels
RED, BLUE = (215, 45, 40), (40, 80, 215)
RED_BOX, BLUE_BOX = (10, 10, 40, 40), (60, 60, 90, 90)


def _picture(seed: int = 0) -> np.ndarray:
    """A light, grainy background with a red and a blue 30x30 square."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(225.0, 8.0, size=(SIZE, SIZE, 3)), 175, 252).astype(np.uint8)
    for (x1, y1, x2, y2), colour in ((RED_BOX, RED), (BLUE_BOX, BLUE)):
        image[y1:y2, x1:x2] = colour
    return image


def _mask(box) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _sample(box, seed: int = 0) -> Sample:
    return Sample(image=_picture(seed), expression="the shape", box=tuple(float(v) for v in box), mask=_mask(box),
                  success=None, source="test")


def test_shape_masks_finds_each_drawn_shape_and_nothing_of_the_background():
    masks = shape_masks(_picture())
    assert len(masks) == 2
    found = sorted(masks, key=lambda mask: np.argwhere(mask)[0].tolist())
    np.testing.assert_array_equal(found[0], _mask(RED_BOX))
    np.testing.assert_array_equal(found[1], _mask(BLUE_BOX))


def test_shape_masks_of_a_blank_image_is_empty():
    assert shape_masks(np.full((64, 64, 3), 230, dtype=np.uint8)) == []


def test_reference_points_equal_the_hand_computed_scores():
    train = [_sample(RED_BOX, 1), _sample(RED_BOX, 2), _sample(BLUE_BOX, 3)]  # median box: the red one
    val = [_sample(RED_BOX, 4), _sample(BLUE_BOX, 5)]
    points = reference_points(train, val)

    assert points["constant_box"]["box"] == [10.0, 10.0, 40.0, 40.0]
    assert points["constant_box"]["box_iou"] == pytest.approx(0.5)  # 1 for the red target, 0 for the blue
    assert points["constant_box"]["box_iou_reward"] == pytest.approx(0.5)
    whole = 900 / SIZE**2
    assert points["whole_image"]["mask_iou"] == pytest.approx(whole)
    assert points["whole_image"]["mask_iou_reward"] == pytest.approx(whole**2)
    assert points["all_shapes"]["mask_iou"] == pytest.approx(0.5)  # 900 of the 1800 shape pixels
    assert points["all_shapes"]["mask_iou_reward"] == pytest.approx(0.25)
    assert points["random_shape"]["mask_iou"] == pytest.approx(0.5)  # the right square or the wrong one
    assert points["random_shape"]["mask_iou_reward"] == pytest.approx(0.5)


def test_format_references_lists_every_score_but_not_the_box():
    line = format_references(reference_points([_sample(RED_BOX, 1)], [_sample(BLUE_BOX, 2)]))
    assert line.startswith("constant_box box_iou 0.000, box_iou_reward 0.000; whole_image mask_iou ")
    assert "all_shapes mask_iou 0.500, mask_iou_reward 0.250; random_shape mask_iou 0.500" in line
    assert "box [" not in line
