"""The grasp tests' synthetic RGB-D scenes: they live in the package (lens_ros.synthetic_scenes),
where lens_ros.figures draws the README's 3-D grasp picture from them; this module keeps the
tests' import (``from depth_scenes import ...``) working."""

from lens_ros.synthetic_scenes import (  # noqa: F401 (re-exported for the tests)
    POSES,
    UP,
    Box,
    Camera,
    Cylinder,
    Mug,
    Scene,
    camera_points,
    colour_image,
    degrade,
    depth_mm,
    look_at_camera,
    orbit,
    render,
)
