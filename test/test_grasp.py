"""Grasp regions: 2-D on rasterised shapes, 3-D on rendered depth scenes with exact ground truth."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import cv2
import numpy as np
import pytest

from lens_ros.grasp import GraspCandidate, GraspConfig, Intrinsics, grasp_regions

# --- helpers --------------------------------------------------------------------------------------


def rotated_rect_iou(a, b) -> float:
    """IoU of two OpenCV rotated rectangles ((cx, cy), (w, h), degrees)."""
    kind, points = cv2.rotatedRectangleIntersection(a, b)
    if kind == cv2.INTERSECT_NONE or points is None:
        return 0.0
    inter = cv2.contourArea(cv2.convexHull(points))
    return inter / (a[1][0] * a[1][1] + b[1][0] * b[1][1] - inter)


def grasp_rect(g: GraspCandidate):
    return ((g.center_px[0], g.center_px[1]), (g.width_px, g.length_px), math.degrees(g.angle_rad))


def line_angle_error_deg(a: float, b: float) -> float:
    """Angle between two undirected lines, in degrees (0..90)."""
    d = abs(a - b) % math.pi
    return math.degrees(min(d, math.pi - d))


def axis_angle_error_deg(a, b) -> float:
    """Angle between two undirected 3-D axes, in degrees."""
    cos = abs(float(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(min(1.0, cos)))


# --- 2-D ------------------------------------------------------------------------------------------

SHAPES = [(kind, seed) for kind in ("rectangle", "ellipse") for seed in range(12)]


@pytest.mark.parametrize("kind,seed", SHAPES)
def test_2d_regions_meet_the_rectangle_metric(kind, seed):
    """IoU > 0.25 and angle error < 30 degrees against the true grasp rectangle: across the
    shape's narrow axis at its centre, as wide as the shape plus the margins."""
    rng = np.random.default_rng(seed)
    long_side, narrow_side = rng.uniform(60, 200), rng.uniform(20, 55)
    angle = rng.uniform(-90, 90)  # of the long side, degrees from +u towards +v
    center = (rng.uniform(150, 490), rng.uniform(150, 330))
    mask = np.zeros((480, 640), np.uint8)
    if kind == "rectangle":
        corners = cv2.boxPoints((center, (long_side, narrow_side), angle))
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    else:
        cv2.ellipse(mask, (center, (long_side, narrow_side), angle), 1, -1)
    config = GraspConfig()
    grasps = grasp_regions(mask.astype(bool), config=config)
    assert grasps and all(not g.has_3d for g in grasps)
    best = grasps[0]
    true_angle = math.radians(angle + 90)  # closing across the long side
    true = (center, (narrow_side + 2 * config.margin_px, best.length_px), math.degrees(true_angle))
    assert rotated_rect_iou(grasp_rect(best), true) > 0.25
    assert line_angle_error_deg(best.angle_rad, true_angle) < 30
    # tighter than the metric asks: the centre and the width are near exact
    assert math.dist(best.center_px, center) < 2.0
    assert abs(best.width_px - (narrow_side + 2 * config.margin_px)) < 3.0
    assert -math.pi / 2 < best.angle_rad <= math.pi / 2
    assert [g.quality for g in grasps] == sorted((g.quality for g in grasps), reverse=True)
    assert all(0 <= g.quality <= 1 for g in grasps)


def test_elongated_objects_get_candidates_along_their_long_axis():
    mask = np.zeros((480, 640), bool)
    mask[200:230, 100:500] = True  # 400 x 30 px, horizontal: the jaws close vertically
    grasps = grasp_regions(mask, config=GraspConfig(num_candidates=5))
    assert len(grasps) == 5
    us = sorted(g.center_px[0] for g in grasps)
    assert us[0] < 250 and us[-1] > 350  # spread along the bar
    for g in grasps:
        assert abs(g.center_px[1] - 214.5) < 0.5 and abs(abs(g.angle_rad) - math.pi / 2) < 1e-6
        assert abs(g.width_px - (30 + 2 * GraspConfig().margin_px)) < 1e-6
    assert grasps[0].center_px[0] == pytest.approx(299.5)  # the centroid comes first
    assert len(grasp_regions(mask, config=GraspConfig(num_candidates=1))) == 1
    square = np.zeros((100, 100), bool)
    square[30:70, 20:80] = True  # 60 x 40: not elongated enough for more than one
    assert len(grasp_regions(square)) == 1


def test_holes_are_filled_and_the_largest_or_boxed_component_is_used():
    ring = np.zeros((200, 300), np.uint8)
    cv2.circle(ring, (80, 100), 40, 1, -1)
    cv2.circle(ring, (80, 100), 30, 0, -1)  # a mug seen from above: the rim only
    small = np.zeros_like(ring)
    cv2.rectangle(small, (200, 90), (219, 129), 1, -1)  # 20 x 40
    mask = (ring | small).astype(bool)
    largest = grasp_regions(mask)[0]
    assert math.dist(largest.center_px, (80, 100)) < 1.0
    assert abs(largest.width_px - (81 + 2 * GraspConfig().margin_px)) < 1.5  # across the outline, not the rim
    assert "largest part of a mask in 2 parts" in largest.reason
    boxed = grasp_regions(mask, config=GraspConfig(component="box"), box=(195, 85, 225, 135))[0]
    assert math.dist(boxed.center_px, (209.5, 109.5)) < 1.0
    assert abs(abs(boxed.angle_rad) - 0.0) < 1e-6  # closing across the 20 px side
    assert "part under the box of a mask in 2 parts" in boxed.reason


def test_tiny_and_border_masks_are_degraded_with_a_reason():
    tiny = np.zeros((50, 50), bool)
    tiny[10, 10:13] = True
    (only,) = grasp_regions(tiny)
    assert only.center_px == (11.0, 10.0) and only.quality <= 0.1 and "only 3 px" in only.reason
    border = np.zeros((100, 100), bool)
    border[40:60, 0:30] = True
    inside = np.zeros((100, 100), bool)
    inside[40:60, 10:40] = True
    at_border, centred = grasp_regions(border)[0], grasp_regions(inside)[0]
    assert "image border" in at_border.reason and centred.reason == ""
    assert at_border.quality < centred.quality


@pytest.mark.parametrize("call,message", [
    (lambda: grasp_regions(np.zeros((10, 10), bool)), "mask is empty"),
    (lambda: grasp_regions(np.ones((2, 2, 2), bool)), "2-D"),
    (lambda: grasp_regions([[1]]), "numpy array"),
    (lambda: grasp_regions(np.ones((4, 4), bool), depth=np.ones((5, 4), np.float32),
                           intrinsics=Intrinsics(500, 500, 2, 2)), "depth is 4x5 but the mask is 4x4"),
    (lambda: grasp_regions(np.ones((4, 4), bool), depth=np.ones((4, 4), np.float32)), "go together"),
    (lambda: grasp_regions(np.ones((4, 4), bool), depth=np.ones((4, 4), np.int32),
                           intrinsics=Intrinsics(500, 500, 2, 2)), "uint16 (mm) or float (m)"),
    (lambda: Intrinsics(-500, 500, 320, 240), "focal lengths must be positive"),
    (lambda: Intrinsics(500, 500, float("nan"), 240), "finite"),
    (lambda: Intrinsics.from_k([0.0] * 9), "focal lengths must be positive"),
    (lambda: Intrinsics.from_k([1, 2, 3]), "9 elements"),
    (lambda: GraspConfig(max_opening_m=0), "max_opening_m must be positive"),
    (lambda: GraspConfig(approach="sideways"), "approach must be one of top_down, camera"),
    (lambda: GraspConfig(component="smallest"), "component must be one of"),
])
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_intrinsics_from_camera_info_k():
    k = [615.0, 0.0, 320.5, 0.0, 616.0, 240.25, 0.0, 0.0, 1.0]
    assert Intrinsics.from_k(k) == Intrinsics(615.0, 616.0, 320.5, 240.25)
    uv = Intrinsics.from_k(k).project(np.array([[0.1, -0.05, 0.5]]))
    np.testing.assert_allclose(uv, [[320.5 + 615 * 0.2, 240.25 - 616 * 0.1]])


# --- 3-D ------------------------------------------------------------------------------------------

from depth_scenes import POSES, Box, Cylinder, Mug, degrade, depth_mm, orbit, render  # noqa: E402

# Objects whose top the cameras in POSES see; yaws and positions off the axes on purpose.
OBJECTS = {
    "box": Box((0.065, 0.04, 0.08), position=(0.01, -0.02), yaw=0.4),
    "flat box": Box((0.05, 0.09, 0.03), position=(-0.02, 0.01), yaw=-1.1),
    "cylinder": Cylinder(0.03, 0.1, position=(0.015, 0.0)),
    "mug": Mug(radius=0.035, position=(0.0, 0.01), yaw=2.2),
}
TEST_CONFIG = GraspConfig(margin_m=0.005, max_opening_m=0.1)


def expected_center(scene, config=TEST_CONFIG):
    """The true grasp centre: the footprint centre, as low as the fingers reach but at most
    half-way down (grasp_regions' documented rule)."""
    height = max(scene.height_m / 2, scene.height_m - config.finger_length_m)
    return scene.center_m + (height - scene.height_m / 2) * scene.table_normal


def check_3d(scene, best, center_mm, angle_deg, width_mm=None, config=TEST_CONFIG, name=""):
    assert best.has_3d, f"{name}: {best.reason}"
    error_mm = 1000 * np.linalg.norm(np.subtract(best.position_m, expected_center(scene, config)))
    assert error_mm < center_mm, f"{name}: centre off by {error_mm:.1f} mm"
    if not name.startswith("cylinder"):  # a cylinder has no narrow axis
        angle = axis_angle_error_deg(best.closing_axis, scene.narrow_axis)
        assert angle < angle_deg, f"{name}: closing axis off by {angle:.1f} degrees"
    if width_mm is not None:
        expected = min(scene.width_m + 2 * config.margin_m, config.max_opening_m)
        assert abs(best.width_m - expected) * 1000 < width_mm, f"{name}: width {best.width_m} against {expected}"
    approach = axis_angle_error_deg(best.approach_axis, -scene.table_normal)
    assert approach < 2 and np.dot(best.approach_axis, scene.table_normal) < 0, f"{name}: approach off by {approach}"
    assert abs(np.dot(best.closing_axis, best.approach_axis)) < 1e-9
    assert np.linalg.norm(best.closing_axis) == pytest.approx(1)
    assert np.linalg.norm(best.approach_axis) == pytest.approx(1)


def scene_of(name, pose):
    obj = OBJECTS[name]
    if isinstance(obj, Mug):  # handle in view, side on: a handle hidden behind the body cannot be avoided
        obj = dataclasses.replace(obj, yaw=math.radians(pose[2] + 90))
    return render(obj, orbit(*pose))


def intrinsics_of(scene):
    return Intrinsics(*scene.intrinsics)


@pytest.mark.parametrize("pose", POSES, ids=lambda p: f"{p[0]}m-el{p[1]}-az{p[2]}")
@pytest.mark.parametrize("name", OBJECTS)
def test_3d_grasps_on_noise_free_scenes(name, pose):
    """Centre within 5 mm, closing axis within 5 degrees of the narrow axis, width within 3 mm."""
    scene = scene_of(name, pose)
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene), config=TEST_CONFIG)
    check_3d(scene, grasps[0], center_mm=5, angle_deg=5, width_mm=3, name=name)
    assert all(g.has_3d and g.width_m <= TEST_CONFIG.max_opening_m for g in grasps)
    # The image region is the 3-D grasp projected: its centre is the projected position.
    uv = intrinsics_of(scene).project(np.array(grasps[0].position_m))
    assert np.allclose(grasps[0].center_px, uv)


@pytest.mark.parametrize("pose", POSES, ids=lambda p: f"{p[0]}m-el{p[1]}-az{p[2]}")
@pytest.mark.parametrize("name", OBJECTS)
def test_3d_grasps_with_noise_and_invalid_pixels(name, pose):
    """Gaussian depth noise (sigma 2 mm) and 5 % invalid pixels: within 10 mm and 10 degrees."""
    scene = degrade(scene_of(name, pose), sigma_m=0.002, invalid_fraction=0.05, seed=POSES.index(pose))
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene), config=TEST_CONFIG)
    check_3d(scene, grasps[0], center_mm=10, angle_deg=10, name=name)


def test_millimetre_depth_gives_the_same_grasp_as_metres():
    scene = render(OBJECTS["box"], orbit(*POSES[1]))
    metres = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene), config=TEST_CONFIG)[0]
    millimetres = grasp_regions(scene.mask, depth=depth_mm(scene), intrinsics=intrinsics_of(scene),
                                config=TEST_CONFIG)[0]
    assert np.linalg.norm(np.subtract(metres.position_m, millimetres.position_m)) < 0.001
    check_3d(scene, millimetres, center_mm=5, angle_deg=5, width_mm=3)


def test_a_mask_bleeding_onto_the_table_and_flying_pixels_are_rejected():
    """The usual segmentation and depth-camera faults at an object's edge: the mask two pixels
    too wide (table points in it), and edge pixels with depths half-way to the background."""
    scene = render(OBJECTS["box"], orbit(*POSES[2]))
    wide = cv2.dilate(scene.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    depth = scene.depth.copy()
    edge = scene.mask & ~cv2.erode(scene.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    table_behind = np.where(wide & ~scene.mask, depth, 0).max()
    depth[edge] = (depth[edge] + table_behind) / 2
    best = grasp_regions(wide, depth=depth, intrinsics=intrinsics_of(scene), config=TEST_CONFIG)[0]
    check_3d(scene, best, center_mm=5, angle_deg=5, width_mm=4)


def test_elongated_objects_get_3d_candidates_along_their_length():
    scene = render(Box((0.2, 0.03, 0.04), yaw=0.3), orbit(*POSES[0]))
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene),
                           config=GraspConfig(num_candidates=5))
    assert len(grasps) == 5 and all(g.has_3d for g in grasps)
    long_axis = np.cross(scene.narrow_axis, scene.table_normal)
    along = sorted(float(np.dot(np.subtract(g.position_m, scene.center_m), long_axis)) for g in grasps)
    assert along[0] < -0.04 and along[-1] > 0.04  # spread over the 20 cm
    for g in grasps:
        assert axis_angle_error_deg(g.closing_axis, scene.narrow_axis) < 5
        assert abs(g.width_m - (0.03 + 2 * GraspConfig().margin_m)) < 0.003
    assert np.linalg.norm(np.subtract(grasps[0].position_m, expected_center(scene, GraspConfig()))) < 0.005


def test_an_object_wider_than_the_gripper_gets_no_3d_grasp_and_a_reason():
    scene = render(Box((0.12, 0.1, 0.05), yaw=0.2), orbit(*POSES[1]))
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene),
                           config=GraspConfig(max_opening_m=0.08))
    assert grasps and not any(g.has_3d for g in grasps)
    assert "wider than max_opening_m (80 mm): no 3-D grasp" in grasps[0].reason
    measured = re.search(r"is (\d+) mm wide", grasps[0].reason)
    assert measured and abs(int(measured.group(1)) - 100) <= 3  # its narrow side


def test_without_valid_depth_on_the_mask_the_regions_are_2d_with_a_reason():
    scene = render(OBJECTS["box"], orbit(*POSES[1]))
    depth = np.where(scene.mask, np.float32(np.nan), scene.depth)
    grasps = grasp_regions(scene.mask, depth=depth, intrinsics=intrinsics_of(scene))
    planar = grasp_regions(scene.mask)
    assert [g.center_px for g in grasps] == [g.center_px for g in planar] and not any(g.has_3d for g in grasps)
    assert grasps[0].reason.startswith("only 0 of") and "2-D regions only" in grasps[0].reason


def test_camera_approach_comes_along_the_ray():
    scene = render(OBJECTS["box"], orbit(*POSES[3]))
    config = GraspConfig(approach="camera", margin_m=0.005, max_opening_m=0.1)
    best = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene), config=config)[0]
    assert best.has_3d
    ray = np.asarray(best.position_m) / np.linalg.norm(best.position_m)
    np.testing.assert_allclose(best.approach_axis, ray, atol=1e-9)
    narrow = scene.narrow_axis - np.dot(scene.narrow_axis, ray) * ray  # the narrow axis, across the ray
    assert axis_angle_error_deg(best.closing_axis, narrow) < 5
    assert np.linalg.norm(np.subtract(best.position_m, expected_center(scene, config))) < 0.005


def test_without_a_visible_table_the_grasp_comes_along_the_ray_and_says_so():
    scene = render(OBJECTS["cylinder"], orbit(*POSES[0]))
    depth = np.where(scene.mask, scene.depth, 0).astype(np.float32)  # the table gives no depth
    best = grasp_regions(scene.mask, depth=depth, intrinsics=intrinsics_of(scene))[0]
    assert best.has_3d and "no support plane" in best.reason
    np.testing.assert_allclose(best.approach_axis, np.asarray(best.position_m) / np.linalg.norm(best.position_m))
    # straight down on a 6 cm cylinder: the centre is assumed 3 cm behind its top
    assert abs(best.position_m[2] - (scene.center_m[2] - scene.height_m / 2 + 0.03)) < 0.005


def test_the_benchmark_scene_gives_the_expected_grasp(capsys):
    """python -m lens_ros.bench.grasp runs (one timed call per case here) on a scene whose
    grasp is known: the 40 mm side plus 10 mm margins, half-way up the 80 mm box at 0.6 m."""
    from lens_ros.bench.grasp import report

    report(runs=1)
    rows = [line for line in capsys.readouterr().out.splitlines() if "x" in line and " mm " in line]
    assert len(rows) == 4
    for row in rows[:2]:  # at 1280x720 the pixel grid rounds the width to 60 or 61 mm
        assert re.search(r"width 6[01] mm at z 0\.560 m$", row), row
    for row in rows[2:]:
        assert row.endswith("wider than max_opening_m (80 mm): no 3-D grasp"), row


# --- implausible input: 2-D grasps with a reason, never a non-finite number ----------------------

FLOAT32_MAX = float(np.finfo(np.float32).max)


def numbers_of(g: GraspCandidate) -> list[float]:
    """Every number of a candidate that a GraspRegion message carries (float32 on the wire)."""
    values = [*g.center_px, g.angle_rad, g.width_px, g.length_px, g.quality, g.width_m, g.object_width_m]
    if g.has_3d:
        values += [*g.position_m, *g.closing_axis, *g.approach_axis]
    return values


def assert_publishable(grasps):
    for g in grasps:
        bad = [v for v in numbers_of(g) if not (math.isfinite(v) and abs(v) <= FLOAT32_MAX)]
        assert not bad, f"non-finite (or beyond float32) numbers {bad} in {g}"


@functools.cache
def box_scene():
    """One rendered scene for the tests below (read only): rendering takes a tenth of a second."""
    return render(OBJECTS["box"], orbit(*POSES[1]))


def assert_planar_with_reason(scene, grasps, reason):
    planar = grasp_regions(scene.mask)
    # the same regions up to rounding (with depth the work area around the mask is larger)
    np.testing.assert_allclose([g.center_px for g in grasps], [g.center_px for g in planar], rtol=0, atol=1e-9)
    assert not any(g.has_3d for g in grasps)
    assert all(reason in g.reason for g in grasps), grasps[0].reason
    assert_publishable(grasps)


@pytest.mark.parametrize("fx, fy, cx, cy", [
    (1e-300, 1e-300, 319.5, 239.5),  # used to raise "negative dimensions are not allowed"
    (1e300, 1e300, 319.5, 239.5),  # used to give a 3-D grasp with its centre at v = -2e297
    (1e-6, 1e-6, 319.5, 239.5),
    (1e9, 1e9, 319.5, 239.5),
    (600, 600, 1e6, 239.5),  # principal point far off the image
    (600, 600, 319.5, -1e300),
    (600, 1e-300, 319.5, 239.5),  # one axis is enough
], ids=["fx1e-300", "fx1e300", "fx1e-6", "fx1e9", "cx1e6", "cy-1e300", "fy1e-300"])
def test_implausible_intrinsics_give_2d_grasps_with_a_reason(fx, fy, cx, cy):
    scene = box_scene()
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=Intrinsics(fx, fy, cx, cy))
    assert_planar_with_reason(scene, grasps, "intrinsics are implausible for a 640x480 image")
    assert grasps[0].reason.endswith(": 2-D regions only")


def test_intrinsics_plausibility_bounds():
    """A pinhole image spans at least 1 degree along each axis and all its rays are less than
    89.5 degrees off the optical axis (a field of view under 179 degrees when centred)."""
    assert Intrinsics(600, 600, 319.5, 239.5).implausible_for(640, 480) == ""
    assert Intrinsics(600, 600, -1600, 1200).implausible_for(640, 480) == ""  # a crop far off-centre
    # 1 degree across 640 px: fx = 320 / tan(0.5 deg) = 36666.3 px
    assert Intrinsics(36_600, 36_600, 319.5, 239.5).implausible_for(640, 480) != ""  # 480 px: 0.75 deg
    assert Intrinsics(36_600, 27_400, 319.5, 239.5).implausible_for(640, 480) == ""
    assert Intrinsics(36_700, 27_400, 319.5, 239.5).implausible_for(640, 480) != ""
    # 179 degrees across 640 px: fx = 320 / tan(89.5 deg) = 2.79 px
    assert Intrinsics(2.9, 2.1, 319.5, 239.5).implausible_for(640, 480) == ""
    assert Intrinsics(2.7, 2.1, 319.5, 239.5).implausible_for(640, 480) != ""
    why = Intrinsics(1e-300, 600, 319.5, 239.5).implausible_for(640, 480)
    assert why == ("intrinsics are implausible for a 640x480 image (fx=1e-300 fy=600 cx=319.5 cy=239.5): "
                   "its rays in x reach 90.0 degrees off the optical axis (a pinhole camera's stay under 89.5)")
    why = Intrinsics(1e9, 1e9, 319.5, 239.5).implausible_for(640, 480)
    assert "it spans 3.67e-05 degrees in x (at least 1)" in why and "2.75e-05 degrees in y" in why


@pytest.mark.parametrize("value", [1e-38, 0.01, 1e6, 10.5])
def test_depth_outside_the_plausible_range_is_invalid(value):
    """1e-38 m everywhere used to give a 3-D grasp at the camera centre."""
    scene = box_scene()
    depth = np.full_like(scene.depth, value)
    grasps = grasp_regions(scene.mask, depth=depth, intrinsics=intrinsics_of(scene))
    total = int(scene.mask.sum())
    assert_planar_with_reason(scene, grasps, f"only 0 of {total} mask pixels have usable depth (need 50; "
                                             f"{total} outside min_depth_m..max_depth_m, 0.05..10 m): "
                                             "2-D regions only")


def test_the_depth_range_is_configurable_and_applies_to_millimetres():
    scene = box_scene()
    camera = intrinsics_of(scene)
    near = GraspConfig(max_depth_m=0.3, margin_m=0.005, max_opening_m=0.1)  # the scene is at 0.4-0.7 m
    grasps = grasp_regions(scene.mask, depth=depth_mm(scene), intrinsics=camera, config=near)
    assert not any(g.has_3d for g in grasps) and "0.05..0.3 m" in grasps[0].reason
    far = GraspConfig(min_depth_m=0.2, max_depth_m=1.0, margin_m=0.005, max_opening_m=0.1)
    check_3d(scene, grasp_regions(scene.mask, depth=depth_mm(scene), intrinsics=camera, config=far)[0],
             center_mm=5, angle_deg=5, width_mm=3)
    wide = np.full((480, 640), 65535, np.uint16)  # 65.5 m: the largest millimetre reading
    assert not grasp_regions(scene.mask, depth=wide, intrinsics=camera)[0].has_3d


@pytest.mark.parametrize("config", [
    dict(finger_width_m=1e300),  # used to give length_px = inf
    dict(max_opening_m=1e300, margin_m=1e300),  # used to give width_m = 1e300, inf as a float32
], ids=["finger_width", "opening"])
def test_3d_results_beyond_float32_become_2d_with_a_reason(config):
    """Defence in depth: a 3-D result is returned only when every number in it is a finite
    float32 (what GraspRegion carries); absurd but valid settings fall back to 2-D."""
    scene = render(OBJECTS["box"], orbit(*POSES[0]))  # straight down: the jaw pads' ends project far out
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics_of(scene),
                           config=GraspConfig(**config))
    assert_planar_with_reason(scene, grasps, "the 3-D estimate is unusable (")
    unusable = r"\((width_px|width_m|length_px)=[-\w.+]+ is not a finite float32\): 2-D regions only$"
    assert re.search(unusable, grasps[0].reason), grasps[0].reason


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_depth_m=0), "GraspConfig.min_depth_m must be positive and finite, got 0"),
    (dict(min_depth_m=-0.1), "GraspConfig.min_depth_m must be positive and finite, got -0.1"),
    (dict(max_depth_m=math.inf), "GraspConfig.max_depth_m must be positive and finite, got inf"),
    (dict(max_depth_m=math.nan), "GraspConfig.max_depth_m must be positive and finite, got nan"),
    (dict(max_depth_m="10"), "GraspConfig.max_depth_m must be positive and finite, got 10"),
    (dict(min_depth_m=2.0, max_depth_m=1.0),
     "GraspConfig.min_depth_m (2.0) must be below GraspConfig.max_depth_m (1.0)"),
    (dict(min_depth_m=1.0, max_depth_m=1.0),
     "GraspConfig.min_depth_m (1.0) must be below GraspConfig.max_depth_m (1.0)"),
    (dict(max_opening_m=math.inf), "GraspConfig.max_opening_m must be positive and finite, got inf"),
    (dict(margin_m=math.inf), "GraspConfig.margin_m must be >= 0 and finite, got inf"),
])
def test_grasp_config_refuses_bad_depth_ranges_and_infinite_sizes(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GraspConfig(**kwargs)


def test_depth_range_defaults():
    assert (GraspConfig().min_depth_m, GraspConfig().max_depth_m) == (0.05, 10.0)
