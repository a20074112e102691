"""ROS messages <-> numpy: the conversion layer of the ROS node.

``sensor_msgs/Image`` is read into numpy arrays (colour images to the uint8 RGB the pipeline
takes, depth images to float32 metres; ``sensor_msgs/CompressedImage`` colour images too; the
ROS-free rules live in ``lens_ros.image_messages`` and are re-exported here) and masks/arrays
are written back into Images; a ``SegmentationResult`` becomes a ``lens_ros/Segmentation``
message and, where vision_msgs is installed, a ``vision_msgs/Detection2DArray``.

Bad images raise ``ImageConversionError``, an ``InvalidInputError`` (hence a ``ValueError``),
whose message names the problem, so the node can report it and keep serving.
"""

from __future__ import annotations

import array as _array
import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, Quaternion
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from lens_ros.image_messages import (  # noqa: F401 (re-exported: the node's conversions in one place)
    _ENCODINGS,
    COLOR_ENCODINGS,
    COMPRESSED_COLOR_ENCODINGS,
    DEFAULT_MAX_DECODED_PIXELS,
    DEPTH_ENCODINGS,
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    _unsupported,
    color_image_to_rgb,
    compressed_image_to_rgb,
    depth_image_to_metres,
    image_to_array,
    parse_compressed_format,
)
from lens_ros.msg import GraspRegion, Segmentation

if TYPE_CHECKING:  # the pipeline imports torch; only result_to_segmentation needs it, lazily
    from lens_ros.pipeline import SegmentationResult


# The attributes of lens_ros.grasp.GraspCandidate that a GraspRegion is made from.
GRASP_CANDIDATE_FIELDS = ("center_px", "angle_rad", "width_px", "length_px", "quality", "has_3d",
                          "position_m", "closing_axis", "approach_axis", "width_m", "reason")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _copy_header(header: Header | None) -> Header:
    """A fresh Header equal to ``header``: messages built here never alias the caller's."""
    if header is None:
        return Header()
    return Header(stamp=Time(sec=header.stamp.sec, nanosec=header.stamp.nanosec), frame_id=header.frame_id)


def array_to_image(array: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """An Image holding ``array`` (little-endian, rows unpadded).

    The array must match the encoding: (H, W, 3) or (H, W, 4) uint8 for rgb8/bgr8 or
    rgba8/bgra8, (H, W) uint8 for mono8/8UC1, (H, W) uint16 for mono16/16UC1 and (H, W) float32
    for 32FC1; otherwise ``ImageConversionError``. A 0x0 array gives an empty Image (the
    interfaces' way of saying "no image").
    """
    if encoding not in _ENCODINGS:
        raise _unsupported(encoding, SUPPORTED_ENCODINGS)
    if not isinstance(array, np.ndarray):
        raise ImageConversionError(f"array must be a numpy array, got {type(array).__name__}")
    channels, element = _ENCODINGS[encoding]
    expected = "(H, W)" if channels == 1 else f"(H, W, {channels})"
    shape_ok = array.ndim == 2 if channels == 1 else (array.ndim == 3 and array.shape[2] == channels)
    # Kind and size, not equality: a big-endian uint16 array is still a valid 16UC1 image.
    dtype_ok = array.dtype.kind == element.kind and array.dtype.itemsize == element.itemsize
    if not (shape_ok and dtype_ok):
        raise ImageConversionError(f"encoding {encoding!r} needs a {expected} {element.name} array, "
                                   f"got shape {array.shape} {array.dtype.name}")
    # One pass: contiguous rows in little-endian order (no copy when it already is).
    pixels = np.ascontiguousarray(array, dtype=element)
    data = _array.array("B")
    # Filling an array.array directly is one copy; assigning bytes makes the message copy again
    # (and, with ROS_PYTHON_CHECK_FIELDS=1, check every byte in a Python loop).
    data.frombytes(pixels.reshape(-1).view(np.uint8))
    height, width = array.shape[:2]
    return Image(header=_copy_header(header), height=height, width=width, encoding=encoding,
                 is_bigendian=0, step=width * channels * element.itemsize, data=data)


def mask_to_image(mask: np.ndarray, header: Header | None = None) -> Image:
    """A mono8 Image of ``mask``: 255 where the object is (True / nonzero), 0 elsewhere."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ImageConversionError(f"mask must be a 2-D (H, W) array, got shape {mask.shape}")
    selected = mask if mask.dtype == np.bool_ else mask != 0
    # numpy stores bools as bytes 0/1: scaling that byte view is ~50x faster than np.where.
    return array_to_image(selected.view(np.uint8) * np.uint8(255), "mono8", header)


def stamp_to_seconds(stamp) -> float:
    """A builtin_interfaces/Time (anything with ``sec`` and ``nanosec``) in seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def seconds_between(a, b) -> float:
    """Seconds from stamp ``a`` to stamp ``b`` (positive when ``b`` is later).

    Computed in integer nanoseconds first: epoch seconds as floats would lose sub-microsecond
    differences.
    """
    return ((b.sec - a.sec) * 1_000_000_000 + (b.nanosec - a.nanosec)) / 1e9


def _quaternion_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """(x, y, z, w) of a proper rotation matrix (Shepperd's method: divide by the largest term)."""
    m = rotation
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)  # 4 w
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])  # 4 x
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])  # 4 y
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])  # 4 z
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    quaternion = np.asarray(q, dtype=np.float64)
    quaternion /= np.linalg.norm(quaternion)
    return -quaternion if quaternion[3] < 0 else quaternion  # one canonical sign: w >= 0


def quaternion_from_axes(x_axis, z_axis) -> np.ndarray:
    """Quaternion (x, y, z, w) of the frame whose x axis is ``x_axis`` and z axis ``z_axis``.

    The rotation matrix has columns x, y = z × x, z. ``z_axis`` is kept exactly (normalised);
    any component of ``x_axis`` along it is removed first, so nearly orthogonal inputs still
    give a proper rotation. Raises ValueError for zero-length or parallel axes.
    """
    x = np.asarray(x_axis, dtype=np.float64).reshape(3)
    z = np.asarray(z_axis, dtype=np.float64).reshape(3)
    x_norm, z_norm = np.linalg.norm(x), np.linalg.norm(z)
    if not (np.isfinite(x_norm) and np.isfinite(z_norm)) or x_norm == 0 or z_norm == 0:
        raise ValueError(f"axes must be finite and non-zero, got x_axis={x.tolist()} z_axis={z.tolist()}")
    z = z / z_norm
    x = x - (x @ z) * z
    remaining = np.linalg.norm(x)
    if remaining < 1e-6 * x_norm:
        raise ValueError(f"x_axis {x_axis!r} is parallel to z_axis {z_axis!r}")
    x /= remaining
    y = np.cross(z, x)
    return _quaternion_from_matrix(np.column_stack((x, y, z)))


class NonFiniteGraspError(ValueError):
    """A grasp whose image-plane numbers are not finite float32s: nothing of it can be published."""


def _require_grasp_fields(grasp) -> None:
    missing = [name for name in GRASP_CANDIDATE_FIELDS if not hasattr(grasp, name)]
    if missing:
        raise TypeError(f"grasp {type(grasp).__name__} lacks the GraspCandidate fields {', '.join(missing)}")


def _finite_float32(value: float) -> bool:
    """Finite once stored in a float32 message field."""
    return np.isfinite(value) and abs(value) <= _FLOAT32_MAX


def _image_plane_numbers(grasp) -> list[float]:
    center_u, center_v = grasp.center_px
    return [float(v) for v in (center_u, center_v, grasp.angle_rad, grasp.width_px, grasp.length_px, grasp.quality)]


def grasp_to_region(grasp) -> GraspRegion:
    """A GraspRegion from a ``GraspCandidate`` (or any object with its fields).

    The pose (set only when ``has_3d``) has its x axis along the closing direction and its z
    axis along the approach direction, as GraspRegion.msg specifies. A 3-D part that cannot be
    published (a non-finite position, a width_m that is not a finite float32, axes that give no
    rotation) is dropped: the region goes out 2-D, its reason says why, and a planner never
    receives a NaN pose. Non-finite image-plane numbers leave nothing to publish: NonFiniteGraspError
    (a ValueError).
    """
    _require_grasp_fields(grasp)
    numbers = _image_plane_numbers(grasp)
    if not all(_finite_float32(v) for v in numbers):
        raise NonFiniteGraspError(f"grasp has non-finite image-plane numbers: center_px={tuple(grasp.center_px)} "
                         f"angle_rad={grasp.angle_rad} width_px={grasp.width_px} length_px={grasp.length_px} "
                         f"quality={grasp.quality}")
    center_u, center_v, angle, width_px, length_px, quality = numbers
    region = GraspRegion(center_u=center_u, center_v=center_v, angle=angle, width_px=width_px, length_px=length_px,
                         quality=quality, has_3d=False, reason=str(grasp.reason or ""))
    if grasp.has_3d:
        try:
            region.pose, region.width_m = _pose_and_width(grasp)
            region.has_3d = True
        except ValueError as exc:
            region.reason = "; ".join(part for part in (region.reason, f"3-D grasp dropped: {exc}") if part)
    return region


def _pose_and_width(grasp) -> tuple[Pose, float]:
    """The 3-D part of a region; ValueError when any of it is not finite in the message."""
    position = tuple(float(v) for v in grasp.position_m)
    if not all(np.isfinite(position)):
        raise ValueError(f"position_m {position} is not finite")
    width = float(grasp.width_m)
    if not _finite_float32(width):
        raise ValueError(f"width_m {width:g} is not a finite float32")
    qx, qy, qz, qw = (float(v) for v in quaternion_from_axes(grasp.closing_axis, grasp.approach_axis))
    px, py, pz = position
    return Pose(position=Point(x=px, y=py, z=pz), orientation=Quaternion(x=qx, y=qy, z=qz, w=qw)), width


def result_to_segmentation(result: SegmentationResult, header: Header | None, request_id: int) -> Segmentation:
    """The Segmentation message for ``result``, stamped with ``header`` (the segmented image's).

    The mask is a mono8 Image with the same header (an empty 0x0 Image when the result has no
    mask); the box is zeros when the result has none; ``latency_<stage>`` is
    ``result.timings.<stage>`` for every StageTimings field.
    """
    from lens_ros.pipeline import StageTimings  # lazy: the pipeline imports torch

    if request_id < 0:
        raise ValueError(f"request_id must be >= 0 (it is a uint64), got {request_id}")
    msg = Segmentation(header=_copy_header(header), request_id=int(request_id), command=result.command,
                       reasoning=result.reasoning, found=bool(result.found), score=float(result.score),
                       generated_tokens=int(result.generated_tokens), model=result.model, error=result.error)
    box = (0.0, 0.0, 0.0, 0.0) if result.box is None else result.box
    msg.box = np.asarray(box, dtype=np.float32).reshape(4)
    mask = result.mask if result.mask is not None else np.zeros((0, 0), dtype=bool)
    msg.mask = mask_to_image(mask, header)
    # A grasp whose image-plane numbers are not finite has nothing usable to publish: left out
    # (lens_ros.grasp never returns one; this keeps NaN off the wire whatever produced the result).
    # (A wrong type is a bug: grasp_to_region's TypeError goes through.)
    regions = []
    for grasp in result.grasps:
        try:
            regions.append(grasp_to_region(grasp))
        except NonFiniteGraspError:
            continue
    msg.grasps = regions
    # Driven by the dataclass, so a stage added to StageTimings without its message field
    # fails here (AttributeError on the message's slots) instead of being dropped silently.
    for stage in dataclasses.fields(StageTimings):
        setattr(msg, f"latency_{stage.name}", float(getattr(result.timings, stage.name)))
    return msg


# -- vision_msgs -----------------------------------------------------------------------------------
# vision_msgs is an optional dependency (not a PyPI wheel; many robots have it, some do not), so it
# is imported only when detections are built.
VISION_MSGS_MISSING = ("vision_msgs is not installed: install ros-<distro>-vision-msgs (apt) or the "
                       "vision_msgs wheel to publish vision_msgs/Detection2DArray")


@functools.cache
def vision_msgs_available() -> bool:
    """Whether ``vision_msgs.msg`` imports (checked once per process)."""
    try:
        import vision_msgs.msg  # noqa: F401
    except ImportError:
        return False
    return True


def result_to_detections(result: SegmentationResult, header: Header | None, request_id: int):
    """A vision_msgs/Detection2DArray for ``result``, stamped with ``header`` (the segmented image's).

    Found: one Detection2D whose bbox is the result's box (centre and size in the image's pixels,
    the box's own continuous coordinates: the image's top-left corner is 0, 0), id the request id
    and one hypothesis: class_id the command, score the result's score (SAM2's predicted IoU).
    Not found (or failed): no detections. The hypothesis' pose is left zero: the object's 3-D pose
    is not known (grasp poses go out on their own topic). Raises ``ModuleNotFoundError`` when
    vision_msgs is absent and ValueError for a found result with a missing or non-finite box.
    """
    try:
        from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
    except ImportError as exc:
        raise ModuleNotFoundError(VISION_MSGS_MISSING, name="vision_msgs") from exc
    if request_id < 0:
        raise ValueError(f"request_id must be >= 0, got {request_id}")
    detections = Detection2DArray(header=_copy_header(header))
    if not result.found:
        return detections
    box = None if result.box is None else tuple(float(v) for v in result.box)
    if box is None or len(box) != 4 or not all(np.isfinite(box)):
        raise ValueError(f"a found result needs a finite box (x1, y1, x2, y2), got {result.box!r}")
    x1, y1, x2, y2 = box
    detection = Detection2D(header=_copy_header(header), id=str(int(request_id)))
    _set_bbox_center(detection.bbox.center, (x1 + x2) / 2, (y1 + y2) / 2)
    detection.bbox.size_x, detection.bbox.size_y = x2 - x1, y2 - y1
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = result.command, float(result.score)
    detection.results = [hypothesis]
    detections.detections = [detection]
    return detections


def _set_bbox_center(center, x: float, y: float) -> None:
    """Set a BoundingBox2D centre in either layout: vision_msgs/Pose2D (position.x/y; vision_msgs
    4.x: Humble, Iron, Jazzy, Kilted, Rolling) or geometry_msgs/Pose2D (x, y; 3.x: Galactic)."""
    target = center.position if hasattr(center, "position") else center
    target.x, target.y = x, y
