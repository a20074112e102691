"""Evaluation metrics of LENS / LISA (LENS_REFERENCE §5), and the IoU helpers the rewards reuse.

* ``cIoU`` = total intersection / total union over a whole split: big objects weigh more.
* ``gIoU`` = mean of per-sample IoUs, an empty-union sample (no object and nothing predicted)
  counting as 1.0: LISA's convention (its ``acc_iou[union == 0] += 1.0``), which LENS's
  evaluation inherits.
* Box accuracy = fraction of samples with a ground-truth box whose predicted box has IoU >= 0.5.

Boxes are continuous (x1, y1, x2, y2) coordinates, area = max(0, x2 - x1) * max(0, y2 - y1), no
"+1" pixel convention (LENS's ``compute_iou`` has none either). Masks are boolean (H, W) arrays,
nonzero meaning foreground. Numpy only: the evaluator, the trainer's reward functions and the
tests all import this module, and none of them should pay for torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "intersection_union",
    "mask_iou",
    "box_iou",
    "boundary_band",
    "boundary_iou",
    "SegmentationMetrics",
]

BoxLike = Sequence[float]


def _as_bool_mask(mask, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {array.shape}")
    return array.astype(bool, copy=False)


def _masks(pred, gt, ignore=None) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``gt`` as bool arrays of one shape (``pred`` None = empty), ``ignore`` removed."""
    gt = _as_bool_mask(gt, "gt")
    pred = np.zeros_like(gt) if pred is None else _as_bool_mask(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"pred mask shape {pred.shape} != gt mask shape {gt.shape}")
    if ignore is not None:
        ignore = _as_bool_mask(ignore, "ignore")
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore mask shape {ignore.shape} != gt mask shape {gt.shape}")
        # LISA sets ignored pixels of the prediction to the ignore label: out of both I and U.
        keep = ~ignore
        pred, gt = pred & keep, gt & keep
    return pred, gt


def intersection_union(pred, gt, ignore=None) -> tuple[int, int]:
    """(intersection, union) pixel counts of two masks; ``pred`` None counts as an empty prediction.

    ``ignore`` (optional bool mask, e.g. ReasonSeg's "ignore" polygons) takes pixels out of both
    counts. Raises ValueError for masks of different shapes: a caller must resize first, since
    silently broadcasting would produce a plausible but wrong number.
    """
    pred, gt = _masks(pred, gt, ignore)
    intersection = int(np.count_nonzero(pred & gt))
    union = int(np.count_nonzero(pred | gt))
    return intersection, union


def mask_iou(pred, gt, ignore=None) -> float:
    """IoU of two masks; 1.0 when the union is empty (LISA's convention: nothing to find, nothing found)."""
    intersection, union = intersection_union(pred, gt, ignore)
    return 1.0 if union == 0 else intersection / union


def box_iou(a: BoxLike, b: BoxLike) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in continuous coordinates.

    0.0 when either box has a non-finite coordinate or the union has no area (two degenerate
    boxes): a box without area is not a detection, and 0.0 keeps rewards and accuracies finite.
    An inverted box (x2 < x1) has area 0, so its IoU with anything is 0.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    if not all(math.isfinite(v) for v in (ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)):
        return 0.0
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = area_a + area_b - inter
    if not union > 0.0:
        return 0.0
    # A degenerate box can still overlap a real one along a line (inter 0): IoU 0, as it should.
    return inter / union


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1) x (2r+1) square, pixels outside the image counting as background.

    That is what Cheng et al.'s reference code gets from a 1-pixel zero border and ``radius``
    iterations of a 3x3 ``cv2.erode``. Done as two 1-D window tests on cumulative sums (a pixel
    survives when its whole window is foreground), so it is O(H * W) whatever the radius.
    """
    window = 2 * radius + 1
    padded = np.pad(mask, radius, mode="constant", constant_values=False)
    return _window_all(_window_all(padded, window).T, window).T


def _window_all(mask: np.ndarray, window: int) -> np.ndarray:
    """For each run of ``window`` rows of ``mask``, whether all of it is True (H - window + 1 rows)."""
    counts = np.zeros((mask.shape[0] + 1, mask.shape[1]), dtype=np.int64)
    np.cumsum(mask, axis=0, out=counts[1:])
    return (counts[window:] - counts[:-window]) == window


def boundary_band(mask, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary band of Boundary IoU: ``mask`` minus its erosion by d pixels.

    d = max(1, round(dilation_ratio * image diagonal)) with Python's ``round`` (as the reference
    code). The image border counts as background, so a mask touching the border has a band there.
    """
    mask = _as_bool_mask(mask, "mask")
    height, width = mask.shape
    radius = max(1, int(round(dilation_ratio * math.hypot(height, width))))
    return mask & ~_erode(mask, radius)


def boundary_iou(pred, gt, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al., CVPR 2021): IoU of the two masks' boundary bands.

    Sensitive to contour quality where mask IoU is dominated by the interior of big objects.
    ``pred`` None counts as an empty mask. Empty union (both masks empty) gives 1.0, as
    :func:`mask_iou` does. The bands are computed on each mask's own pixels, so the ignore
    regions of :func:`mask_iou` do not apply here.
    """
    pred, gt = _masks(pred, gt)
    return mask_iou(boundary_band(pred, dilation_ratio), boundary_band(gt, dilation_ratio))


class SegmentationMetrics:
    """Accumulates LENS / LISA metrics over an evaluation split, one :meth:`add` per sample.

    Keeps only running totals and per-sample IoUs (floats), never masks, so a whole split fits.
    """

    def __init__(self, box_iou_threshold: float = 0.5) -> None:
        self.box_iou_threshold = float(box_iou_threshold)
        self.ious: list[float] = []  # per-sample mask IoU, empty union = 1.0 (order of add)
        self.box_ious: list[float] = []  # per-sample box IoU, samples with a GT box only
        self.total_intersection = 0
        self.total_union = 0
        self.found_count = 0
        self.latencies_ms: list[float] = []

    def __len__(self) -> int:
        return len(self.ious)

    def add(self, pred_mask, gt_mask, pred_box: BoxLike | None, gt_box: BoxLike | None, found: bool,
            latency_ms: float | None, ignore=None) -> float:
        """Record one sample; returns its mask IoU.

        ``pred_mask`` None (the model found nothing) is an empty prediction: intersection 0,
        union = GT area. ``gt_box`` None leaves the sample out of box accuracy; ``pred_box`` None
        with a GT box is a miss. ``pred_box`` and ``gt_box`` must be in the same frame (source
        pixels). ``latency_ms`` None leaves the sample out of the mean latency. ``ignore``
        (optional) takes pixels out of the mask counts, as LISA's ignore label does.
        """
        intersection, union = intersection_union(pred_mask, gt_mask, ignore)
        iou = 1.0 if union == 0 else intersection / union
        self.ious.append(iou)
        self.total_intersection += intersection
        self.total_union += union
        if gt_box is not None:
            self.box_ious.append(0.0 if pred_box is None else box_iou(pred_box, gt_box))
        self.found_count += bool(found)
        if latency_ms is not None:
            self.latencies_ms.append(float(latency_ms))
        return iou

    def summary(self) -> dict:
        """The metrics as plain floats / ints (JSON-ready); NaN where no sample qualifies.

        Keys: ``count``, ``cIoU``, ``gIoU``, ``box_accuracy`` (IoU >= ``box_iou_threshold``,
        threshold included), ``box_count``, ``box_iou_threshold``, ``found_rate``,
        ``mean_latency_ms``, ``latency_count``. ``cIoU`` is 1.0 when samples exist but every union
        is empty, for the same reason an empty-union sample counts 1.0 in ``gIoU``.
        """
        nan = float("nan")
        count = len(self.ious)
        if count == 0:
            ciou = nan
        else:
            ciou = 1.0 if self.total_union == 0 else self.total_intersection / self.total_union
        box_hits = sum(iou >= self.box_iou_threshold for iou in self.box_ious)
        return {
            "count": count,
            "cIoU": ciou,
            "gIoU": float(np.mean(self.ious)) if count else nan,
            "box_accuracy": box_hits / len(self.box_ious) if self.box_ious else nan,
            "box_count": len(self.box_ious),
            "box_iou_threshold": self.box_iou_threshold,
            "found_rate": self.found_count / count if count else nan,
            "mean_latency_ms": float(np.mean(self.latencies_ms)) if self.latencies_ms else nan,
            "latency_count": len(self.latencies_ms),
        }
