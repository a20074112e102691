"""lens_ros.ros.conversions: sensor_msgs/Image <-> numpy, CompressedImage -> numpy and
SegmentationResult -> Segmentation (and -> vision_msgs/Detection2DArray).

Real sensor_msgs / lens_ros messages throughout (no mocks); messages are also put through
rclpy's CDR serialisation to show that what is built here is what goes on the wire.
"""

import array
import dataclasses

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose2D
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from lens_ros.images import InvalidInputError, to_rgb8
from lens_ros.msg import GraspRegion, Segmentation
from lens_ros.pipeline import SegmentationResult, StageTimings
from lens_ros.ros.conversions import (
    COLOR_ENCODINGS,
    DEPTH_ENCODINGS,
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    DEFAULT_MAX_DECODED_PIXELS,
    VISION_MSGS_MISSING,
    _set_bbox_center,
    array_to_image,
    color_image_to_rgb,
    compressed_image_to_rgb,
    depth_image_to_metres,
    image_to_array,
    mask_to_image,
    quaternion_from_axes,
    result_to_detections,
    result_to_segmentation,
    seconds_between,
    stamp_to_seconds,
    vision_msgs_available,
)

H, W = 32, 40  # at least the pipeline's 28 px minimum, so colour images pass to_rgb8

# encoding -> (numpy shape suffix, dtype)
LAYOUTS = {
    "rgb8": ((3,), np.uint8), "bgr8": ((3,), np.uint8), "rgba8": ((4,), np.uint8),
    "bgra8": ((4,), np.uint8), "mono8": ((), np.uint8), "8UC1": ((), np.uint8),
    "mono16": ((), np.uint16), "16UC1": ((), np.uint16), "32FC1": ((), np.float32),
}


def random_array(encoding, rng, height=H, width=W):
    suffix, dtype = LAYOUTS[encoding]
    shape = (height, width) + suffix
    if dtype == np.float32:
        values = rng.normal(scale=10.0, size=shape).astype(np.float32)
        values.flat[:3] = [np.nan, np.inf, -np.inf]  # must survive the round trip bit for bit
        return values
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


def header(sec=1_700_000_000, nanosec=123_456_789, frame="camera_color_optical_frame"):
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame)


def raw_image(pixels, encoding, pad=0, bigendian=False, trailing=0):
    """An Image built by hand (as a driver would), rows padded with `pad` junk bytes."""
    order = ">" if bigendian else "<"
    rows = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder(order))
    height, width = pixels.shape[:2]
    row_bytes = rows.reshape(height, -1).view(np.uint8)
    junk = np.full((height, pad), 0xAB, dtype=np.uint8)
    data = np.concatenate([row_bytes, junk], axis=1).tobytes() + b"\xcd" * trailing
    return Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                 step=row_bytes.shape[1] + pad, data=array.array("B", data))


def test_supported_encodings_are_those_tested():
    assert set(SUPPORTED_ENCODINGS) == set(LAYOUTS)
    assert set(COLOR_ENCODINGS) <= set(LAYOUTS) and set(DEPTH_ENCODINGS) <= set(LAYOUTS)
    assert issubclass(ImageConversionError, InvalidInputError)
    assert issubclass(ImageConversionError, ValueError)


# -- array -> Image -> array --------------------------------------------------------------------
@pytest.mark.parametrize("encoding", list(LAYOUTS))
def test_round_trip_is_exact(encoding):
    pixels = random_array(encoding, np.random.default_rng(0))
    msg = array_to_image(pixels, encoding, header())
    suffix, dtype = LAYOUTS[encoding]
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (H, W, encoding, 0)
    assert msg.step == W * int(np.prod(suffix, dtype=int)) * np.dtype(dtype).itemsize
    assert len(msg.data) == msg.step * H
    assert msg.header == header()
    back = image_to_array(msg)
    assert back.dtype == dtype and back.shape == pixels.shape
    np.testing.assert_array_equal(back, pixels)
    # ... and through rclpy's serialisation, as a subscriber would receive it.
    received = deserialize_message(serialize_message(msg), Image)
    assert received.header == header()
    np.testing.assert_array_equal(image_to_array(received), pixels)


@pytest.mark.parametrize("encoding", list(LAYOUTS))
@pytest.mark.parametrize("pad", [1, 7])
def test_padded_rows_and_trailing_bytes(encoding, pad):
    pixels = random_array(encoding, np.random.default_rng(pad))
    msg = raw_image(pixels, encoding, pad=pad, trailing=5)
    np.testing.assert_array_equal(image_to_array(msg), pixels)


@pytest.mark.parametrize("encoding", ["16UC1", "mono16", "32FC1"])
@pytest.mark.parametrize("pad", [0, 3])
def test_big_endian_is_swapped_to_native(encoding, pad):
    pixels = random_array(encoding, np.random.default_rng(1))
    msg = raw_image(pixels, encoding, pad=pad, bigendian=True)
    back = image_to_array(msg)
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, pixels)


def test_big_endian_flag_is_ignored_for_bytes():
    pixels = random_array("rgb8", np.random.default_rng(2))
    np.testing.assert_array_equal(image_to_array(raw_image(pixels, "rgb8", bigendian=True)), pixels)


def test_reading_is_a_view_unless_a_copy_is_asked_for():
    pixels = random_array("rgb8", np.random.default_rng(3))
    msg = raw_image(pixels, "rgb8", pad=4)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    assert np.shares_memory(image_to_array(msg), data)
    own = image_to_array(msg, copy=True)
    assert not np.shares_memory(own, data) and own.flags.c_contiguous
    np.testing.assert_array_equal(own, pixels)


def test_array_to_image_converts_byte_order_and_layout():
    rng = np.random.default_rng(4)
    depth = random_array("16UC1", rng)
    msg = array_to_image(depth.astype(">u2"), "16UC1")
    assert msg.is_bigendian == 0 and bytes(msg.data) == depth.astype("<u2").tobytes()
    wide = random_array("rgb8", rng, width=2 * W)
    strided = wide[:, ::2]  # not contiguous
    np.testing.assert_array_equal(image_to_array(array_to_image(strided, "rgb8")), strided)
    assert array_to_image(depth, "16UC1").header == Header()


def test_array_to_image_of_an_empty_array_is_an_empty_image():
    msg = array_to_image(np.zeros((0, 0), np.uint8), "mono8")
    assert (msg.height, msg.width, msg.step, len(msg.data)) == (0, 0, 0, 0)


@pytest.mark.parametrize("array_, encoding, match", [
    (np.zeros((H, W), np.float64), "32FC1",
     r"^encoding '32FC1' needs a \(H, W\) float32 array, got shape \(32, 40\) float64$"),
    (np.zeros((H, W), np.uint8), "rgb8", r"'rgb8' needs a \(H, W, 3\) uint8 array, got shape \(32, 40\) uint8"),
    (np.zeros((H, W, 3), np.uint8), "rgba8", r"'rgba8' needs a \(H, W, 4\) uint8 array"),
    (np.zeros((H, W, 1), np.uint16), "16UC1", r"'16UC1' needs a \(H, W\) uint16 array"),
    (np.zeros((H, W), np.int16), "16UC1", r"needs a \(H, W\) uint16 array, got shape \(32, 40\) int16"),
    (np.zeros((H, W), np.uint8), "yuv422", r"unsupported encoding 'yuv422' \(supported: rgb8, bgr8, "),
    ([[0, 1], [2, 3]], "mono8", r"array must be a numpy array, got list"),
])
def test_array_to_image_refuses_mismatches(array_, encoding, match):
    with pytest.raises(ImageConversionError, match=match):
        array_to_image(array_, encoding)


# -- bad messages ---------------------------------------------------------------------------------
def good_message():
    return raw_image(np.zeros((480, 640, 3), np.uint8), "rgb8")


def test_unknown_encoding_is_refused_with_the_supported_ones():
    msg = good_message()
    msg.encoding = "yuv422"
    with pytest.raises(ImageConversionError, match=r"^unsupported encoding 'yuv422' "
                       r"\(supported: rgb8, bgr8, rgba8, bgra8, mono8, 8UC1, mono16, 16UC1, 32FC1\)$"):
        image_to_array(msg)
    with pytest.raises(ImageConversionError, match=r"^unsupported encoding 'yuv422' for a colour image"):
        color_image_to_rgb(msg)
    with pytest.raises(ImageConversionError, match=r"^unsupported encoding 'yuv422' for a depth image"):
        depth_image_to_metres(msg)


@pytest.mark.parametrize("change, match", [
    ({"step": 100}, r"^step 100 is smaller than width 640 x 3 bytes$"),
    ({"data": array.array("B", bytes(1000))}, r"^data has 1000 bytes, expected step 1920 x height 480 = 921600$"),
    ({"data": array.array("B", bytes(921599))}, r"^data has 921599 bytes"),
    ({"width": 0, "height": 0, "step": 0, "data": array.array("B")}, r"^image is empty \(0x0\)$"),
    ({"width": 0}, r"^image is empty \(0x480\)$"),
    ({"height": 0}, r"^image is empty \(640x0\)$"),
])
def test_bad_images_are_refused_with_the_reason(change, match):
    msg = good_message()
    for field, value in change.items():
        setattr(msg, field, value)
    for convert in (image_to_array, color_image_to_rgb):
        with pytest.raises(ImageConversionError, match=match):
            convert(msg)
    msg.encoding = "16UC1"  # the same checks guard depth images (2 bytes per pixel)
    with pytest.raises(ImageConversionError, match=match.replace("640 x 3", "640 x 2")):
        depth_image_to_metres(msg)


def test_step_is_checked_in_bytes_for_wide_pixels():
    msg = raw_image(np.zeros((4, 10), np.float32), "32FC1")
    msg.step = 39
    with pytest.raises(ImageConversionError, match=r"^step 39 is smaller than width 10 x 4 bytes$"):
        image_to_array(msg)


# -- colour ---------------------------------------------------------------------------------------
def test_bgr8_and_bgra8_become_rgb():
    rgb = random_array("rgb8", np.random.default_rng(5))
    alpha = np.full((H, W, 1), 7, np.uint8)
    np.testing.assert_array_equal(color_image_to_rgb(array_to_image(rgb[:, :, ::-1], "bgr8")), rgb)
    bgra = np.concatenate([rgb[:, :, ::-1], alpha], axis=2)
    np.testing.assert_array_equal(color_image_to_rgb(raw_image(bgra, "bgra8", pad=3)), rgb)
    rgba = np.concatenate([rgb, alpha], axis=2)
    np.testing.assert_array_equal(color_image_to_rgb(array_to_image(rgba, "rgba8")), rgb)
    out = color_image_to_rgb(array_to_image(rgb, "rgb8"))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_becomes_rgb_and_mono16_is_scaled():
    gray = random_array("mono8", np.random.default_rng(6))
    np.testing.assert_array_equal(color_image_to_rgb(array_to_image(gray, "mono8")), np.stack([gray] * 3, axis=2))
    levels = (np.arange(H * W) % 256).astype(np.uint16).reshape(H, W)
    mono16 = levels * 257  # 0 -> 0, 257 k -> k, 65535 -> 255
    out = color_image_to_rgb(raw_image(mono16, "mono16", bigendian=True))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.stack([levels.astype(np.uint8)] * 3, axis=2))


@pytest.mark.parametrize("encoding", ["32FC1", "16UC1", "8UC1"])
def test_colour_refuses_other_encodings(encoding):
    msg = array_to_image(random_array(encoding, np.random.default_rng(7)), encoding)
    with pytest.raises(ImageConversionError, match=rf"^unsupported encoding '{encoding}' for a colour image "
                       r"\(supported: rgb8, bgr8, rgba8, bgra8, mono8, mono16\)$"):
        color_image_to_rgb(msg)


# -- depth ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["16UC1", "mono16"])
def test_depth_millimetres_become_metres(encoding):
    millimetres = np.array([[0, 1000, 1500], [65535, 1, 0]], np.uint16)
    metres = depth_image_to_metres(raw_image(millimetres, encoding, pad=2, bigendian=True))
    assert metres.dtype == np.float32 and metres.shape == (2, 3)
    expected = np.array([[np.nan, 1.0, 1.5], [65.535, 0.001, np.nan]], np.float32)
    np.testing.assert_array_equal(metres, expected)


def test_depth_metres_mark_missing_readings_nan():
    values = np.array([[2.5, np.inf, -np.inf], [np.nan, -1.0, 0.0]], np.float32)
    msg = array_to_image(values, "32FC1")
    metres = depth_image_to_metres(msg)
    assert metres.dtype == np.float32
    np.testing.assert_array_equal(metres, np.array([[2.5] + [np.nan] * 2, [np.nan] * 3], np.float32))
    np.testing.assert_array_equal(image_to_array(msg), values)  # the message is left as it was


def test_depth_refuses_other_encodings():
    msg = array_to_image(random_array("rgb8", np.random.default_rng(8)), "rgb8")
    with pytest.raises(ImageConversionError,
                       match=r"^unsupported encoding 'rgb8' for a depth image \(supported: 16UC1, mono16, 32FC1\)$"):
        depth_image_to_metres(msg)


# -- masks and stamps -----------------------------------------------------------------------------
def test_mask_to_image():
    mask = np.zeros((H, W), bool)
    mask[3:9, 5:20] = True
    msg = mask_to_image(mask, header())
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("mono8", H, W, W)
    assert msg.header == header()
    pixels = image_to_array(msg)
    assert set(np.unique(pixels)) == {0, 255}
    np.testing.assert_array_equal(pixels == 255, mask)
    np.testing.assert_array_equal(image_to_array(mask_to_image(mask.astype(np.uint8))), pixels)
    with pytest.raises(ImageConversionError, match=r"mask must be a 2-D \(H, W\) array, got shape \(32, 40, 1\)"):
        mask_to_image(mask[:, :, None], header())


def test_stamps():
    a = Time(sec=1_700_000_000, nanosec=900_000_000)
    b = Time(sec=1_700_000_002, nanosec=100_000_001)
    assert stamp_to_seconds(a) == pytest.approx(1_700_000_000.9, abs=1e-6)
    assert seconds_between(a, b) == pytest.approx(1.200000001, abs=1e-12)  # exact at 1 ns
    assert seconds_between(b, a) == pytest.approx(-1.200000001, abs=1e-12)
    assert seconds_between(a, a) == 0.0


# -- quaternions ----------------------------------------------------------------------------------
def rotation_of(q):
    """Rotation matrix of a unit quaternion (x, y, z, w), written independently of the module."""
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def check_frame(x_axis, z_axis):
    q = quaternion_from_axes(x_axis, z_axis)
    assert q.shape == (4,) and abs(np.linalg.norm(q) - 1) < 1e-12 and q[3] >= 0
    rotation = rotation_of(q)
    np.testing.assert_allclose(rotation @ [1, 0, 0], x_axis, atol=1e-6)
    np.testing.assert_allclose(rotation @ [0, 0, 1], z_axis, atol=1e-6)
    np.testing.assert_allclose(rotation @ [0, 1, 0], np.cross(z_axis, x_axis), atol=1e-6)


def test_quaternion_from_axes_random_frames():
    rng = np.random.default_rng(9)
    for _ in range(50):
        frame = random_rotation(rng)
        check_frame(frame[:, 0], frame[:, 2])


@pytest.mark.parametrize("x_axis, z_axis", [
    ([1, 0, 0], [0, 0, 1]),  # identity (the w branch)
    ([1, 0, 0], [0, 0, -1]),  # 180 deg about x (trace -1: the x branch)
    ([-1, 0, 0], [0, 0, -1]),  # 180 deg about y (the y branch)
    ([-1, 0, 0], [0, 0, 1]),  # 180 deg about z (the z branch)
    ([0, 1, 0], [0, 0, -1]),  # 180 deg about (1, 1, 0) / sqrt 2
    ([-1, 0, 0], [0, 1, 0]),  # 180 deg about (0, 1, 1) / sqrt 2
    ([1, 0, 0], [0, -1, 0]),  # 90 deg about x
    ([0, 1, 0], [0, 0, 1]),  # 90 deg about z
    ([0, -1, 0], [1, 0, 0]),
])
def test_quaternion_from_axes_special_frames(x_axis, z_axis):
    check_frame(np.array(x_axis, float), np.array(z_axis, float))
    q = quaternion_from_axes(x_axis, z_axis)
    if x_axis == [1, 0, 0] and z_axis == [0, 0, 1]:
        np.testing.assert_allclose(q, [0, 0, 0, 1])


def test_quaternion_from_axes_orthogonalises_and_refuses_degenerate_axes():
    # x slightly off-perpendicular and not unit length: z is kept, x is made orthogonal to it.
    q = quaternion_from_axes([2.0, 0.0, 0.01], [0, 0, 3.0])
    np.testing.assert_allclose(rotation_of(q), np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        quaternion_from_axes([0, 0, 2], [0, 0, 1])
    with pytest.raises(ValueError, match="non-zero"):
        quaternion_from_axes([0, 0, 0], [0, 0, 1])


# -- SegmentationResult -> Segmentation -----------------------------------------------------------
@dataclasses.dataclass
class FakeGraspCandidate:
    """The fields of lens_ros.grasp.GraspCandidate, as the conversion reads them."""

    center_px: tuple = (12.5, 20.25)
    angle_rad: float = 0.75
    width_px: float = 18.0
    length_px: float = 6.5
    quality: float = 0.8
    has_3d: bool = True
    position_m: tuple | None = (0.1, -0.05, 0.62)
    closing_axis: np.ndarray | None = None
    approach_axis: np.ndarray | None = None
    width_m: float = 0.045
    reason: str = ""


def segmentation_result(found=True, grasps=()):
    mask = np.zeros((H, W), bool)
    if found:
        mask[4:10, 8:30] = True
    timings = StageTimings(**{f.name: 1.5 * (i + 1) for i, f in enumerate(dataclasses.fields(StageTimings))})
    return SegmentationResult(command="the red mug", image_size=(H, W), reasoning="The mug is red.",
                              found=found, box=(8.0, 4.0, 29.5, 9.25) if found else None,
                              score=0.875 if found else 0.0, mask=mask, grasps=list(grasps), timings=timings,
                              generated_tokens=17, model="tiny", error="")


def test_result_to_segmentation_field_by_field():
    rng = np.random.default_rng(10)
    frame = random_rotation(rng)
    grasp = FakeGraspCandidate(closing_axis=frame[:, 0], approach_axis=frame[:, 2])
    flat = FakeGraspCandidate(has_3d=False, position_m=None, width_m=None, quality=0.2, reason="no depth")
    result = segmentation_result(grasps=[grasp, flat])
    msg = result_to_segmentation(result, header(), 42)

    assert isinstance(msg, Segmentation)
    assert msg.header == header() and msg.request_id == 42
    assert (msg.command, msg.reasoning, msg.found) == ("the red mug", "The mug is red.", True)
    np.testing.assert_array_equal(msg.box, np.array(result.box, np.float32))
    assert msg.score == pytest.approx(0.875)
    assert (msg.generated_tokens, msg.model, msg.error) == (17, "tiny", "")
    assert msg.mask.header == header() and msg.mask.encoding == "mono8"
    np.testing.assert_array_equal(image_to_array(msg.mask) == 255, result.mask)
    for stage in dataclasses.fields(StageTimings):
        assert getattr(msg, f"latency_{stage.name}") == pytest.approx(getattr(result.timings, stage.name))

    assert len(msg.grasps) == 2 and all(isinstance(g, GraspRegion) for g in msg.grasps)
    region = msg.grasps[0]
    assert (region.center_u, region.center_v) == (12.5, 20.25)
    assert region.angle == pytest.approx(0.75) and region.quality == pytest.approx(0.8)
    assert (region.width_px, region.length_px) == (18.0, 6.5)
    assert region.has_3d and region.width_m == pytest.approx(0.045) and region.reason == ""
    p, o = region.pose.position, region.pose.orientation
    np.testing.assert_allclose([p.x, p.y, p.z], [0.1, -0.05, 0.62])
    rotation = rotation_of([o.x, o.y, o.z, o.w])
    np.testing.assert_allclose(rotation @ [1, 0, 0], grasp.closing_axis, atol=1e-6)
    np.testing.assert_allclose(rotation @ [0, 0, 1], grasp.approach_axis, atol=1e-6)
    two_d = msg.grasps[1]
    assert not two_d.has_3d and two_d.reason == "no depth" and two_d.width_m == 0.0
    assert two_d.quality == pytest.approx(0.2)
    assert (two_d.pose.orientation.w, two_d.pose.position.z) == (1.0, 0.0)  # the default pose

    # What a subscriber receives is the same message (float32 fields come back rounded).
    received = deserialize_message(serialize_message(msg), Segmentation)
    assert (received.header, received.request_id, received.command) == (msg.header, 42, msg.command)
    assert received.mask == msg.mask
    assert [g.pose for g in received.grasps] == [g.pose for g in msg.grasps]
    assert received.grasps[1].reason == "no depth"
    np.testing.assert_array_equal(received.box, msg.box)
    assert received.latency_total_ms == pytest.approx(result.timings.total_ms)


def test_result_to_segmentation_not_found_and_failures():
    msg = result_to_segmentation(segmentation_result(found=False), header(), 0)
    assert not msg.found and msg.request_id == 0 and list(msg.grasps) == []
    np.testing.assert_array_equal(msg.box, np.zeros(4, np.float32))
    assert (msg.mask.height, msg.mask.width) == (H, W) and not image_to_array(msg.mask).any()

    failure = SegmentationResult.failure("grab it", "image is empty (0x0)", model="tiny")
    msg = result_to_segmentation(failure, header(), 7)
    assert msg.error == "image is empty (0x0)" and msg.command == "grab it"
    assert (msg.mask.width, msg.mask.height, len(msg.mask.data)) == (0, 0, 0)
    assert msg.mask.header == header()

    no_mask = dataclasses.replace(segmentation_result(found=False), mask=None)
    msg = result_to_segmentation(no_mask, header(), 8)
    assert (msg.mask.width, msg.mask.height) == (0, 0) and msg.mask.header == header()


def test_result_to_segmentation_refuses_unknown_grasps_and_negative_ids():
    with pytest.raises(TypeError, match="lacks the GraspCandidate fields .*closing_axis"):
        result_to_segmentation(segmentation_result(grasps=[object()]), header(), 1)
    with pytest.raises(ValueError, match="request_id"):
        result_to_segmentation(segmentation_result(), header(), -1)


def test_every_latency_field_comes_from_stage_timings():
    latency_fields = {name for name in Segmentation.get_fields_and_field_types() if name.startswith("latency_")}
    assert latency_fields == {f"latency_{f.name}" for f in dataclasses.fields(StageTimings)}


def test_header_is_copied_not_shared():
    stamp = header()
    msg = result_to_segmentation(segmentation_result(), stamp, 1)
    stamp.frame_id = "changed"
    assert msg.header.frame_id == msg.mask.header.frame_id == "camera_color_optical_frame"


# -- non-finite grasp numbers never reach a message -------------------------------------------------
FLOAT32_MAX = float(np.finfo(np.float32).max)


def region_numbers(region) -> list[float]:
    p, o = region.pose.position, region.pose.orientation
    return [region.center_u, region.center_v, region.angle, region.width_px, region.length_px, region.quality,
            region.width_m, p.x, p.y, p.z, o.x, o.y, o.z, o.w]


@pytest.mark.parametrize("bad, why", [
    (dict(position_m=(np.nan, 0.0, 0.5)), "position_m (nan, 0.0, 0.5) is not finite"),
    (dict(position_m=(0.0, 0.0, np.inf)), "position_m (0.0, 0.0, inf) is not finite"),
    (dict(width_m=np.inf), "width_m inf is not a finite float32"),
    (dict(width_m=1e300), "width_m 1e+300 is not a finite float32"),  # inf once in the float32 field
    (dict(closing_axis=np.array([np.nan, 0.0, 0.0])), "axes must be finite and non-zero"),
    (dict(approach_axis=np.array([0.0, 0.0, -np.inf])), "axes must be finite and non-zero"),
    (dict(closing_axis=np.array([0.0, 0.0, 1.0])), "is parallel to z_axis"),  # used to raise ValueError
], ids=["nan-position", "inf-position", "inf-width", "huge-width", "nan-closing", "inf-approach", "parallel"])
def test_a_grasp_with_an_unusable_3d_part_is_published_2d_with_a_reason(bad, why):
    """The 3-D part is dropped (has_3d false, the default pose, width_m 0); the image-plane
    region stays, and its reason says why. Nothing non-finite goes on the wire."""
    fields = dict(closing_axis=np.array([1.0, 0.0, 0.0]), approach_axis=np.array([0.0, 0.0, 1.0]), reason="border")
    grasp = FakeGraspCandidate(**{**fields, **bad})
    msg = result_to_segmentation(segmentation_result(grasps=[grasp]), header(), 1)
    (region,) = msg.grasps
    assert not region.has_3d and region.width_m == 0.0 and region.pose == GraspRegion().pose
    assert region.reason.startswith("border; 3-D grasp dropped: ") and why in region.reason, region.reason
    assert (region.center_u, region.center_v, region.width_px) == (12.5, 20.25, 18.0)
    received = deserialize_message(serialize_message(msg), Segmentation).grasps[0]
    assert all(np.isfinite(v) for v in region_numbers(received))


@pytest.mark.parametrize("bad", [dict(center_px=(np.nan, 3.0)), dict(angle_rad=np.inf), dict(width_px=1e39),
                                 dict(length_px=-np.inf), dict(quality=np.nan)],
                         ids=["center", "angle", "width", "length", "quality"])
def test_a_grasp_with_non_finite_image_numbers_is_left_out(bad):
    """Nothing of such a region is usable: the message carries the other grasps only."""
    frame = dict(closing_axis=np.array([1.0, 0.0, 0.0]), approach_axis=np.array([0.0, 0.0, 1.0]))
    good = FakeGraspCandidate(**frame)
    msg = result_to_segmentation(segmentation_result(grasps=[FakeGraspCandidate(**frame, **bad), good]), header(), 1)
    assert len(msg.grasps) == 1 and msg.grasps[0].has_3d
    assert all(np.isfinite(v) and abs(v) <= FLOAT32_MAX for v in region_numbers(msg.grasps[0]))


# -- sensor_msgs/CompressedImage ------------------------------------------------------------------
# Messages are made as image_transport's compressed plugin makes them (compressed_publisher.cpp,
# rolling and humble alike): JPEG encodes colour converted to bgr8 and grey to mono8; PNG encodes
# colour converted to bgr8/bgr16 (alpha dropped) and grey as it is; TIFF encodes the pixels as they
# are. `format` is "<encoding>; <codec> compressed <what was encoded>".
BGR_CONVERSIONS = {"rgb8": cv2.COLOR_RGB2BGR, "rgba8": cv2.COLOR_RGBA2BGR, "bgra8": cv2.COLOR_BGRA2BGR}
JPEG_QUALITY = 95  # the plugin's default jpeg_quality


def compressed_message(fmt, payload, stamp=None):
    return CompressedImage(header=stamp or Header(), format=fmt, data=array.array("B", bytes(payload)))


def encoded(extension, pixels, params=()):
    ok, buffer = cv2.imencode(extension, pixels, list(params))
    assert ok
    return buffer.tobytes()


def plugin_message(pixels, encoding, codec):
    """The CompressedImage image_transport's compressed plugin publishes for a raw image."""
    colour = encoding not in ("mono8", "mono16")
    if codec == "tiff":
        target, encoded_as = pixels, ""
    elif colour:
        target = cv2.cvtColor(pixels, BGR_CONVERSIONS[encoding]) if encoding in BGR_CONVERSIONS else pixels
        encoded_as = "bgr8"
    else:
        target, encoded_as = pixels, ("mono8" if codec == "jpeg" else "")
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if codec == "jpeg" else []
    extension = {"jpeg": ".jpg", "png": ".png", "tiff": ".tiff"}[codec]
    return compressed_message(f"{encoding}; {codec} compressed {encoded_as}", encoded(extension, target, params),
                              header())


def received(msg):
    """``msg`` as a subscriber receives it (through rclpy's CDR serialisation)."""
    return deserialize_message(serialize_message(msg), CompressedImage)


@pytest.mark.parametrize("codec", ["png", "tiff"])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_lossless_compressed_images_decode_to_the_raw_images_array(codec, encoding):
    """The same uint8 RGB as color_image_to_rgb gives for the raw image, bit for bit: colour order,
    alpha dropped, grey repeated, mono16 scaled to 8 bits by the same rule."""
    pixels = random_array(encoding, np.random.default_rng(20))
    expected = color_image_to_rgb(array_to_image(pixels, encoding))
    msg = received(plugin_message(pixels, encoding, codec))
    assert msg.format.startswith(f"{encoding}; {codec} compressed")
    out = compressed_image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("encoding", ["rgb16", "bgr16"])
def test_16_bit_colour_png_is_scaled_as_16_bit_raw_images_are(encoding):
    rgb16 = np.random.default_rng(21).integers(0, 65535, size=(H, W, 3), dtype=np.uint16, endpoint=True)
    rgb16[0, :3] = [[0, 0, 0], [65535, 65535, 65535], [257, 514, 32896]]  # exactly 0, 255 and 1, 2, 128
    bgr16 = rgb16[:, :, ::-1]  # what the plugin encodes ("bgr16"), whatever the raw order was
    msg = compressed_message(f"{encoding}; png compressed bgr16", encoded(".png", np.ascontiguousarray(bgr16)))
    out = compressed_image_to_rgb(msg)
    np.testing.assert_array_equal(out, to_rgb8(rgb16))
    np.testing.assert_array_equal(out[0, :3], [[0, 0, 0], [255, 255, 255], [1, 2, 128]])


def smooth_rgb():
    """A JPEG-friendly picture: colour gradients with three saturated blocks (red, blue, green)."""
    rows, cols = np.mgrid[0:64, 0:80]
    rgb = np.stack([cols * 255 // 79, rows * 255 // 63, np.full_like(rows, 128)], axis=2).astype(np.uint8)
    rgb[:32, :32], rgb[:32, 48:], rgb[32:, :32] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    return rgb


# Block interiors, 4 px from any colour edge (JPEG's chroma subsampling blurs edges by a pixel or two).
JPEG_BLOCKS = {"red": np.s_[4:28, 4:28], "blue": np.s_[4:28, 52:76], "green": np.s_[36:60, 4:28],
               "gradient": np.s_[36:60, 36:76]}


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8"])
def test_jpeg_colour_decodes_in_rgb_order_within_tolerance(encoding):
    """Tolerance at quality 95: within 4 levels inside the blocks, 3 levels on average overall
    (measured: 1 and 3 inside, 2.3 on average). A swapped channel order would be off by 255."""
    rgb = smooth_rgb()
    raw = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])}
    out = compressed_image_to_rgb(received(plugin_message(np.ascontiguousarray(raw[encoding]), encoding, "jpeg")))
    error = np.abs(out.astype(int) - rgb)
    assert error.mean() <= 3
    for name, block in JPEG_BLOCKS.items():
        assert error[block].max() <= 4, name
    assert out[JPEG_BLOCKS["red"]].mean(axis=(0, 1)) == pytest.approx((255, 0, 0), abs=4)
    assert out[JPEG_BLOCKS["blue"]].mean(axis=(0, 1)) == pytest.approx((0, 0, 255), abs=4)


def test_jpeg_grey_decodes_within_tolerance():
    """Grey JPEG at quality 95 is within 2 levels of the raw image's array (measured: 1)."""
    grey = smooth_rgb()[:, :, 1]
    out = compressed_image_to_rgb(received(plugin_message(grey, "mono8", "jpeg")))
    assert out.shape == (64, 80, 3)
    np.testing.assert_allclose(out, color_image_to_rgb(array_to_image(grey, "mono8")), atol=2)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "JPEG", "jpg", "tiff"])
def test_bare_formats_hold_true_colours(fmt):
    """Publishers other than image_transport write only the codec (sensor_msgs' comment says
    "jpeg, png, tiff"); their files hold true colours, which OpenCV decodes as BGR."""
    rgb = smooth_rgb()
    extension = ".png" if fmt == "png" else ".tiff" if fmt == "tiff" else ".jpg"
    out = compressed_image_to_rgb(compressed_message(fmt, encoded(extension, rgb[:, :, ::-1].copy())))
    if extension == ".jpg":
        assert out[JPEG_BLOCKS["red"]].mean(axis=(0, 1)) == pytest.approx((255, 0, 0), abs=4)
    else:
        np.testing.assert_array_equal(out, rgb)


def test_bare_png_with_alpha_and_grey():
    rgb = random_array("rgb8", np.random.default_rng(22))
    bgra = np.dstack([rgb[:, :, ::-1], np.arange(H * W, dtype=np.uint8).reshape(H, W)])
    np.testing.assert_array_equal(compressed_image_to_rgb(compressed_message("png", encoded(".png", bgra))), rgb)
    grey = rgb[:, :, 0].copy()
    np.testing.assert_array_equal(compressed_image_to_rgb(compressed_message("png", encoded(".png", grey))),
                                  np.stack([grey] * 3, axis=2))


def test_pre_2012_formats_hold_rgb():
    """compressed_image_transport before Dec 2012 converted colour to rgb8 before encoding and
    wrote "rgb8; png compressed" (no target): the channels come back in RGB order."""
    rgb = random_array("rgb8", np.random.default_rng(23))
    np.testing.assert_array_equal(compressed_image_to_rgb(compressed_message("bgr8; png compressed",
                                                                             encoded(".png", rgb))), rgb)


RGB_JPEG, RGB_PNG = "rgb8; jpeg compressed bgr8", "rgb8; png compressed bgr8"
JPEG = encoded(".jpg", smooth_rgb()[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
PNG = encoded(".png", smooth_rgb())
FIRST_SCAN = JPEG.index(b"\xff\xda")
TRUNCATED_JPEG = r"^JPEG data is truncated \(\d+ bytes\): "
UNSUPPORTED_FORMAT = r"^unsupported compressed format "


@pytest.mark.parametrize("fmt, payload, match", [
    (RGB_JPEG, b"", rf"^compressed image data is empty \(format '{RGB_JPEG}'\)$"),
    ("png", b"", r"^compressed image data is empty"),
    (RGB_JPEG, b"not an image at all", r"^data is not JPEG \(it starts with '6e 6f 74 20"),
    (RGB_PNG, JPEG, r"^data is not PNG \(it starts with 'ff d8 ff"),
    # cv2.imdecode would decode any codec it knows (WebP here): the format's codec is enforced.
    (RGB_JPEG, encoded(".webp", smooth_rgb()), r"^data is not JPEG \(it starts with '52 49 46 46"),
    (RGB_JPEG, JPEG[:200], TRUNCATED_JPEG + "it ends before its first scan$"),
    (RGB_JPEG, JPEG[:FIRST_SCAN + 40], TRUNCATED_JPEG + "no end-of-image marker$"),
    (RGB_JPEG, JPEG[:-2], TRUNCATED_JPEG + "no end-of-image marker$"),
    (RGB_PNG, PNG[:300], r"^PNG data \(300 bytes\) could not be decoded: truncated or corrupt$"),
    (RGB_PNG, PNG[:20], r"^PNG data is truncated or corrupt: no IHDR header \(20 bytes\)$"),
    ("rgb8; tiff compressed ", encoded(".tiff", smooth_rgb())[:8], r"^TIFF data is truncated or corrupt \(8 bytes\)$"),
    ("rgb8; webp compressed bgr8", JPEG, UNSUPPORTED_FORMAT + r"'rgb8; webp compressed bgr8' \(supported: "),
    ("h264", JPEG, UNSUPPORTED_FORMAT + "'h264'"),
    ("", JPEG, UNSUPPORTED_FORMAT + "''"),
    ("rgb8; jpeg compressed yuv422", JPEG, r"^compressed format 'rgb8; jpeg compressed yuv422': unknown encoded form"),
    ("16UC1; png compressed ", encoded(".png", np.zeros((H, W), np.uint16)),
     r"^compressed format '16UC1; png compressed ': unsupported encoding '16UC1' for a colour image \(supported: "),
    ("16UC1; compressedDepth png", b"\x00" * 64, r"^compressed format '16UC1; compressedDepth png' is "
     r"compressed_depth_image_transport's depth format, which is not supported"),
], ids=["empty", "empty-bare", "garbage", "jpeg-as-png", "webp-as-jpeg", "truncated-header", "truncated-scan",
        "no-eoi", "truncated-png", "png-header-cut", "tiff-header-cut", "webp-format", "h264", "no-format",
        "unknown-target", "depth-png", "compressed-depth"])
def test_bad_compressed_images_are_refused_with_the_reason(fmt, payload, match):
    with pytest.raises(ImageConversionError, match=match) as caught:
        compressed_image_to_rgb(received(compressed_message(fmt, payload)))
    assert isinstance(caught.value, InvalidInputError)


def test_corrupt_png_data_is_refused():
    png = bytearray(PNG)
    start = png.index(b"IDAT") + 20
    png[start:start + 16] = bytes(16)  # the chunk's CRC no longer matches
    with pytest.raises(ImageConversionError, match=r"^PNG data \(\d+ bytes\) could not be decoded: "
                       r"truncated or corrupt$"):
        compressed_image_to_rgb(compressed_message(RGB_PNG, bytes(png)))


def with_jpeg_size(jpeg, height, width):
    """``jpeg`` with the size in its frame header replaced (a decompression bomb's header)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[sof + 9:]


def test_a_decompression_bomb_is_refused_before_decoding():
    """Headers declaring billions of pixels on a few kB of data are refused from the header alone
    (the PNG's header CRC is wrong too: decoding would have failed differently)."""
    with pytest.raises(ImageConversionError, match=r"^compressed image is 65000x60000 px \(3900000000 pixels\), "
                       rf"over the limit of {DEFAULT_MAX_DECODED_PIXELS}: refused before decoding$"):
        compressed_image_to_rgb(compressed_message(RGB_JPEG, with_jpeg_size(JPEG, 60000, 65000)))
    png = bytearray(PNG)
    png[16:24] = (100_000).to_bytes(4, "big") * 2
    with pytest.raises(ImageConversionError, match=r"^compressed image is 100000x100000 px"):
        compressed_image_to_rgb(compressed_message("png", bytes(png)))


def test_the_pixel_limit_and_the_pipelines_size_rules_apply_to_the_header():
    msg = plugin_message(random_array("rgb8", np.random.default_rng(24)), "rgb8", "png")
    assert compressed_image_to_rgb(msg, max_pixels=H * W).shape == (H, W, 3)
    with pytest.raises(ImageConversionError, match=rf"over the limit of {H * W - 1}: refused before decoding$"):
        compressed_image_to_rgb(msg, max_pixels=H * W - 1)
    small = compressed_message("png", encoded(".png", np.zeros((20, 40), np.uint8)))
    with pytest.raises(InvalidInputError, match=r"^image is 40x20 px; both sides must be at least 28 px$"):
        compressed_image_to_rgb(small)


# -- vision_msgs/Detection2DArray -----------------------------------------------------------------
def test_found_result_becomes_one_detection():
    vision = pytest.importorskip("vision_msgs.msg")
    assert vision_msgs_available()
    msg = result_to_detections(segmentation_result(), header(), 7)
    assert isinstance(msg, vision.Detection2DArray)
    msg = deserialize_message(serialize_message(msg), vision.Detection2DArray)  # as a subscriber gets it
    assert msg.header == header()
    (detection,) = msg.detections
    assert detection.header == header() and detection.id == "7"
    bbox = detection.bbox  # the box is (8.0, 4.0, 29.5, 9.25)
    assert (bbox.center.position.x, bbox.center.position.y, bbox.center.theta) == (18.75, 6.625, 0.0)
    assert (bbox.size_x, bbox.size_y) == (21.5, 5.25)
    (hypothesis,) = detection.results
    assert (hypothesis.hypothesis.class_id, hypothesis.hypothesis.score) == ("the red mug", 0.875)
    assert hypothesis.pose == vision.ObjectHypothesisWithPose().pose  # no 3-D pose of the object


def test_a_result_without_an_object_has_no_detections():
    vision = pytest.importorskip("vision_msgs.msg")
    for result in (segmentation_result(found=False), SegmentationResult.failure("the red mug", "image: bad", (H, W))):
        msg = result_to_detections(result, header(), 3)
        assert isinstance(msg, vision.Detection2DArray) and msg.header == header() and list(msg.detections) == []
    assert result_to_detections(segmentation_result(found=False), None, 0).header == Header()


def test_detections_refuse_a_found_result_without_a_finite_box():
    pytest.importorskip("vision_msgs.msg")
    for box in (None, (1.0, 2.0, np.nan, 4.0), (1.0, 2.0, 3.0)):
        result = dataclasses.replace(segmentation_result(), box=box)
        with pytest.raises(ValueError, match=r"^a found result needs a finite box \(x1, y1, x2, y2\), got "):
            result_to_detections(result, header(), 1)
    with pytest.raises(ValueError, match=r"^request_id must be >= 0, got -1$"):
        result_to_detections(segmentation_result(), header(), -1)


def test_bbox_center_is_set_in_the_3x_layout_too():
    """vision_msgs 3.x (Galactic) has a geometry_msgs/Pose2D centre (x, y, theta)."""
    center = Pose2D()
    _set_bbox_center(center, 18.75, 6.625)
    assert (center.x, center.y, center.theta) == (18.75, 6.625, 0.0)


def test_detections_without_vision_msgs_say_what_to_install():
    if vision_msgs_available():
        pytest.skip("vision_msgs is installed")
    with pytest.raises(ModuleNotFoundError, match="^vision_msgs is not installed"):
        result_to_detections(segmentation_result(), header(), 1)
    assert VISION_MSGS_MISSING.startswith("vision_msgs is not installed")
