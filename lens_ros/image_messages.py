"""sensor_msgs/Image <-> numpy without ROS: the pixel layout rules (encoding, step, is_bigendian);
sensor_msgs/CompressedImage -> numpy as image_transport's compressed plugin writes it.

Duck-typed: ``msg`` is anything with the fields of sensor_msgs/Image, an rclpy message in the
node or a rosbags message when a trainer reads recorded episodes on a machine without ROS. No
cv_bridge: PyPI's cv-bridge is ROS 1's and breaks with numpy 2. Images are read as strided views
of ``msg.data`` wherever the layout allows, so reading a frame costs no copy until the consumer
needs one. Compressed images (JPEG, PNG, TIFF) are decoded with OpenCV after their header's
size has been checked. Bad images raise ``ImageConversionError``, an ``InvalidInputError`` (hence a
``ValueError``), whose message names the problem.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from lens_ros.images import InvalidInputError, check_image_size, to_rgb8


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


# -- sensor_msgs/CompressedImage ------------------------------------------------------------------
# What image_transport's "compressed" plugin (compressed_image_transport) writes in ``format``:
# "<raw encoding>; <codec> compressed <what was encoded>", e.g. "rgb8; jpeg compressed bgr8",
# "bgra8; png compressed bgr8" (alpha dropped), "mono8; jpeg compressed mono8", "mono16; png
# compressed " (16-bit PNG; trailing space), "rgb8; tiff compressed " (pixels encoded as they
# were). Publishers from before Dec 2012 wrote "rgb8; jpeg compressed" after converting colour to
# rgb8; other publishers write the bare codec name ("jpeg", "png"), as the message's comment asks.
# Colour images are read with every colour encoding the raw path takes, plus the 16-bit ones the
# PNG and TIFF codecs carry; depth encodings are refused as they are for raw colour images.
COMPRESSED_COLOR_ENCODINGS = COLOR_ENCODINGS + ("rgb16", "bgr16", "rgba16", "bgra16")
COMPRESSED_CODECS = ("jpeg", "png", "tiff")
_BARE_FORMATS = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png", "tiff": "tiff", "tif": "tiff"}
# The "<what was encoded>" words the plugin writes: colour converted to bgr8/bgr16 (the file then
# holds true colours), grey converted to mono8 (JPEG), or nothing (encoded as it was).
_ENCODED_AS = ("bgr8", "bgr16", "mono8", "")
# Decompression-bomb guard: a compressed image is refused before decoding when its header declares
# more pixels than this (8K UHD is 33.2 Mpx). Decoded, it is at most 8 bytes a pixel (16-bit BGRA).
# OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, 2^30 px by default) is process-wide, read once
# from the environment, and far above what a node should allocate for one frame.
DEFAULT_MAX_DECODED_PIXELS = 40_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
_BIGTIFF_SIGNATURES = (b"II+\x00", b"MM\x00+")
# JPEG frame headers (SOF0-SOF15 without DHT C4, JPG C8 and DAC CC): they carry the image size.
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_FILL = re.compile(rb"\xff+")  # a marker is 0xFF, any number of 0xFF fill bytes, then its code
# Real files have a few dozen segments before the first scan (APPn, DQT, SOF, DHT, DRI, COM); an
# ICC profile split over APP2 segments adds at most 255.
_JPEG_MAX_MARKERS = 1024


@dataclass(frozen=True)
class CompressedFormat:
    """What a CompressedImage's ``format`` says about its payload."""

    codec: str  # "jpeg", "png" or "tiff"
    encoding: str | None  # the raw image's encoding ("rgb8"); None for a bare "jpeg" / "png"
    bgr: bool  # whether OpenCV decodes the colour channels in BGR order (the file holds true colours)


def parse_compressed_format(text: str) -> CompressedFormat:
    """Parse a sensor_msgs/CompressedImage ``format`` (see the table above) or raise
    ``ImageConversionError`` naming what is not supported."""
    stripped = text.strip()
    if "compressedDepth" in stripped:  # compressed_depth_image_transport: its own header, then PNG or RVL
        raise ImageConversionError(
            f"compressed format {text!r} is compressed_depth_image_transport's depth format, which is not "
            "supported: subscribe to the raw depth image (or republish it raw with image_transport)")
    if ";" not in stripped:
        codec = _BARE_FORMATS.get(stripped.lower())
        if codec is None:
            raise _unsupported_format(text)
        # Any standard encoder writes true colours, which OpenCV decodes as BGR.
        return CompressedFormat(codec, None, bgr=True)
    encoding, _, rest = (part.strip() for part in stripped.partition(";"))
    words = rest.split()
    if len(words) not in (2, 3) or words[0] not in COMPRESSED_CODECS or words[1] != "compressed":
        raise _unsupported_format(text)
    codec, encoded_as = words[0], (words[2] if len(words) == 3 else "")
    if encoded_as not in _ENCODED_AS:
        raise ImageConversionError(f"compressed format {text!r}: unknown encoded form {encoded_as!r} "
                                   f"(known: {', '.join(repr(e) for e in _ENCODED_AS)})")
    if encoding not in COMPRESSED_COLOR_ENCODINGS:
        raise ImageConversionError(f"compressed format {text!r}: "
                                   f"{_unsupported(encoding, COMPRESSED_COLOR_ENCODINGS, 'colour')}")
    if encoded_as.startswith("bgr"):  # converted to bgr8/bgr16 before encoding: true colours
        bgr = True
    elif codec == "tiff":  # encoded as it was: the channels come back in the raw encoding's order
        bgr = encoding.startswith("bgr")
    else:  # "rgb8; jpeg compressed" (before Dec 2012): converted to rgb8 first, so decoded as RGB
        bgr = False
    return CompressedFormat(codec, encoding, bgr)


def _unsupported_format(text: str) -> ImageConversionError:
    codecs, targets = "|".join(COMPRESSED_CODECS), "|".join(e for e in _ENCODED_AS if e)
    return ImageConversionError(
        f"unsupported compressed format {text!r} (supported: {', '.join(map(repr, COMPRESSED_CODECS))}, or "
        f"image_transport's '<encoding>; <{codecs}> compressed [{targets}]')")


def compressed_image_size(data: bytes, codec: str) -> tuple[int, int]:
    """(height, width) that the ``codec`` payload ``data`` declares in its header, read without
    decoding; ``ImageConversionError`` when the data is not of that codec or its header is cut."""
    if codec == "png":
        return _png_size(data)
    if codec == "jpeg":
        return _jpeg_size(data)
    if codec == "tiff":
        return _tiff_size(data)
    raise ImageConversionError(f"unsupported codec {codec!r} (supported: {', '.join(COMPRESSED_CODECS)})")


def _not_codec(data: bytes, codec: str) -> ImageConversionError:
    return ImageConversionError(f"data is not {codec.upper()} (it starts with {data[:8].hex(' ')!r})")


def _png_size(data: bytes) -> tuple[int, int]:
    if not data.startswith(_PNG_SIGNATURE):
        raise _not_codec(data, "png")
    # The IHDR chunk comes first (the PNG specification and libpng insist): length, "IHDR", width, height.
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageConversionError(f"PNG data is truncated or corrupt: no IHDR header ({len(data)} bytes)")
    width, height = struct.unpack_from(">II", data, 16)
    return height, width


def _jpeg_segments(data: bytes):
    """(marker, offset) of each marker segment of a JPEG up to and including its first scan (SOS).

    The image size is in the first frame header (libjpeg refuses a second one). Segments are
    stepped over by their lengths, so a thumbnail inside an EXIF segment is never taken for it.
    Runs of fill bytes are skipped at C speed and the markers are counted, so that crafted data
    cannot keep this Python loop busy.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        raise _not_codec(data, "jpeg")
    truncated = ImageConversionError(f"JPEG data is truncated ({len(data)} bytes): it ends before its first scan")
    offset = 2
    for _ in range(_JPEG_MAX_MARKERS):
        fill = _JPEG_FILL.match(data, offset)
        if fill is None:
            if offset >= len(data):
                raise truncated
            raise ImageConversionError(f"JPEG data is corrupt: no marker at byte {offset}")
        offset = fill.end() - 1  # the last 0xFF: the marker's own
        if offset + 4 > len(data):  # 0xFF, the marker's code, a segment length
            raise truncated
        marker = data[offset + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            offset += 2
            continue
        yield marker, offset
        if marker in (_JPEG_SOS, _JPEG_EOI):
            return
        (length,) = struct.unpack_from(">H", data, offset + 2)
        if length < 2:
            raise ImageConversionError(f"JPEG data is corrupt: segment length {length} at byte {offset}")
        offset += 2 + length
    raise ImageConversionError(f"JPEG data is corrupt: more than {_JPEG_MAX_MARKERS} markers before its first scan")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    size = None
    for marker, offset in _jpeg_segments(data):
        if marker in _JPEG_SOF_MARKERS and size is None:
            if offset + 9 > len(data):
                break
            size = struct.unpack_from(">HH", data, offset + 5)  # after length and precision: Y, X
        elif marker == _JPEG_SOS:
            if size is None:
                break
            # OpenCV 5 refuses a JPEG that ends early, but OpenCV 4 (Ubuntu's python3-opencv) decodes
            # it with a warning and fills the rest grey. After the first scan 0xFF is byte-stuffed,
            # so the end-of-image marker there is the real one.
            if data.find(b"\xff\xd9", offset) < 0:
                raise ImageConversionError(f"JPEG data is truncated ({len(data)} bytes): no end-of-image marker")
            return size
        elif marker == _JPEG_EOI:
            break
    raise ImageConversionError("JPEG data has no frame header before its first scan: truncated or corrupt")


def _tiff_size(data: bytes) -> tuple[int, int]:
    if data[:4] in _BIGTIFF_SIGNATURES:  # 64-bit offsets; image_transport (cv::imencode) never writes it
        raise ImageConversionError("BigTIFF data is not supported (only classic TIFF, as image_transport writes)")
    if data[:4] not in _TIFF_SIGNATURES:
        raise _not_codec(data, "tiff")
    order = "<" if data[:2] == b"II" else ">"
    # The first image file directory (the page OpenCV decodes): 12-byte entries of tag, type,
    # count, value; ImageWidth (256) and ImageLength (257) are SHORT (3) or LONG (4).
    try:
        (directory,) = struct.unpack_from(order + "I", data, 4)
        (entries,) = struct.unpack_from(order + "H", data, directory)
        values = {}
        for index in range(entries):
            tag, kind = struct.unpack_from(order + "HH", data, directory + 2 + 12 * index)
            if tag in (256, 257) and kind in (3, 4):
                value_format = order + ("H" if kind == 3 else "I")
                (values[tag],) = struct.unpack_from(value_format, data, directory + 10 + 12 * index)
                if len(values) == 2:
                    break
    except struct.error:
        raise ImageConversionError(f"TIFF data is truncated or corrupt ({len(data)} bytes)") from None
    if 256 not in values or 257 not in values:
        raise ImageConversionError("TIFF data has no image width or length in its first directory")
    return values[257], values[256]


def compressed_image_to_rgb(msg, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> np.ndarray:
    """A sensor_msgs/CompressedImage (anything with its ``format`` and ``data``) as the pipeline's
    uint8 (H, W, 3) RGB, the array ``color_image_to_rgb`` gives for the raw image.

    ``format`` is read as image_transport's compressed plugin writes it (``parse_compressed_format``);
    JPEG, PNG and TIFF payloads are decoded by OpenCV as they are (no EXIF rotation): BGR becomes
    RGB, grey is repeated, alpha is dropped, 16-bit values are scaled to 8 bits as for raw images.
    The size in the payload's header is checked before decoding: more than ``max_pixels`` pixels,
    a side under the pipeline's minimum or too wide an aspect ratio is refused with nothing decoded.
    Raises ``ImageConversionError`` (or the ``InvalidInputError`` of ``to_rgb8`` for sizes) when the
    format is not supported, the data is empty, not of the format's codec, truncated or corrupt.
    """
    described = parse_compressed_format(msg.format)
    data = _bytes_of(msg.data).tobytes()  # bytes: the header readers index and search it
    if not data:
        raise ImageConversionError(f"compressed image data is empty (format {msg.format!r})")
    height, width = compressed_image_size(data, described.codec)
    if height * width > max_pixels:
        raise ImageConversionError(
            f"compressed image is {width}x{height} px ({height * width} pixels), over the limit of {max_pixels}: "
            "refused before decoding")
    check_image_size(height, width)
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageConversionError(f"{described.codec.upper()} data could not be decoded: {exc}") from None
    if decoded is None:
        raise ImageConversionError(f"{described.codec.upper()} data ({len(data)} bytes) could not be decoded: "
                                   "truncated or corrupt")
    if decoded.shape[:2] != (height, width):  # the size checks above were made on the header's size
        raise ImageConversionError(f"{described.codec.upper()} data decoded to {decoded.shape[1]}x{decoded.shape[0]} "
                                   f"px but its header says {width}x{height}")
    return to_rgb8(decoded, bgr=described.bgr)
