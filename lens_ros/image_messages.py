"""sensor_msgs/Image <-> numpy without ROS: the pixel layout rules (encoding, step, is_bigendian).

Duck-typed: ``msg`` is anything with the fields of sensor_msgs/Image, an rclpy message in the
node or a rosbags message when a trainer reads recorded episodes on a machine without ROS. No
cv_bridge: PyPI's cv-bridge is ROS 1's and breaks with numpy 2. Images are read as strided views
of ``msg.data`` wherever the layout allows, so reading a frame costs no copy until the consumer
needs one. Bad images raise ``ImageConversionError``, an ``InvalidInputError`` (hence a
``ValueError``), whose message names the problem.
"""

from __future__ import annotations

import numpy as np

from lens_ros.images import InvalidInputError, to_rgb8


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


def image_to_array(msg, copy: bool = False) -> np.ndarray:
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


def color_image_to_rgb(msg) -> np.ndarray:
    """A colour (or grayscale) image as the pipeline's uint8 (H, W, 3) RGB.

    rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8 and mono16 (scaled to 8 bits) are accepted.
    The result may share memory with ``msg.data`` (rgb8 without row padding). Images smaller
    than the pipeline's minimum are refused by ``to_rgb8`` with an ``InvalidInputError``.
    """
    if msg.encoding not in COLOR_ENCODINGS:
        raise _unsupported(msg.encoding, COLOR_ENCODINGS, "colour")
    # Validation, channel order, alpha, grayscale and 16-bit scaling all stay in to_rgb8.
    return to_rgb8(image_to_array(msg), bgr=msg.encoding in _BGR_ENCODINGS)


def depth_image_to_metres(msg) -> np.ndarray:
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
