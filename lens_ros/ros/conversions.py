"""ROS messages <-> numpy: the conversion layer of the ROS node.

``sensor_msgs/Image`` is read into numpy arrays (colour images to the uint8 RGB the pipeline
takes, depth images to float32 metres) and masks/arrays are written back into Images; a
``SegmentationResult`` becomes a ``lens_ros/Segmentation`` message.

No cv_bridge: PyPI's cv-bridge is ROS 1's and breaks with numpy 2, and the conversion is only a
matter of encoding, ``step`` and ``is_bigendian``. Everything here is vectorised numpy; images
are read as strided views of ``msg.data`` wherever the layout allows, so reading a frame costs
no copy until the consumer needs one.

Bad images raise ``ImageConversionError``, an ``InvalidInputError`` (hence a ``ValueError``),
whose message names the problem, so the node can report it and keep serving.
"""

from __future__ import annotations

import array as _array
import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, Quaternion
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from lens_ros.images import InvalidInputError, to_rgb8
from lens_ros.msg import GraspRegion, Segmentation

if TYPE_CHECKING:  # the pipeline imports torch; only result_to_segmentation needs it, lazily
    from lens_ros.pipeline import SegmentationResult


class ImageConversionError(InvalidInputError):
    """A sensor_msgs/Image (or array) that cannot be converted; the message names the problem."""


# encoding -> (channels, little-endian element dtype). The names are those of
# sensor_msgs/image_encodings.hpp; the dtype's byte order is fixed per message by is_bigendian.
_ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    "rgb8": (3, np.dtype("u1")),
    "bgr8": (3, np.dtype("u1")),
    "rgba8": (4, np.dtype("u1")),
    "bgra8": (4, np.dtype("u1")),
    "mono8": (1, np.dtype("u1")),
    "8UC1": (1, np.dtype("u1")),
    "mono16": (1, np.dtype("<u2")),
    "16UC1": (1, np.dtype("<u2")),
    "32FC1": (1, np.dtype("<f4")),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")
_BGR_ENCODINGS = ("bgr8", "bgra8")

# The attributes of lens_ros.grasp.GraspCandidate that a GraspRegion is made from.
GRASP_CANDIDATE_FIELDS = ("center_px", "angle_rad", "width_px", "length_px", "quality", "has_3d",
                          "position_m", "closing_axis", "approach_axis", "width_m", "reason")


def _unsupported(encoding: str, supported, kind: str = "") -> ImageConversionError:
    what = f" for a {kind} image" if kind else ""
    return ImageConversionError(f"unsupported encoding {encoding!r}{what} (supported: {', '.join(supported)})")


def _bytes_of(data) -> np.ndarray:
    """``msg.data`` as a flat uint8 array, sharing its memory when it exposes a buffer.

    rclpy hands over an ``array.array('B')``; users may assign bytes, a bytearray or a list.
    """
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a list of ints (no buffer protocol): one copy cannot be avoided
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def image_to_array(msg: Image, copy: bool = False) -> np.ndarray:
    """The pixels of ``msg`` as numpy, in native byte order.

    rgb8/bgr8 -> (H, W, 3) uint8, rgba8/bgra8 -> (H, W, 4) uint8, mono8/8UC1 -> (H, W) uint8,
    mono16/16UC1 -> (H, W) uint16, 32FC1 -> (H, W) float32; channel order as in the message.

    Without ``copy`` the result is a (possibly strided, possibly read-only) view of
    ``msg.data`` whenever no byte swap is needed; pass ``copy=True`` for an array of your own.
    """
    encoding = msg.encoding
    if encoding not in _ENCODINGS:
        raise _unsupported(encoding, SUPPORTED_ENCODINGS)
    channels, element = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image is empty ({width}x{height})")
    pixel_bytes = channels * element.itemsize
    if step < width * pixel_bytes:
        raise ImageConversionError(f"step {step} is smaller than width {width} x {pixel_bytes} bytes")
    raw = _bytes_of(msg.data)
    if raw.size < step * height:  # trailing bytes beyond the last row are allowed
        raise ImageConversionError(
            f"data has {raw.size} bytes, expected step {step} x height {height} = {step * height}")

    dtype = element.newbyteorder(">" if msg.is_bigendian else "<")  # no-op for 1-byte elements
    if channels == 1:
        shape, strides = (height, width), (step, pixel_bytes)
    else:
        shape, strides = (height, width, channels), (step, pixel_bytes, element.itemsize)
    # Strides skip the row padding (step > width * bytes per pixel) without copying.
    pixels = np.ndarray(shape, dtype=dtype, buffer=raw, strides=strides)
    if not dtype.isnative:
        return pixels.astype(dtype.newbyteorder("="))  # the swap copies anyway
    return pixels.copy() if copy else pixels


def color_image_to_rgb(msg: Image) -> np.ndarray:
    """A colour (or grayscale) image as the pipeline's uint8 (H, W, 3) RGB.

    rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8 and mono16 (scaled to 8 bits) are accepted.
    The result may share memory with ``msg.data`` (rgb8 without row padding). Images smaller
    than the pipeline's minimum are refused by ``to_rgb8`` with an ``InvalidInputError``.
    """
    if msg.encoding not in COLOR_ENCODINGS:
        raise _unsupported(msg.encoding, COLOR_ENCODINGS, "colour")
    # Validation, channel order, alpha, grayscale and 16-bit scaling all stay in to_rgb8.
    return to_rgb8(image_to_array(msg), bgr=msg.encoding in _BGR_ENCODINGS)


def depth_image_to_metres(msg: Image) -> np.ndarray:
    """A depth image as float32 (H, W) metres; NaN where there is no measurement.

    16UC1/mono16 are millimetres (the OpenNI/RealSense convention) with 0 meaning no reading;
    32FC1 is metres, where drivers mark missing readings as NaN, inf or 0.
    """
    if msg.encoding not in DEPTH_ENCODINGS:
        raise _unsupported(msg.encoding, DEPTH_ENCODINGS, "depth")
    if msg.encoding == "32FC1":
        metres = image_to_array(msg, copy=True)  # our own copy: NaNs are written into it
        # NaN compares False, so one test catches NaN, -inf, negatives and 0; then +inf.
        metres[~((metres > 0) & (metres < np.inf))] = np.nan
        return metres
    millimetres = image_to_array(msg)
    # Dividing (rather than multiplying by 0.001) rounds every whole millimetre correctly.
    metres = np.divide(millimetres, np.float32(1000), dtype=np.float32)
    metres[millimetres == 0] = np.nan
    return metres


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


def grasp_to_region(grasp) -> GraspRegion:
    """A GraspRegion from a ``GraspCandidate`` (or any object with its fields).

    The pose (set only when ``has_3d``) has its x axis along the closing direction and its z
    axis along the approach direction, as GraspRegion.msg specifies.
    """
    missing = [name for name in GRASP_CANDIDATE_FIELDS if not hasattr(grasp, name)]
    if missing:
        raise TypeError(f"grasp {type(grasp).__name__} lacks the GraspCandidate fields {', '.join(missing)}")
    center_u, center_v = grasp.center_px
    region = GraspRegion(center_u=float(center_u), center_v=float(center_v), angle=float(grasp.angle_rad),
                         width_px=float(grasp.width_px), length_px=float(grasp.length_px),
                         quality=float(grasp.quality), has_3d=bool(grasp.has_3d), reason=str(grasp.reason or ""))
    if region.has_3d:
        px, py, pz = (float(v) for v in grasp.position_m)
        qx, qy, qz, qw = (float(v) for v in quaternion_from_axes(grasp.closing_axis, grasp.approach_axis))
        region.pose = Pose(position=Point(x=px, y=py, z=pz), orientation=Quaternion(x=qx, y=qy, z=qz, w=qw))
        region.width_m = float(grasp.width_m)
    return region


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
    msg.grasps = [grasp_to_region(grasp) for grasp in result.grasps]
    # Driven by the dataclass, so a stage added to StageTimings without its message field
    # fails here (AttributeError on the message's slots) instead of being dropped silently.
    for stage in dataclasses.fields(StageTimings):
        setattr(msg, f"latency_{stage.name}", float(getattr(result.timings, stage.name)))
    return msg
