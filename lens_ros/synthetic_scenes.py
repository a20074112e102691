"""Synthetic RGB-D scenes with exact ground truth: one object on a table, ray cast exactly.

A pinhole camera looks at the table plane (world z = 0, z up) with a box, a cylinder or a mug
(a hollow cylinder with a handle) standing on it. Every pixel's ray (through the pixel centre,
integer (u, v)) is intersected analytically with the table and the object's surfaces; the
nearest hit gives the depth (the camera-frame z, as depth cameras report it) and whether the
pixel belongs to the object. Ground truth comes from the object's parameters, not the render.
``colour_image`` shades a rendered scene into an RGB image (for figures: the grasp code reads
only depth and mask).

The grasp tests (test/test_grasp.py, through test/depth_scenes.py) check grasp_regions against
these scenes; ``lens_ros.figures`` draws the README's 3-D grasp picture from one. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

UP = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class Camera:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    eye: tuple
    target: tuple

    @property
    def rotation(self) -> np.ndarray:
        """Columns: the camera's x (right), y (down), z (forward) axes in the world."""
        z = np.subtract(self.target, self.eye).astype(np.float64)
        z /= np.linalg.norm(z)
        up = UP if abs(z @ UP) < 0.999 else np.array([0.0, 1.0, 0.0])  # straight down: any horizontal
        x = np.cross(z, up)
        x /= np.linalg.norm(x)
        return np.column_stack((x, np.cross(z, x), z))

    def to_camera(self, point_world) -> np.ndarray:
        return self.rotation.T @ (np.asarray(point_world, dtype=np.float64) - np.asarray(self.eye))

    def direction_to_camera(self, vector_world) -> np.ndarray:
        return self.rotation.T @ np.asarray(vector_world, dtype=np.float64)


def look_at_camera(eye, target=(0.0, 0.0, 0.0), width=640, height=480, fx=600.0, fy=600.0) -> Camera:
    return Camera(width, height, fx, fy, (width - 1) / 2, (height - 1) / 2, tuple(map(float, eye)),
                  tuple(map(float, target)))


def orbit(distance: float, elevation_deg: float, azimuth_deg: float, target=(0.0, 0.0, 0.04), **kwargs) -> Camera:
    """A camera ``distance`` from ``target``, looking at it from ``elevation_deg`` above the table."""
    el, az = np.radians(elevation_deg), np.radians(azimuth_deg)
    offset = distance * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return look_at_camera(np.add(target, offset), target, **kwargs)


# Views from above (the object's top must be visible) at 0.5-0.8 m, as a robot sees its table.
POSES = [(0.6, 90, 0), (0.55, 65, 30), (0.7, 50, 150), (0.65, 40, 250), (0.8, 35, 300)]


@dataclass(frozen=True)
class Box:
    size: tuple  # (sx, sy, sz) metres, sx along the object's local x
    position: tuple = (0.0, 0.0)
    yaw: float = 0.0


@dataclass(frozen=True)
class Cylinder:
    radius: float
    height: float
    position: tuple = (0.0, 0.0)
    yaw: float = 0.0


@dataclass(frozen=True)
class Mug:
    """A hollow cylinder open at the top, with a solid handle on its local +x side."""

    radius: float = 0.04
    height: float = 0.095
    wall: float = 0.005
    bottom: float = 0.008
    handle_reach: float = 0.025
    handle_thickness: float = 0.012
    position: tuple = (0.0, 0.0)
    yaw: float = 0.0


@dataclass
class Scene:
    depth: np.ndarray  # (H, W) float32 metres, 0 where the ray hits nothing
    mask: np.ndarray  # (H, W) bool, the object's pixels
    camera: Camera
    center_m: np.ndarray  # footprint centre (the mug's body) at half the height, camera frame
    narrow_axis: np.ndarray  # horizontal unit axis across the narrowest extent, camera frame
    width_m: float  # extent along narrow_axis (the mug: its body's diameter)
    height_m: float
    table_normal: np.ndarray  # unit, up, camera frame

    @property
    def intrinsics(self) -> tuple:
        c = self.camera
        return c.fx, c.fy, c.cx, c.cy


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _slab(origin, direction, lo, hi) -> np.ndarray:
    """Entry distance of rays into an axis-aligned box (inf where they miss it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (np.asarray(lo) - origin) / direction
        t2 = (np.asarray(hi) - origin) / direction
    near = np.nanmax(np.minimum(t1, t2), axis=-1)
    far = np.nanmin(np.maximum(t1, t2), axis=-1)
    return np.where((near <= far) & (near > 0), near, np.inf)


def _cylinder_side(origin, direction, radius, z_lo, z_hi, root: int) -> np.ndarray:
    """Distance to a vertical cylinder's side (root -1: entering, +1: leaving), inf on a miss."""
    a = direction[:, 0] ** 2 + direction[:, 1] ** 2
    b = 2 * (origin[0] * direction[:, 0] + origin[1] * direction[:, 1])
    c = origin[0] ** 2 + origin[1] ** 2 - radius ** 2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b + root * np.sqrt(disc)) / (2 * a)
    z = origin[2] + t * direction[:, 2]
    return np.where((disc >= 0) & (t > 0) & (z >= z_lo) & (z <= z_hi), t, np.inf)


def _disc(origin, direction, z, r_lo, r_hi) -> np.ndarray:
    """Distance to the horizontal annulus r_lo <= rho <= r_hi at height z, inf on a miss."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (z - origin[2]) / direction[:, 2]
    rho = np.hypot(origin[0] + t * direction[:, 0], origin[1] + t * direction[:, 1])
    return np.where((t > 0) & (rho >= r_lo) & (rho <= r_hi), t, np.inf)


def _object_hits(obj, origin, direction) -> np.ndarray:
    if isinstance(obj, Box):
        sx, sy, sz = obj.size
        return _slab(origin, direction, (-sx / 2, -sy / 2, 0.0), (sx / 2, sy / 2, sz))
    if isinstance(obj, Cylinder):
        return np.minimum(_cylinder_side(origin, direction, obj.radius, 0.0, obj.height, -1),
                          _disc(origin, direction, obj.height, 0.0, obj.radius))
    inner = obj.radius - obj.wall
    handle = _slab(origin, direction, (obj.radius - obj.wall, -obj.handle_thickness / 2, 0.2 * obj.height),
                   (obj.radius + obj.handle_reach, obj.handle_thickness / 2, 0.8 * obj.height))
    return np.minimum.reduce([
        _cylinder_side(origin, direction, obj.radius, 0.0, obj.height, -1),  # outside of the wall
        _disc(origin, direction, obj.height, inner, obj.radius),  # rim
        _cylinder_side(origin, direction, inner, obj.bottom, obj.height, +1),  # inside of the wall
        _disc(origin, direction, obj.bottom, 0.0, inner),  # inside bottom
        handle])


def render(obj, camera: Camera) -> Scene:
    rotation = camera.rotation
    us, vs = np.meshgrid(np.arange(camera.width), np.arange(camera.height))
    # Ray directions with camera-frame z = 1: the hit distance t is the depth itself.
    rays = np.stack(((us - camera.cx) / camera.fx, (vs - camera.cy) / camera.fy, np.ones(us.shape)), -1)
    rays_world = rays.reshape(-1, 3) @ rotation.T
    eye = np.asarray(camera.eye)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_table = np.where(rays_world[:, 2] < 0, -eye[2] / rays_world[:, 2], np.inf)
    to_local = _yaw_matrix(obj.yaw).T
    origin = to_local @ (eye - np.array([obj.position[0], obj.position[1], 0.0]))
    t_object = _object_hits(obj, origin, rays_world @ to_local.T)
    mask = t_object < t_table
    depth = np.minimum(t_object, t_table)
    depth[~np.isfinite(depth)] = 0
    if isinstance(obj, Box):
        local_narrow = np.array([1.0, 0.0, 0.0] if obj.size[0] <= obj.size[1] else [0.0, 1.0, 0.0])
    elif isinstance(obj, Mug):  # across the body, perpendicular to the handle
        local_narrow = np.array([0.0, 1.0, 0.0])
    else:  # a cylinder has no narrow axis: any horizontal one
        local_narrow = np.array([1.0, 0.0, 0.0])
    height = obj.size[2] if isinstance(obj, Box) else obj.height
    width = min(obj.size[:2]) if isinstance(obj, Box) else 2 * obj.radius
    shape = (camera.height, camera.width)
    return Scene(depth=depth.reshape(shape).astype(np.float32), mask=mask.reshape(shape), camera=camera,
                 center_m=camera.to_camera([obj.position[0], obj.position[1], height / 2]),
                 narrow_axis=camera.direction_to_camera(_yaw_matrix(obj.yaw) @ local_narrow), width_m=width,
                 height_m=height, table_normal=camera.direction_to_camera(UP))


def degrade(scene: Scene, sigma_m: float = 0.002, invalid_fraction: float = 0.05, seed: int = 0) -> Scene:
    """Gaussian depth noise on every valid pixel and a random share of pixels made invalid (0)."""
    rng = np.random.default_rng(seed)
    depth = scene.depth.copy()
    valid = depth > 0
    depth[valid] += rng.normal(0.0, sigma_m, int(valid.sum())).astype(np.float32)
    depth[rng.random(depth.shape) < invalid_fraction] = 0
    return replace(scene, depth=depth)


def depth_mm(scene: Scene) -> np.ndarray:
    return np.round(scene.depth * 1000).astype(np.uint16)


# Colours (RGB) and light of colour_image: a light wooden table with a 5 cm checker (it shows the
# perspective) and a blue object, lit from above, from behind the camera and a little from its
# right (camera frame: x right, z forward), so that the top and the two visible sides differ.
TABLE_RGB = ((205, 170, 125), (185, 150, 105))
OBJECT_RGB = (60, 110, 200)
BACKGROUND_RGB = (40, 40, 40)
CHECKER_M = 0.05
LIGHT_OFFSET_CAMERA = (0.4, 0.0, -0.7)  # added to the table normal
AMBIENT = 0.3


def camera_points(scene: Scene) -> np.ndarray:
    """(H, W, 3) camera-frame points of the scene's depth (z = 0 where the ray hit nothing)."""
    c = scene.camera
    us, vs = np.meshgrid(np.arange(c.width), np.arange(c.height))
    z = scene.depth.astype(np.float64)
    return np.stack(((us - c.cx) / c.fx * z, (vs - c.cy) / c.fy * z, z), -1)


def _surface_normals(points: np.ndarray) -> np.ndarray:
    """Unit normals (camera frame, towards the camera) from neighbouring points. Of the forward
    and backward difference the one with the smaller depth step is used, so that a surface's
    normal does not mix with the one behind a depth edge."""
    steps = []
    for axis in (1, 0):  # along u, then v
        forward = np.roll(points, -1, axis=axis) - points
        backward = points - np.roll(points, 1, axis=axis)
        steps.append(np.where(np.abs(forward[..., 2:]) <= np.abs(backward[..., 2:]), forward, backward))
    normals = np.cross(steps[0], steps[1])
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    facing_away = np.sum(normals * points, axis=-1) > 0
    normals[facing_away] *= -1
    return normals


def colour_image(scene: Scene) -> np.ndarray:
    """A uint8 (H, W, 3) RGB picture of the scene: Lambert-shaded table (checkered) and object.

    Shading uses normals estimated from the rendered depth and the table's own normal, so the
    picture shows exactly the geometry the depth holds. Deterministic (no noise)."""
    points = camera_points(scene)
    hit = scene.depth > 0
    normals = _surface_normals(points)
    table = hit & ~scene.mask
    normals[table] = scene.table_normal  # exact: the table is a plane
    light = scene.table_normal + np.asarray(LIGHT_OFFSET_CAMERA)
    light /= np.linalg.norm(light)
    lambert = AMBIENT + (1 - AMBIENT) * np.clip(normals @ light, 0, 1)
    world = points @ scene.camera.rotation.T + np.asarray(scene.camera.eye)
    square = (np.floor(world[..., 0] / CHECKER_M) + np.floor(world[..., 1] / CHECKER_M)).astype(int) % 2
    albedo = np.where(square[..., None] == 0, TABLE_RGB[0], TABLE_RGB[1]).astype(np.float64)
    albedo[scene.mask] = OBJECT_RGB
    rgb = albedo * lambert[..., None]
    rgb[~hit] = BACKGROUND_RGB
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
