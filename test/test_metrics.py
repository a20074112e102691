"""Tests of lens_ros.training.metrics: LENS / LISA cIoU, gIoU, box accuracy, Boundary IoU (values by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lens_ros.training.metrics import (
    SegmentationMetrics,
    boundary_band,
    boundary_iou,
    box_iou,
    intersection_union,
    mask_iou,
)


def row_mask(width: int, *ranges: tuple[int, int]) -> np.ndarray:
    """A (1, width) mask, True on the half-open column ranges given."""
    mask = np.zeros((1, width), dtype=bool)
    for start, stop in ranges:
        mask[0, start:stop] = True
    return mask


# --------------------------------------------------------------------------- mask IoU


def test_intersection_union_counts_pixels():
    pred = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    gt = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)
    # intersection: (0,0), (1,1) = 2; union: (0,0), (0,1), (1,1), (1,2) = 4
    assert intersection_union(pred, gt) == (2, 4)
    assert mask_iou(pred, gt) == pytest.approx(0.5)
    assert all(type(v) is int for v in intersection_union(pred, gt))


def test_mask_iou_none_prediction_is_empty():
    gt = row_mask(8, (0, 4))
    assert intersection_union(None, gt) == (0, 4)  # union = GT area
    assert mask_iou(None, gt) == 0.0


def test_mask_iou_empty_union_is_one():
    empty = np.zeros((3, 3), dtype=bool)
    assert intersection_union(empty, empty) == (0, 0)
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(None, empty) == 1.0


def test_mask_iou_nonzero_means_foreground():
    assert mask_iou(np.array([[0, 255]], dtype=np.uint8), np.array([[0, 1]])) == 1.0


def test_mask_iou_ignore_leaves_pixels_out_of_both_counts():
    pred = row_mask(6, (0, 4))  # 0 1 2 3
    gt = row_mask(6, (2, 6))  # 2 3 4 5
    ignore = row_mask(6, (0, 1), (5, 6))  # 0 and 5 ignored
    # without ignore: I = {2,3} = 2, U = {0..5} = 6; with it: I = 2, U = {1,2,3,4} = 4
    assert intersection_union(pred, gt) == (2, 6)
    assert intersection_union(pred, gt, ignore) == (2, 4)
    assert mask_iou(pred, gt, ignore) == pytest.approx(0.5)


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="2-D"):
        mask_iou(np.zeros((2, 3, 1), bool), np.zeros((2, 3, 1), bool))
    with pytest.raises(ValueError, match="ignore"):
        mask_iou(np.zeros((2, 3), bool), np.zeros((2, 3), bool), ignore=np.zeros((3, 3), bool))


# --------------------------------------------------------------------------- box IoU


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    # half overlap: I = 5 * 10 = 50, U = 100 + 100 - 50 = 150
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # continuous coordinates, no +1: I = 1 * 1, U = 4 + 4 - 1
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0  # disjoint
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges


def test_box_iou_degenerate_and_non_finite_are_zero():
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty union
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # inverted box has area 0
    assert box_iou((0, 0, math.inf, 10), (0, 0, 10, 10)) == 0.0
    assert box_iou((0, 0, math.nan, 10), (0, 0, 10, 10)) == 0.0


# --------------------------------------------------------------------------- Boundary IoU


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_boundary_iou_square_vs_shifted_square_by_hand():
    # 10x10 image: d = max(1, round(0.02 * 14.14)) = max(1, 0) = 1, so the band of a 4x4 square is
    # the square minus its 2x2 interior: 12 pixels.
    a = square(10, 2, 2, 4)  # rows 2-5, cols 2-5
    b = square(10, 2, 3, 4)  # rows 2-5, cols 3-6 (shifted right by 1)
    assert boundary_band(a).sum() == 12
    # Bands: a = rows 2 and 5 at cols 2-5, + cols 2 and 5 at rows 3-4;
    #        b = rows 2 and 5 at cols 3-6, + cols 3 and 6 at rows 3-4.
    # Common: rows 2 and 5 at cols 3, 4, 5 = 6 pixels; rows 3-4 share none.
    # Union = 12 + 12 - 6 = 18, Boundary IoU = 6 / 18 = 1/3 (mask IoU would be 12 / 20 = 0.6).
    assert boundary_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, b) == pytest.approx(0.6)
    assert boundary_iou(a, a) == 1.0


def test_boundary_band_width_follows_diagonal():
    # 100x100: d = round(0.02 * 141.42) = round(2.83) = 3; a 20x20 square keeps a 14x14 interior
    mask = square(100, 40, 40, 20)
    assert boundary_band(mask).sum() == 20 * 20 - 14 * 14
    # a radius larger than the object erodes it entirely: the band is the whole mask
    assert boundary_band(square(100, 10, 10, 5)).sum() == 25


def test_boundary_band_image_border_counts_as_background():
    full = np.ones((10, 10), dtype=bool)
    band = boundary_band(full)  # d = 1: the outer ring of the image
    assert band.sum() == 100 - 64
    assert not band[1:-1, 1:-1].any()


def test_boundary_iou_empty_conventions():
    empty = np.zeros((10, 10), dtype=bool)
    assert boundary_iou(empty, empty) == 1.0
    assert boundary_iou(None, square(10, 2, 2, 4)) == 0.0


def test_boundary_band_matches_reference_opencv_construction():
    cv2 = pytest.importorskip("cv2")

    def reference_band(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
        # Cheng et al.'s construction: 1-pixel zero border, `dilation` iterations of a 3x3 erosion.
        h, w = mask.shape
        dilation = max(1, int(round(dilation_ratio * np.sqrt(h ** 2 + w ** 2))))
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=dilation)[1:h + 1, 1:w + 1]
        return (mask.astype(np.uint8) - eroded).astype(bool)

    rng = np.random.default_rng(0)
    for shape in [(7, 9), (48, 64), (120, 90)]:
        for density in (0.3, 0.7, 0.95):
            mask = rng.random(shape) < density
            np.testing.assert_array_equal(boundary_band(mask), reference_band(mask))
            np.testing.assert_array_equal(boundary_band(mask, 0.05), reference_band(mask, 0.05))


# --------------------------------------------------------------------------- accumulator


def test_ciou_and_giou_differ_on_a_three_sample_set():
    # sample 1: GT = pred = 10 px                      -> I = 10, U = 10, IoU = 1
    # sample 2: GT 10 px, pred 10 other px (disjoint)  -> I = 0,  U = 20, IoU = 0
    # sample 3: GT 2 px, pred 1 of them                -> I = 1,  U = 2,  IoU = 0.5
    # cIoU = (10 + 0 + 1) / (10 + 20 + 2) = 11 / 32 = 0.34375
    # gIoU = (1 + 0 + 0.5) / 3 = 0.5
    metrics = SegmentationMetrics()
    assert metrics.add(row_mask(20, (0, 10)), row_mask(20, (0, 10)), None, None, True, None) == 1.0
    assert metrics.add(row_mask(20, (10, 20)), row_mask(20, (0, 10)), None, None, True, None) == 0.0
    assert metrics.add(row_mask(20, (0, 1)), row_mask(20, (0, 2)), None, None, True, None) == 0.5
    summary = metrics.summary()
    assert summary["count"] == 3
    assert summary["cIoU"] == pytest.approx(11 / 32)
    assert summary["gIoU"] == pytest.approx(0.5)
    assert metrics.total_intersection == 11 and metrics.total_union == 32


def test_empty_union_sample_counts_one_in_giou_nothing_in_ciou():
    # sample 1: GT 4 px, pred 2 of them -> I = 2, U = 4, IoU = 0.5
    # sample 2: empty GT, nothing found (pred None) -> I = 0, U = 0, IoU = 1.0 (LISA)
    # gIoU = (0.5 + 1) / 2 = 0.75; cIoU = (2 + 0) / (4 + 0) = 0.5
    metrics = SegmentationMetrics()
    metrics.add(row_mask(8, (0, 2)), row_mask(8, (0, 4)), None, None, True, None)
    assert metrics.add(None, np.zeros((1, 8), bool), None, None, False, None) == 1.0
    summary = metrics.summary()
    assert summary["gIoU"] == pytest.approx(0.75)
    assert summary["cIoU"] == pytest.approx(0.5)


def test_none_prediction_counts_gt_area_in_union():
    # pred None: I = 0, U = GT area 3
    metrics = SegmentationMetrics()
    assert metrics.add(None, row_mask(8, (0, 3)), None, None, False, None) == 0.0
    assert (metrics.total_intersection, metrics.total_union) == (0, 3)
    assert metrics.summary()["cIoU"] == 0.0


def test_box_accuracy_threshold_included_and_samples_without_gt_box_left_out():
    gt = (0, 0, 10, 10)
    gt_mask = row_mask(4, (0, 2))
    metrics = SegmentationMetrics()
    metrics.add(gt_mask, gt_mask, (0, 0, 10, 5), gt, True, None)  # I 50 / U 100 = 0.5 exactly: hit
    metrics.add(gt_mask, gt_mask, (0, 0, 10, 4.9), gt, True, None)  # 49 / 100 = 0.49: miss
    metrics.add(gt_mask, gt_mask, None, gt, False, None)  # no prediction: miss
    metrics.add(gt_mask, gt_mask, (0, 0, 10, 10), None, True, None)  # no GT box: not counted
    summary = metrics.summary()
    assert summary["box_count"] == 3
    assert summary["box_accuracy"] == pytest.approx(1 / 3)
    assert summary["box_iou_threshold"] == 0.5


def test_found_rate_and_latency():
    gt_mask = row_mask(4, (0, 2))
    metrics = SegmentationMetrics()
    metrics.add(gt_mask, gt_mask, None, None, True, 100.0)
    metrics.add(None, gt_mask, None, None, False, 300.0)
    metrics.add(gt_mask, gt_mask, None, None, True, None)  # no timing: out of the mean
    metrics.add(gt_mask, gt_mask, None, None, True, 200.0)
    summary = metrics.summary()
    assert summary["found_rate"] == pytest.approx(3 / 4)
    assert summary["mean_latency_ms"] == pytest.approx(200.0)  # (100 + 300 + 200) / 3
    assert summary["latency_count"] == 3
    assert len(metrics) == 4


def test_summary_of_nothing_is_nan_and_all_empty_unions_give_ciou_one():
    summary = SegmentationMetrics().summary()
    assert summary["count"] == 0
    for key in ("cIoU", "gIoU", "box_accuracy", "found_rate", "mean_latency_ms"):
        assert math.isnan(summary[key]), key
    metrics = SegmentationMetrics()
    metrics.add(None, np.zeros((2, 2), bool), None, None, False, None)
    assert metrics.summary()["cIoU"] == 1.0 and metrics.summary()["gIoU"] == 1.0


def test_add_with_ignore_region():
    metrics = SegmentationMetrics()
    # as in test_mask_iou_ignore_leaves_pixels_out_of_both_counts: I = 2, U = 4
    iou = metrics.add(row_mask(6, (0, 4)), row_mask(6, (2, 6)), None, None, True, None,
                      ignore=row_mask(6, (0, 1), (5, 6)))
    assert iou == pytest.approx(0.5)
    assert (metrics.total_intersection, metrics.total_union) == (2, 4)
