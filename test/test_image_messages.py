"""lens_ros.image_messages without ROS: image_transport's compressed formats and the header sizes
read before decoding. Messages with real payloads (cv2.imencode) in real sensor_msgs messages are
tested in test_conversions.py; here, a rosbags message stands for what a trainer reads from a bag.
"""

import struct

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from lens_ros.image_messages import (
    CompressedFormat,
    ImageConversionError,
    compressed_image_size,
    compressed_image_to_rgb,
    parse_compressed_format,
)


# Every form compressed_image_transport writes (compressed_publisher.cpp), the pre-Dec-2012 one,
# and the bare codec names of other publishers.
@pytest.mark.parametrize("text, expected", [
    ("rgb8; jpeg compressed bgr8", CompressedFormat("jpeg", "rgb8", bgr=True)),
    ("bgra8; jpeg compressed bgr8", CompressedFormat("jpeg", "bgra8", bgr=True)),
    ("mono8; jpeg compressed mono8", CompressedFormat("jpeg", "mono8", bgr=False)),
    ("mono16; jpeg compressed mono8", CompressedFormat("jpeg", "mono16", bgr=False)),
    ("mono8; jpeg compressed ", CompressedFormat("jpeg", "mono8", bgr=False)),  # noetic: no target for grey
    ("bgr8; png compressed bgr8", CompressedFormat("png", "bgr8", bgr=True)),
    ("rgb16; png compressed bgr16", CompressedFormat("png", "rgb16", bgr=True)),
    ("mono16; png compressed ", CompressedFormat("png", "mono16", bgr=False)),
    ("rgb8; tiff compressed ", CompressedFormat("tiff", "rgb8", bgr=False)),  # encoded as it was
    ("bgr8; tiff compressed ", CompressedFormat("tiff", "bgr8", bgr=True)),
    ("rgb8; jpeg compressed", CompressedFormat("jpeg", "rgb8", bgr=False)),  # before Dec 2012: rgb8 encoded
    ("jpeg", CompressedFormat("jpeg", None, bgr=True)),
    (" PNG ", CompressedFormat("png", None, bgr=True)),
    ("tif", CompressedFormat("tiff", None, bgr=True)),
])
def test_formats(text, expected):
    assert parse_compressed_format(text) == expected


@pytest.mark.parametrize("text, match", [
    ("32FC1; tiff compressed ", r"unsupported encoding '32FC1' for a colour image"),
    ("8UC1; png compressed ", r"unsupported encoding '8UC1' for a colour image"),
    ("32FC1; compressedDepth rvl", r"compressed_depth_image_transport's depth format"),
    ("16UC1; compressedDepth", r"compressed_depth_image_transport's depth format"),
    ("rgb8; jpeg", r"^unsupported compressed format"),
    ("rgb8; jpeg compressed bgr8 extra", r"^unsupported compressed format"),
    ("rgb8; qoi compressed bgr8", r"^unsupported compressed format"),
    ("webp", r"^unsupported compressed format 'webp'"),
])
def test_unsupported_formats(text, match):
    with pytest.raises(ImageConversionError, match=match):
        parse_compressed_format(text)


@pytest.mark.parametrize("codec, extension", [("jpeg", ".jpg"), ("png", ".png"), ("tiff", ".tiff")])
@pytest.mark.parametrize("shape", [(30, 50, 3), (50, 30), (29, 31, 4)])
def test_header_sizes_are_those_opencv_decodes(codec, extension, shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    if codec == "jpeg" and len(shape) == 3 and shape[2] == 4:
        pixels = pixels[:, :, :3].copy()  # JPEG has no alpha
    data = cv2.imencode(extension, pixels)[1].tobytes()
    assert compressed_image_size(data, codec) == shape[:2]
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2] == shape[:2]


def test_a_jpeg_thumbnail_in_exif_is_not_taken_for_the_image():
    """EXIF (APP1) may hold a whole JPEG thumbnail, frame header included: the size is the main
    frame's, as libjpeg reads it."""
    main = cv2.imencode(".jpg", np.full((60, 90, 3), 100, np.uint8))[1].tobytes()
    thumbnail = cv2.imencode(".jpg", np.full((8, 12, 3), 200, np.uint8))[1].tobytes()
    payload = b"Exif\x00\x00" + thumbnail
    with_exif = main[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + main[2:]
    assert compressed_image_size(with_exif, "jpeg") == (60, 90)
    assert cv2.imdecode(np.frombuffer(with_exif, np.uint8), cv2.IMREAD_UNCHANGED).shape == (60, 90, 3)


def test_big_endian_tiff_header():
    """cv2 writes little-endian TIFF; other writers use "MM" (a header built by hand: width as
    SHORT, length as LONG)."""
    entries = struct.pack(">HHIHH", 256, 3, 1, 300, 0) + struct.pack(">HHII", 257, 4, 1, 200)
    data = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + b"\x00" * 4
    assert compressed_image_size(data, "tiff") == (200, 300)


@pytest.mark.parametrize("data, codec, match", [
    (b"II+\x00" + bytes(12), "tiff", r"^BigTIFF data is not supported"),
    (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0), "tiff", r"^TIFF data has no image width or length"),
    (b"\xff\xd8\xff\xd9", "jpeg", r"^JPEG data is truncated \(4 bytes\): it ends before its first scan$"),
    (b"\xff\xd8\xff\xe0\x00\x01" + bytes(8), "jpeg", r"^JPEG data is corrupt: segment length 1 at byte 2$"),
    (b"\xff\xd8\xff\xe0\x00\x04\x00\x00\x13\x37" + bytes(8), "jpeg", r"^JPEG data is corrupt: no marker at byte 8$"),
    (b"\xff\xd8\xff\xda\x00\x02" + bytes(8), "jpeg", r"^JPEG data has no frame header before its first scan"),
    (b"\x89PNG\r\n\x1a\n" + bytes(16), "png", r"^PNG data is truncated or corrupt: no IHDR header"),
    (b"GIF89a", "gif", r"^unsupported codec 'gif'"),
])
def test_bad_headers(data, codec, match):
    with pytest.raises(ImageConversionError, match=match):
        compressed_image_size(data, codec)


def test_a_rosbags_message_decodes_without_ros():
    """Episodes are read back with rosbags, whose messages hold ``data`` as a numpy array."""
    types = get_typestore(Stores.ROS2_KILTED).types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="cam")
    rgb = np.random.default_rng(1).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    data = np.frombuffer(cv2.imencode(".png", rgb[:, :, ::-1].copy())[1].tobytes(), np.uint8)
    msg = types["sensor_msgs/msg/CompressedImage"](header=header, format="rgb8; png compressed bgr8", data=data)
    np.testing.assert_array_equal(compressed_image_to_rgb(msg), rgb)


def test_jpeg_fill_bytes_are_skipped_and_markers_are_bounded():
    """Any number of 0xFF may precede a marker (libjpeg skips them too); crafted runs of fill bytes
    or of empty markers are read in milliseconds, not one Python step per byte."""
    main = cv2.imencode(".jpg", np.full((60, 90, 3), 100, np.uint8))[1].tobytes()
    filled = main[:2] + b"\xff" * 1000 + main[2:]
    assert compressed_image_size(filled, "jpeg") == (60, 90)
    assert cv2.imdecode(np.frombuffer(filled, np.uint8), cv2.IMREAD_UNCHANGED).shape == (60, 90, 3)
    with pytest.raises(ImageConversionError, match=r"^JPEG data is truncated \(10000002 bytes\)"):
        compressed_image_size(b"\xff\xd8" + b"\xff" * 10_000_000, "jpeg")
    for marker in (b"\xff\xd0", b"\xff\xfe\x00\x02"):  # RST0 (no length), an empty comment
        with pytest.raises(ImageConversionError, match=r"^JPEG data is corrupt: more than 1024 markers before"):
            compressed_image_size(b"\xff\xd8" + marker * 2_000_000, "jpeg")
