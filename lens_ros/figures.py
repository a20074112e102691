"""The README's grasp pictures, made without model weights (anyone can make them again):

    python -m lens_ros.figures [--out docs]

* ``grasp_regions.png``: the shipped photo (data/coffee.jpg) with the hand-made mask of the cup
  (data/coffee_cup_mask.png, traced by hand: data/README.md) and its 2-D grasp regions, drawn by
  ``lens-grasp``'s own function (``cli.grasps_on_mask``): the same picture as
  ``lens-grasp --image coffee.jpg --mask coffee_cup_mask.png``.
* ``grasp_regions_3d.png``: RGB-D scenes rendered by ``lens_ros.synthetic_scenes`` (a mug and a
  box on a table, exact depth, known intrinsics), with the renderer's ground-truth mask and the
  3-D grasp regions computed from mask + depth + intrinsics; per scene the shaded RGB and the
  depth as a colour map, each with the grasps and the best one's approach arrow.

Both are deterministic. ``--rasterise-mask`` rewrites data/coffee_cup_mask.png from the traced
polygon (data/coffee_cup_mask.json), the mask's one source.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np

from lens_ros.synthetic_scenes import Box, Mug

DATA = Path(__file__).resolve().parent / "data"
PHOTO = DATA / "coffee.jpg"
CUP_POLYGON = DATA / "coffee_cup_mask.json"
CUP_MASK = DATA / "coffee_cup_mask.png"
PHOTO_FIGURE = "grasp_regions.png"
SCENES_FIGURE = "grasp_regions_3d.png"
CUP_LABEL = "the coffee cup: hand-made mask (traced polygon), 2-D grasp regions"

# The rendered scenes (title, object, camera pose as synthetic_scenes.orbit's distance m, elevation
# and azimuth degrees): what a wrist camera 40-50 cm from the object sees. fx = 600 px at 480x360
# is a 44 degree horizontal field of view, a zoomed-in RGB-D camera; the objects fill enough of
# the picture for the jaws to be seen. The mug's handle is side-on (yaw = azimuth + 90 degrees),
# as in test/test_grasp.py; the box is elongated, so it gets several grasps along its length.
CAMERA = {"width": 480, "height": 360, "fx": 600.0, "fy": 600.0}
SCENES = (
    ("a mug on a table", Mug(radius=0.035, yaw=math.radians(30 + 90)), (0.40, 60, 30)),
    ("a box on a table", Box((0.13, 0.05, 0.07), yaw=0.6), (0.5, 55, 200)),
)
# At most three grasps a scene (the box would get five): enough to show several along a long
# object, few enough for their legend to leave the object in view.
SCENE_GRASPS = 3
DEPTH_COLOURMAP = cv2.COLORMAP_TURBO
COLOUR_BAR_PX = 14
COLOUR_BAR_MARGIN_PX = 70  # the bar and its labels, right of the depth panel
# Palette PNGs (256 colours, no dithering) keep the pictures at about a third of their RGB size.
PALETTE_COLOURS = 256


def rasterise_polygon(record: dict) -> np.ndarray:
    """The traced polygon (``coffee_cup_mask.json``) as a mono8 mask, 255 inside, as shipped."""
    mask = np.zeros((record["height"], record["width"]), np.uint8)
    cv2.fillPoly(mask, [np.int32(record["vertices"])], 255)
    return mask


def photo_figure() -> np.ndarray:
    """The shipped photo with the hand-made cup mask and its 2-D grasp regions (RGB)."""
    from lens_ros.cli import grasps_on_mask, read_mask, read_rgb

    rgb = read_rgb(str(PHOTO))
    _, overlay, _, _ = grasps_on_mask(rgb, read_mask(str(CUP_MASK), rgb.shape), label=CUP_LABEL)
    return overlay


def depth_colour(depth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Depth as a colour map (RGB, near = red, far = blue; no reading = black) and its range (m)."""
    valid = depth > 0
    near, far = float(depth[valid].min()), float(depth[valid].max())
    scaled = np.zeros(depth.shape, np.uint8)
    scaled[valid] = np.round(255 * (far - depth[valid]) / max(far - near, 1e-6)).astype(np.uint8)
    coloured = cv2.cvtColor(cv2.applyColorMap(scaled, DEPTH_COLOURMAP), cv2.COLOR_BGR2RGB)
    coloured[~valid] = 0
    return coloured, near, far


def _with_colour_bar(panel: np.ndarray, near: float, far: float) -> np.ndarray:
    """The panel with a vertical colour bar on a black margin at its right, the depth at its ends
    written beside it (near at the top)."""
    height = panel.shape[0]
    margin = np.zeros((height, COLOUR_BAR_MARGIN_PX, 3), np.uint8)
    ramp = np.linspace(255, 0, height - 16).astype(np.uint8)[:, None].repeat(COLOUR_BAR_PX, axis=1)
    margin[8:height - 8, 4:4 + COLOUR_BAR_PX] = cv2.cvtColor(cv2.applyColorMap(ramp, DEPTH_COLOURMAP),
                                                             cv2.COLOR_BGR2RGB)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    for lines, y in (((f"{near:.2f} m", "near"), 22), ((f"{far:.2f} m", "far"), height - 28)):
        for i, text in enumerate(lines):
            cv2.putText(margin, text, (COLOUR_BAR_PX + 8, y + 16 * i), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([panel, margin], axis=1)


def scene_row(title: str, obj, pose) -> np.ndarray:
    """One rendered scene, side by side: RGB with mask and 3-D grasps, depth with the grasps."""
    from lens_ros.grasp import GraspConfig, Intrinsics, grasp_regions
    from lens_ros.synthetic_scenes import colour_image, orbit, render
    from lens_ros.visualize import draw_regions

    scene = render(obj, orbit(*pose, **CAMERA))
    intrinsics = Intrinsics(*scene.intrinsics)
    grasps = grasp_regions(scene.mask, depth=scene.depth, intrinsics=intrinsics,
                           config=GraspConfig(num_candidates=SCENE_GRASPS))
    fx, fy, cx, cy = scene.intrinsics
    # alpha 0: the mask outlined only, the rendered colours (the shading) stay as they are
    rgb = draw_regions(colour_image(scene), scene.mask, grasps=grasps, alpha=0.0, labels=True, intrinsics=intrinsics,
                       caption=f"{title} (rendered, ground-truth mask): 3-D grasps, camera frame")
    depth, near, far = depth_colour(scene.depth)
    depth = draw_regions(depth, grasps=grasps, intrinsics=intrinsics,
                         caption=f"depth; fx={fx:.0f} fy={fy:.0f} cx={cx:.1f} cy={cy:.1f} px; arrow: approach of 1")
    return np.concatenate([rgb, _with_colour_bar(depth, near, far)], axis=1)


def scenes_figure() -> np.ndarray:
    rows = [scene_row(*scene) for scene in SCENES]
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([rows[0], *(part for row in rows[1:] for part in (gap, row))], axis=0)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """A palette PNG (small, deterministic: median-cut colours, no dithering)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb).quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT,
                                          dither=Image.Dither.NONE)
    image.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens_ros.figures",
                                     description="Write the README's grasp pictures, without model weights.")
    parser.add_argument("--out", default="docs", help=f"folder of {PHOTO_FIGURE} and {SCENES_FIGURE} (default docs)")
    parser.add_argument("--rasterise-mask", action="store_true",
                        help=f"rewrite {CUP_MASK.name} from {CUP_POLYGON.name} (after editing the polygon) and stop")
    args = parser.parse_args(argv)
    if args.rasterise_mask:
        cv2.imwrite(str(CUP_MASK), rasterise_polygon(json.loads(CUP_POLYGON.read_text())))
        print(f"{CUP_MASK} written from {CUP_POLYGON}")
        return 0
    out = Path(args.out)
    write_png(out / PHOTO_FIGURE, photo_figure())
    write_png(out / SCENES_FIGURE, scenes_figure())
    print(f"{out / PHOTO_FIGURE} and {out / SCENES_FIGURE} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
