"""Parallel-jaw grasp regions from an object mask, in 3-D when depth is available.

Pure numpy/OpenCV, no ROS. ``grasp_regions(mask, depth, intrinsics, config)`` returns
``GraspCandidate``s, best first:

* **2-D** (always possible): the jaws close across the object's narrow image axis (the minor
  principal axis of the filled mask), at the centroid and, for elongated objects, at offsets
  along the long axis. The opening is the object's extent along the closing direction within
  the jaw's strip, plus ``margin_px`` on each side.
* **3-D** (depth + intrinsics): the masked pixels with valid depth are back-projected; the
  support plane is fitted (RANSAC) to the depth in a ring around the mask; points near the
  plane, points at depth discontinuities and points off the main footprint blob are rejected.
  The remaining points are projected onto the plane. Because every visible surface of an
  object standing on a table projects inside its footprint, and the top is visible from above,
  the filled projection is the footprint: its area moments give the centre and the narrow
  horizontal axis, the points in each jaw strip give the width. The jaws close across that
  axis at ``max(h/2, h - finger_length_m)`` above the plane (as low as the fingers reach, at
  most half-way), approaching against the plane normal (``"top_down"``) or along the camera
  ray (``"camera"``). Without a visible support plane the footprint is taken perpendicular to
  the camera ray instead and the approach is along the ray.

Input that cannot describe a real scene degrades to 2-D regions with a ``reason``, never to an
exception or a non-finite number: intrinsics implausible for the image (``Intrinsics.implausible_for``),
depth readings outside ``min_depth_m``..``max_depth_m`` (counted as invalid), and, as a last
guard, any 3-D candidate with a number that is not a finite float32 (what ``GraspRegion`` carries).

Conventions: pixel (u, v) = (column, row), integer coordinates at pixel centres; the camera
optical frame is x right, y down, z forward; angles in the image go from +u towards +v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

APPROACHES = ("top_down", "camera")
COMPONENTS = ("largest", "box")
# Resolution of the footprint raster; the widths come from the points themselves, not from it.
FOOTPRINT_CELL_M = 0.002
MAX_FOOTPRINT_CELLS = 1024
# Percentiles that bound an extent: robust to a few stray points, below 1 mm of bias on
# noise-free objects of a few centimetres.
EXTENT_PERCENTILES = (0.5, 99.5)
TINY_MASK_PX = 10
# Above this many object points the 3-D estimate uses every k-th row and column.
MAX_OBJECT_POINTS = 12000
BORDER_NOTE = "mask touches the image border: the object may be wider than it looks"
# Support plane RANSAC: fixed seed so that the same input always gives the same grasps.
RANSAC_ITERATIONS = 64
RANSAC_MAX_POINTS = 600
RANSAC_MIN_INLIER_FRACTION = 0.3
# Pinhole plausibility of intrinsics for an image: a pinhole camera images rays less than 90
# degrees off its optical axis, and a real lens sees more than a sliver of the world. Rays at
# 89.5 degrees or more at the image's edges (a field of view of 179 degrees or more when the
# principal point is central), or a whole image spanning less than 1 degree (a focal length of
# about 57 image widths), describe no camera: back-projection with them puts the points
# kilometres off or overflows. A principal point off the image (a crop) is fine within these.
MAX_RAY_ANGLE_DEG = 89.5
MIN_IMAGE_SPAN_DEG = 1.0
# Every number of a returned candidate must fit the float32 fields of a GraspRegion.
FLOAT32_MAX = float(np.finfo(np.float32).max)
CANDIDATE_NUMBERS = ("center_px", "angle_rad", "width_px", "length_px", "quality", "position_m", "closing_axis",
                     "approach_axis", "width_m", "object_width_m")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of the image the mask and depth belong to, in pixels."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self):
        values = (self.fx, self.fy, self.cx, self.cy)
        if not all(_finite_number(v) for v in values):
            raise ValueError(f"intrinsics must be finite numbers, got fx={self.fx} fy={self.fy} "
                             f"cx={self.cx} cy={self.cy}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={self.fx} fy={self.fy}")

    @classmethod
    def from_k(cls, k) -> "Intrinsics":
        """From a row-major 3x3 camera matrix (``sensor_msgs/CameraInfo.k``)."""
        k = np.asarray(k, dtype=np.float64).reshape(-1)
        if k.size != 9:
            raise ValueError(f"camera matrix must have 9 elements, got {k.size}")
        return cls(float(k[0]), float(k[4]), float(k[2]), float(k[5]))

    def implausible_for(self, width: int, height: int) -> str:
        """Why these cannot be a pinhole camera's intrinsics for a ``width`` x ``height`` image,
        or "" when they can: along each axis the rays through the image's edges must stay under
        ``MAX_RAY_ANGLE_DEG`` off the optical axis and span at least ``MIN_IMAGE_SPAN_DEG``."""
        problems = []
        for axis, focal, centre, size in (("x", self.fx, self.cx, width), ("y", self.fy, self.cy, height)):
            # The image's edges lie half a pixel beyond the first and last pixel centres. atan2
            # neither overflows nor divides by zero, whatever the (finite) numbers.
            first = math.degrees(math.atan2(-0.5 - centre, focal))
            last = math.degrees(math.atan2(size - 0.5 - centre, focal))
            widest = max(abs(first), abs(last))
            if widest >= MAX_RAY_ANGLE_DEG:
                problems.append(f"its rays in {axis} reach {widest:.1f} degrees off the optical axis "
                                f"(a pinhole camera's stay under {MAX_RAY_ANGLE_DEG:g})")
            elif last - first < MIN_IMAGE_SPAN_DEG:
                problems.append(f"it spans {last - first:.3g} degrees in {axis} (at least {MIN_IMAGE_SPAN_DEG:g})")
        if not problems:
            return ""
        return (f"intrinsics are implausible for a {width}x{height} image (fx={self.fx:.6g} fy={self.fy:.6g} "
                f"cx={self.cx:.6g} cy={self.cy:.6g}): " + "; ".join(problems))

    def project(self, points) -> np.ndarray:
        """(..., 3) camera-frame points -> (..., 2) pixel coordinates (u, v)."""
        p = np.asarray(points, dtype=np.float64)
        return np.stack((self.fx * p[..., 0] / p[..., 2] + self.cx, self.fy * p[..., 1] / p[..., 2] + self.cy), axis=-1)


@dataclass
class GraspConfig:
    """How grasp regions are computed; the defaults suit a Franka-Hand-sized parallel gripper."""

    max_opening_m: float = 0.08
    """Widest the gripper opens. 3-D candidates on wider parts of the object are dropped."""
    finger_length_m: float = 0.04
    """How far the jaws reach past their tips' base: the grasp is at most this far below the top."""
    finger_width_m: float = 0.02
    """Width of a jaw pad along the object's long axis: the strip whose extent sets the opening."""
    margin_m: float = 0.01
    """Clearance added on each side of the object's width (``width_m``), capped at max_opening_m."""
    margin_px: float = 4.0
    """Clearance added on each side of the object's width in the image (``width_px``, 2-D only)."""
    min_valid_points: int = 50
    """Fewest object points with valid depth (and support-plane points) for a 3-D estimate."""
    min_object_height_m: float = 0.005
    """Points lower than this above the support plane belong to the plane (mask bleeding onto the
    table); raised to three times the plane's residual noise when that is larger."""
    approach: str = "top_down"
    """"top_down": against the support-plane normal; "camera": along the camera ray."""
    num_candidates: int = 5
    """Most candidates returned; elongated objects get several along their long axis."""
    component: str = "largest"
    """Which connected part of the mask to grasp: "largest", or "box" (most pixels in the box)."""
    support_ring_px: tuple = (4, 24)
    """Inner and outer distance (pixels) of the ring around the mask where the support plane is
    fitted; the inner gap keeps the mask's edge out of it."""
    min_depth_m: float = 0.05
    """Nearest plausible depth reading (metres); nearer ones count as invalid, like 0 and NaN.
    5 cm is below the near limit of common RGB-D cameras (RealSense D405 about 7 cm, D435 and
    Azure Kinect a few tenths of a metre), so only readings no camera makes (1e-38 m) go."""
    max_depth_m: float = 10.0
    """Farthest plausible depth reading (metres); farther ones count as invalid. 10 m is the far
    end of common RGB-D cameras' range and far beyond an arm's reach; raise it for long-range
    stereo cameras if the support plane lies further away."""

    def __post_init__(self):
        for name in ("max_opening_m", "finger_length_m", "finger_width_m", "min_depth_m", "max_depth_m"):
            value = getattr(self, name)
            if not (_finite_number(value) and value > 0):
                raise ValueError(f"GraspConfig.{name} must be positive and finite, got {value}")
        for name in ("margin_m", "margin_px", "min_object_height_m"):
            value = getattr(self, name)
            if not (_finite_number(value) and value >= 0):
                raise ValueError(f"GraspConfig.{name} must be >= 0 and finite, got {value}")
        if not self.min_depth_m < self.max_depth_m:
            raise ValueError(f"GraspConfig.min_depth_m ({self.min_depth_m}) must be below GraspConfig.max_depth_m "
                             f"({self.max_depth_m})")
        if self.approach not in APPROACHES:
            raise ValueError(f"GraspConfig.approach must be one of {', '.join(APPROACHES)}, got {self.approach!r}")
        if self.component not in COMPONENTS:
            raise ValueError(f"GraspConfig.component must be one of {', '.join(COMPONENTS)}, got {self.component!r}")
        if int(self.num_candidates) < 1 or int(self.min_valid_points) < 3:
            raise ValueError(f"GraspConfig.num_candidates must be >= 1 and min_valid_points >= 3, got "
                             f"{self.num_candidates} and {self.min_valid_points}")
        inner, outer = self.support_ring_px
        if not 0 <= inner < outer:
            raise ValueError("GraspConfig.support_ring_px must be (inner, outer) with 0 <= inner < outer, "
                             f"got {self.support_ring_px}")


@dataclass(frozen=True)
class GraspCandidate:
    """One parallel-jaw grasp; maps one to one onto ``lens_ros/GraspRegion``."""

    center_px: tuple  # (u, v)
    angle_rad: float  # closing direction in the image, from +u towards +v, in (-pi/2, pi/2]
    width_px: float  # opening along the closing direction
    length_px: float  # jaw length across it
    quality: float  # 0..1
    has_3d: bool = False
    position_m: tuple | None = None  # camera optical frame
    closing_axis: tuple | None = None  # unit; orthogonal to approach_axis
    approach_axis: tuple | None = None  # unit, the direction the gripper moves in
    width_m: float = 0.0  # opening in metres: object width + 2 margin_m, at most max_opening_m
    reason: str = ""  # why the candidate is degraded (2-D only, border, tiny); empty otherwise
    object_width_m: float = 0.0  # the object's measured width where the jaws close (3-D), without margins


def grasp_regions(mask, depth=None, intrinsics: Intrinsics | None = None, config: GraspConfig | None = None,
                  box=None) -> list[GraspCandidate]:
    """Grasp candidates on the object in ``mask``, best first.

    ``mask``: bool (H, W). ``depth``: (H, W), uint16 millimetres or float metres, aligned to the
    mask; 0, NaN, inf and readings outside ``config.min_depth_m``..``max_depth_m`` are invalid.
    ``intrinsics`` must come with ``depth``; implausible ones for the mask's size give 2-D
    regions. ``box`` (x1, y1, x2, y2) picks the component when ``config.component == "box"``.
    Raises ``ValueError`` for malformed input; degraded results carry a ``reason`` instead.
    """
    config = config or GraspConfig()
    mask = _check_mask(mask)
    if (depth is None) != (intrinsics is None):
        raise ValueError("depth and intrinsics go together: 3-D grasps need both")
    if depth is not None:
        _check_depth(depth, mask.shape)
        if not isinstance(intrinsics, Intrinsics):
            raise ValueError(f"intrinsics must be a lens_ros.grasp.Intrinsics, got {type(intrinsics).__name__}")
    # Everything happens in the mask's bounding box (plus the support ring with depth): a few
    # percent of the image, which keeps a call within milliseconds.
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    pad = config.support_ring_px[1] + 1 if depth is not None else 1
    u0, v0 = max(0, x - pad), max(0, y - pad)
    u1, v1 = min(mask.shape[1], x + w + pad), min(mask.shape[0], y + h + pad)
    roi = mask[v0:v1, u0:u1]
    component, notes = _select_component(roi, config.component, box, (u0, v0), mask.shape)
    planar = _regions_2d(component, config, notes, (u0, v0))
    if depth is None:
        return planar
    implausible = intrinsics.implausible_for(mask.shape[1], mask.shape[0])
    if implausible:
        return _degraded(planar, f"{implausible}: 2-D regions only")
    roi_depth, out_of_range = _usable_depth(depth[v0:v1, u0:u1], config)
    spatial, why_not = _regions_3d(roi & component, component, roi_depth, out_of_range, intrinsics, config, notes,
                                   (u0, v0))
    spatial, why_not = _publishable(spatial, why_not)
    if spatial:
        return spatial
    return _degraded(planar, why_not)


def _degraded(planar: list[GraspCandidate], why_not: str) -> list[GraspCandidate]:
    """The 2-D candidates, their reason led by why there is no 3-D grasp."""
    return [replace(c, reason=_join(why_not, c.reason)) for c in planar]


def _publishable(candidates: list[GraspCandidate], why_not: str) -> tuple[list[GraspCandidate], str]:
    """Defence in depth: only 3-D candidates whose every number is a finite float32 (what a
    GraspRegion carries) are returned; absurd but valid settings can overflow the geometry."""
    problems = [_first_unusable_number(c) for c in candidates]
    kept = [c for c, problem in zip(candidates, problems) if not problem]  # the others are no grasp at all
    if candidates and not kept:
        return [], f"the 3-D estimate is unusable ({problems[0]} is not a finite float32): 2-D regions only"
    return kept, why_not


def _first_unusable_number(candidate: GraspCandidate) -> str:
    """"name=value" of the candidate's first number that is not a finite float32, or ""."""
    for name in CANDIDATE_NUMBERS:
        value = getattr(candidate, name)
        numbers = () if value is None else value if isinstance(value, tuple) else (value,)  # 2-D: no position
        for number in numbers:
            if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
                return f"{name}={number:g}"
    return ""


# --- input ---------------------------------------------------------------------------------

def _check_mask(mask) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D (H, W) array, got shape {mask.shape}")
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise ValueError(f"mask must be bool (or numeric, non-zero = object), got {mask.dtype}")
        mask = mask != 0
    if not mask.any():
        raise ValueError("mask is empty: there is no object to grasp")
    return np.ascontiguousarray(mask)


def _check_depth(depth, shape) -> None:
    if not isinstance(depth, np.ndarray) or depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D (H, W) array, got {getattr(depth, 'shape', type(depth).__name__)}")
    if depth.shape != shape:
        raise ValueError(f"depth is {depth.shape[1]}x{depth.shape[0]} but the mask is {shape[1]}x{shape[0]}")
    if depth.dtype != np.uint16 and not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth must be uint16 (mm) or float (m), got {depth.dtype}")


def _usable_depth(depth: np.ndarray, config: GraspConfig) -> tuple[np.ndarray, np.ndarray]:
    """``_in_metres`` with readings outside ``min_depth_m``..``max_depth_m`` set to 0 too, and
    where those were (for the reason when too little depth is left)."""
    metres = _in_metres(depth)
    out_of_range = (metres > 0) & ((metres < config.min_depth_m) | (metres > config.max_depth_m))
    metres[out_of_range] = 0
    return metres, out_of_range


def _in_metres(depth: np.ndarray) -> np.ndarray:
    """float32 metres with 0 for every invalid reading (0 mm, NaN, inf, negative)."""
    if depth.dtype == np.uint16:
        return np.divide(depth, np.float32(1000), dtype=np.float32)  # 0 mm stays 0
    metres = depth.astype(np.float32, copy=True)
    metres[~((metres > 0) & (metres < np.inf))] = 0  # NaN compares False
    return metres


def _select_component(roi: np.ndarray, how: str, box, offset, image_shape) -> tuple[np.ndarray, list[str]]:
    """The component to grasp (in the ROI at ``offset`` of an image of ``image_shape``), holes
    filled: the jaws close on its outline."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(roi.view(np.uint8), connectivity=8)
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    chosen_by_box = False
    if how == "box" and box is not None and count > 2:
        x1, y1, x2, y2 = (int(round(float(v))) - o for v, o in zip(box, offset * 2))
        inside = labels[max(0, y1):max(0, y2) + 1, max(0, x1):max(0, x2) + 1]
        in_box = np.bincount(inside.ravel(), minlength=count)[1:]
        if in_box.any():
            label, chosen_by_box = 1 + int(np.argmax(in_box)), True
    component = (labels == label).astype(np.uint8)
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(component, contours, -1, 1, thickness=cv2.FILLED)
    left, top = stats[label, cv2.CC_STAT_LEFT] + offset[0], stats[label, cv2.CC_STAT_TOP] + offset[1]
    right, bottom = left + stats[label, cv2.CC_STAT_WIDTH], top + stats[label, cv2.CC_STAT_HEIGHT]
    notes = []
    if left == 0 or top == 0 or right == image_shape[1] or bottom == image_shape[0]:
        notes.append(BORDER_NOTE)
    if count > 2:
        which = "part under the box" if chosen_by_box else "largest part"
        notes.append(f"grasping the {which} of a mask in {count - 1} parts")
    return component.astype(bool), notes


# --- shared geometry -------------------------------------------------------------------------

def _principal_axes(region: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid (x, y) and unit long and narrow axes of a binary image, from its area moments."""
    m = cv2.moments(region.view(np.uint8) if region.dtype == bool else region, binaryImage=True)
    centroid = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])
    theta = 0.5 * math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"])
    long_axis = np.array([math.cos(theta), math.sin(theta)])
    return centroid, long_axis, np.array([-long_axis[1], long_axis[0]])


def _offsets(lo: float, hi: float, narrow_extent: float, strip: float, count: int) -> list[float]:
    """Strip positions along the long axis, whose extent relative to the centroid is [lo, hi]:
    the centroid (0) first, then symmetric offsets while the object is long enough for more
    strips than one."""
    long_extent = hi - lo
    if count == 1 or long_extent < 1.5 * narrow_extent:
        return [0.0]
    usable_lo, usable_hi = lo + strip / 2, hi - strip / 2  # strips stay on the object
    reach = min(-usable_lo, usable_hi)
    if reach <= 0:
        return [0.0]
    per_side = math.ceil((count - 1) / 2)
    step = max(strip, reach / per_side)  # strips do not overlap
    offsets = [0.0]
    for k in range(1, per_side + 1):
        offsets += [o for o in (k * step, -k * step) if usable_lo - 1e-9 <= o <= usable_hi + 1e-9]
    return offsets[:count]


def _extent(t: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(t, EXTENT_PERCENTILES)
    return float(lo), float(hi)


def _line_angle(direction) -> float:
    """Angle of an undirected image direction, in (-pi/2, pi/2]."""
    angle = math.atan2(float(direction[1]), float(direction[0]))
    if angle <= -math.pi / 2:
        angle += math.pi
    elif angle > math.pi / 2:
        angle -= math.pi
    return angle


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# --- 2-D ----------------------------------------------------------------------------------------

def _regions_2d(component: np.ndarray, config: GraspConfig, notes: list[str], offset) -> list[GraspCandidate]:
    vs, us = np.nonzero(component)
    origin = np.array(offset, dtype=np.float64)
    penalty = 0.5 if BORDER_NOTE in notes else 1.0
    if us.size < TINY_MASK_PX:
        width = float(us.max() - us.min() + 1) + 2 * config.margin_px
        length = float(vs.max() - vs.min() + 1)
        center = (float(us.mean() + origin[0]), float(vs.mean() + origin[1]))
        return [GraspCandidate(center_px=center, angle_rad=0.0, width_px=width, length_px=length, quality=0.1 * penalty,
                               reason=_join(f"mask has only {us.size} px: orientation unknown", *notes))]
    centroid, long_axis, narrow_axis = _principal_axes(component)
    # float32 and min/max: the pixels of one filled component have no outliers to trim.
    du, dv = us.astype(np.float32) - np.float32(centroid[0]), vs.astype(np.float32) - np.float32(centroid[1])
    s = du * np.float32(long_axis[0]) + dv * np.float32(long_axis[1])
    t = du * np.float32(narrow_axis[0]) + dv * np.float32(narrow_axis[1])
    narrow_extent = float(t.max() - t.min()) + 1
    # Without a metric scale the jaw is drawn half as long as the object is wide.
    jaw = max(3.0, 0.5 * narrow_extent)
    half_long = max(float(s.max() - s.min()) / 2, 1.0)
    candidates = []
    for along in _offsets(float(s.min()), float(s.max()), narrow_extent, jaw, config.num_candidates):
        in_strip = np.abs(s - along) <= jaw / 2
        if not in_strip.any():
            continue
        lo, hi = float(t[in_strip].min()), float(t[in_strip].max())
        center = origin + centroid + along * long_axis + (lo + hi) / 2 * narrow_axis
        quality = float(penalty * (1.0 - 0.5 * min(abs(along) / half_long, 1.0)))
        candidates.append(GraspCandidate(center_px=(float(center[0]), float(center[1])),
                                         angle_rad=_line_angle(narrow_axis),
                                         width_px=hi - lo + 1 + 2 * config.margin_px,
                                         length_px=jaw, quality=quality, reason=_join(*notes)))
    candidates.sort(key=lambda c: -c.quality)
    return candidates


# --- 3-D ------------------------------------------------------------------------------------

@dataclass
class _Plane:
    point: np.ndarray  # a point on the plane
    normal: np.ndarray  # unit, towards the camera
    noise_m: float  # RMS of the inliers' distances


def _regions_3d(roi_mask: np.ndarray, component: np.ndarray, roi_depth: np.ndarray, out_of_range: np.ndarray,
                intrinsics: Intrinsics, config: GraspConfig, notes: list[str],
                offset) -> tuple[list[GraspCandidate], str]:
    u0, v0 = offset
    total = int(roi_mask.sum())
    keep = roi_mask & (roi_depth > 0) & ~_depth_discontinuities(roi_depth, roi_mask)
    valid = int(keep.sum())
    if valid < config.min_valid_points:
        outside = int((roi_mask & out_of_range).sum())
        range_note = (f"; {outside} outside min_depth_m..max_depth_m, {config.min_depth_m:g}..{config.max_depth_m:g} m"
                      if outside else "")
        return [], (f"only {valid} of {total} mask pixels have usable depth (need {config.min_valid_points}"
                    f"{range_note}): 2-D regions only")
    stride = math.ceil(math.sqrt(valid / MAX_OBJECT_POINTS))
    if stride > 1:  # large objects: a regular pixel grid keeps the shape at a fraction of the cost
        sparse = np.zeros_like(keep)
        sparse[::stride, ::stride] = keep[::stride, ::stride]
        keep = sparse
    points = _back_project(roi_depth, keep, intrinsics, u0, v0)
    plane = _support_plane(roi_depth, component, intrinsics, u0, v0, config)
    if plane is None:
        return _fallback_along_ray(points, intrinsics, config, notes, valid / max(total, 1))
    heights = (points - plane.point) @ plane.normal
    floor = max(config.min_object_height_m, 3 * plane.noise_m)
    above = heights > floor
    if above.sum() < config.min_valid_points:
        return [], (f"the object rises less than {floor * 1000:.0f} mm above its support plane at "
                    f"{int(above.sum())} points (need {config.min_valid_points}): 2-D regions only")
    points, heights = points[above], heights[above]
    basis = _plane_basis(plane.normal)
    flat = (points - plane.point) @ basis.T  # (N, 2) footprint coordinates
    frame = _Footprint(plane.point, basis, plane.normal)
    return _candidates_on_footprint(flat, heights, frame, intrinsics, config, notes,
                                    valid / max(total, 1), approach_along_ray=config.approach == "camera")


@dataclass
class _Footprint:
    """A plane frame: origin, in-plane basis rows (2, 3) and the normal (towards the camera)."""

    origin: np.ndarray
    basis: np.ndarray
    normal: np.ndarray

    def to_camera(self, flat_xy, height) -> np.ndarray:
        return self.origin + flat_xy[0] * self.basis[0] + flat_xy[1] * self.basis[1] + height * self.normal


def _candidates_on_footprint(flat, heights, frame: _Footprint, intrinsics: Intrinsics, config: GraspConfig,
                             notes: list[str], valid_fraction: float, approach_along_ray: bool,
                             center_height=None, extra: str = "",
                             raster=None) -> tuple[list[GraspCandidate], str]:
    """``raster``: ``_footprint_raster(flat)`` when the caller has already made it."""
    region, origin, cell, in_blob = raster if raster is not None else _footprint_raster(flat)
    flat, heights = flat[in_blob], heights[in_blob]
    if flat.shape[0] < config.min_valid_points:
        return [], "too few object points form one footprint: 2-D regions only"
    centroid_cells, long_cells, narrow_cells = _principal_axes(region)
    centroid = origin + (centroid_cells + 0.5) * cell
    long_axis, narrow_axis = long_cells, narrow_cells  # the raster's axes are the plane's axes
    rel = flat - centroid
    s, t = rel @ long_axis, rel @ narrow_axis
    t_lo, t_hi = _extent(t)
    s_lo, s_hi = _extent(s)
    long_width, narrow_width = s_hi - s_lo, t_hi - t_lo
    long_3d = long_axis[0] * frame.basis[0] + long_axis[1] * frame.basis[1]
    narrow_3d = narrow_axis[0] * frame.basis[0] + narrow_axis[1] * frame.basis[1]
    data_quality = min(1.0, valid_fraction / 0.5)
    penalty = 0.5 if BORDER_NOTE in notes else 1.0
    candidates, too_wide = [], []
    for offset in _offsets(s_lo, s_hi, narrow_width, config.finger_width_m, config.num_candidates):
        in_strip = np.abs(s - offset) <= config.finger_width_m / 2
        if in_strip.sum() < 3:
            continue
        lo, hi = _extent(t[in_strip])
        object_width, closing_3d, across = hi - lo, narrow_3d, 0.5 * (lo + hi)
        where = centroid + offset * long_axis + across * narrow_axis
        top = float(np.percentile(heights[in_strip], 99))
        grasp_height = max(top / 2, top - config.finger_length_m) if center_height is None else center_height
        position = frame.to_camera(where, grasp_height)
        if approach_along_ray:
            approach = position / np.linalg.norm(position)
            closing_3d = narrow_3d - (narrow_3d @ approach) * approach
            if np.linalg.norm(closing_3d) < 0.5:  # the narrow axis points at the camera: close across the long one
                closing_3d, object_width = long_3d - (long_3d @ approach) * approach, long_width
            closing_3d = closing_3d / np.linalg.norm(closing_3d)
        else:
            approach = -frame.normal
        if object_width > config.max_opening_m:
            too_wide.append(object_width)
            continue
        width_m = min(object_width + 2 * config.margin_m, config.max_opening_m)
        fit = math.sqrt(max(0.0, 1.0 - object_width / config.max_opening_m))
        centred = 1.0 - 0.5 * min(abs(offset) / max(long_width / 2, 1e-6), 1.0)
        candidates.append(_with_image_region(position, closing_3d, approach, width_m, object_width, intrinsics, config,
                                             quality=max(0.05, fit) * centred * data_quality * penalty,
                                             reason=_join(extra, *notes)))
    if not candidates:
        widest_fit = config.max_opening_m * 1000
        narrowest = min(too_wide) * 1000 if too_wide else float("nan")
        return [], (f"the object is {narrowest:.0f} mm wide where the jaws would close, wider than "
                    f"max_opening_m ({widest_fit:.0f} mm): no 3-D grasp")
    candidates.sort(key=lambda c: -c.quality)
    return candidates, ""


def _with_image_region(position, closing, approach, width_m, object_width, intrinsics: Intrinsics,
                       config: GraspConfig, quality: float, reason: str) -> GraspCandidate:
    """A 3-D grasp with its image-plane region: the projected centre, jaws and opening."""
    side = np.cross(approach, closing)
    ends = intrinsics.project(np.stack([position - closing * width_m / 2, position + closing * width_m / 2,
                                        position - side * config.finger_width_m / 2,
                                        position + side * config.finger_width_m / 2, position]))
    center = ends[4]
    return GraspCandidate(center_px=(float(center[0]), float(center[1])), angle_rad=_line_angle(ends[1] - ends[0]),
                          width_px=float(np.linalg.norm(ends[1] - ends[0])),
                          length_px=float(np.linalg.norm(ends[3] - ends[2])), quality=float(min(1.0, quality)),
                          has_3d=True, position_m=tuple(float(v) for v in position),
                          closing_axis=tuple(float(v) for v in closing),
                          approach_axis=tuple(float(v) for v in approach),
                          width_m=float(width_m), reason=reason, object_width_m=float(object_width))


def _fallback_along_ray(points, intrinsics, config, notes, valid_fraction) -> tuple[list[GraspCandidate], str]:
    """No support plane in sight: footprint perpendicular to the camera ray, approach along it.

    The visible surface is all there is, so the centre is put half the object's width behind
    it (a roughly round cross-section); the reason says so.
    """
    depth_along = points[:, 2]
    median = float(np.median(depth_along))
    spread = max(4 * 1.4826 * float(np.median(np.abs(depth_along - median))), 0.02)
    points = points[np.abs(depth_along - median) <= spread]
    ray = np.median(points, axis=0)
    ray = ray / np.linalg.norm(ray)
    normal = -ray
    basis = _plane_basis(normal)
    origin = np.median(points, axis=0)
    flat = (points - origin) @ basis.T
    heights = (points - origin) @ normal
    raster = _footprint_raster(flat)
    in_blob = raster[3]
    first_lo, first_hi = _extent(flat[in_blob, 0])
    second_lo, second_hi = _extent(flat[in_blob, 1])
    behind = 0.5 * min(first_hi - first_lo, second_hi - second_lo)  # half the narrower in-plane extent
    why = ("no support plane around the object: approaching along the camera ray, centre assumed half its "
           "width behind the surface")
    return _candidates_on_footprint(flat, heights, _Footprint(origin, basis, normal), intrinsics, config,
                                    notes, valid_fraction, approach_along_ray=True,
                                    center_height=float(np.median(heights)) - behind, extra=why, raster=raster)


def _footprint_raster(flat: np.ndarray):
    """Rasterise footprint points; keep the largest blob (drops stray points off the object).

    Returns the filled blob (uint8 image, x = first coordinate), the raster origin, the cell
    size and which points fall in the blob.
    """
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    cell = max(FOOTPRINT_CELL_M, float((hi - lo).max()) / (MAX_FOOTPRINT_CELLS - 4))
    origin = lo - 2 * cell
    idx = np.floor((flat - origin) / cell).astype(np.int64)
    shape = (int(idx[:, 1].max()) + 3, int(idx[:, 0].max()) + 3)
    raster = np.zeros(shape, np.uint8)
    raster[idx[:, 1], idx[:, 0]] = 1
    # Close the gaps between sparse projected points (one pixel spans about a cell).
    raster = cv2.morphologyEx(raster, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(raster, connectivity=8)
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    blob = (labels == label).astype(np.uint8)
    contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(blob, contours, -1, 1, thickness=cv2.FILLED)
    in_blob = labels[idx[:, 1], idx[:, 0]] == label
    return blob, origin, cell, in_blob


def _depth_discontinuities(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask pixels off the surface their mask neighbours lie on: the "flying pixels" that depth
    cameras produce between an object's edge and the background, which belong to neither.

    A pixel is flagged when it is further than max(1 cm, 1.5 % of its depth) from the mean of
    the valid mask pixels in its 3x3 neighbourhood (itself included); one flying pixel moves
    its neighbours' means by a ninth of its jump only, so they stay.
    """
    usable = mask & (depth > 0)
    filled = np.where(usable, depth, 0).astype(np.float32)
    counts = cv2.boxFilter(usable.astype(np.float32), -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    sums = cv2.boxFilter(filled, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    local_mean = sums / np.maximum(counts, 1)
    return usable & (np.abs(depth - local_mean) > np.maximum(0.01, 0.015 * depth))


def _back_project(depth: np.ndarray, keep: np.ndarray, intrinsics: Intrinsics, u0: int, v0: int) -> np.ndarray:
    vs, us = np.nonzero(keep)
    z = depth[vs, us].astype(np.float64)
    x = (us + u0 - intrinsics.cx) * z / intrinsics.fx
    y = (vs + v0 - intrinsics.cy) * z / intrinsics.fy
    return np.column_stack((x, y, z))


def _support_plane(depth, component, intrinsics, u0, v0, config: GraspConfig) -> _Plane | None:
    """RANSAC plane through the depth in a ring around the object, refined by least squares."""
    inner, outer = config.support_ring_px
    # Distance of every pixel to the object, in one pass (cheaper than two large dilations).
    distance = cv2.distanceTransform((~component).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ring = (distance > inner) & (distance <= outer) & (depth > 0)
    if ring.sum() < config.min_valid_points:
        return None
    points = _back_project(depth, ring, intrinsics, u0, v0)
    rng = np.random.default_rng(0)
    sample = points if len(points) <= RANSAC_MAX_POINTS else points[rng.integers(0, len(points), RANSAC_MAX_POINTS)]
    triples = sample[rng.integers(0, len(sample), size=(RANSAC_ITERATIONS, 3))]
    normals = np.cross(triples[:, 1] - triples[:, 0], triples[:, 2] - triples[:, 0])
    norms = np.linalg.norm(normals, axis=1)
    ok = norms > 1e-12
    if not ok.any():
        return None
    normals, anchors = normals[ok] / norms[ok, None], triples[ok, 0]
    threshold = 0.004 + 0.005 * float(np.median(sample[:, 2]))
    distances = np.abs(sample @ normals.T - np.einsum("ij,ij->i", anchors, normals))  # (points, hypotheses)
    best = int(np.argmax((distances < threshold).sum(axis=0)))
    inliers = np.abs((points - anchors[best]) @ normals[best]) < threshold
    if inliers.sum() < max(config.min_valid_points, RANSAC_MIN_INLIER_FRACTION * len(points)):
        return None
    chosen = points[inliers]
    center = chosen.mean(axis=0)
    centred = chosen - center
    normal = np.linalg.eigh(centred.T @ centred)[1][:, 0]  # least-squares normal: smallest eigenvector
    if normal @ center > 0:  # point it at the camera (the origin)
        normal = -normal
    residual = centred @ normal
    return _Plane(center, normal, float(np.sqrt(np.mean(residual ** 2))))


def _plane_basis(normal: np.ndarray) -> np.ndarray:
    """Two unit vectors spanning the plane orthogonal to ``normal`` (rows of a (2, 3) array)."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    first = np.cross(normal, helper)
    first /= np.linalg.norm(first)
    return np.stack([first, np.cross(normal, first)])
