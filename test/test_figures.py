"""The README's grasp pictures (lens_ros.figures), the hand-made cup mask they use, and the
shaded RGB of the synthetic scenes."""

import json

import cv2
import numpy as np

from depth_scenes import Box, Mug, camera_points, colour_image, orbit, render

from lens_ros import figures
from lens_ros.cli import grasp_main

MAX_FIGURE_BYTES = 300_000


def test_the_shipped_cup_mask_is_its_traced_polygon_rasterised():
    record = json.loads(figures.CUP_POLYGON.read_text())
    assert "by hand" in record["made_by"] and "not a model output" in record["made_by"]
    assert 20 <= len(record["vertices"]) <= 60
    shipped = cv2.imread(str(figures.CUP_MASK), cv2.IMREAD_UNCHANGED)
    photo = cv2.imread(str(figures.PHOTO))
    assert shipped.dtype == np.uint8 and shipped.shape == photo.shape[:2] == (record["height"], record["width"])
    assert set(np.unique(shipped)) == {0, 255}
    np.testing.assert_array_equal(shipped, figures.rasterise_polygon(record))
    # One solid part (the cup with its handle), about a fifth of the photo, clear of the border.
    count, _ = cv2.connectedComponents(shipped)
    assert count == 2 and 0.15 < (shipped > 0).mean() < 0.3
    assert not (shipped[0].any() or shipped[-1].any() or shipped[:, 0].any() or shipped[:, -1].any())


def test_figures_are_written_small_and_deterministic(tmp_path, capsys):
    assert figures.main(["--out", str(tmp_path / "a")]) == 0
    assert figures.main(["--out", str(tmp_path / "b")]) == 0
    assert "written" in capsys.readouterr().out
    for name in (figures.PHOTO_FIGURE, figures.SCENES_FIGURE):
        data = (tmp_path / "a" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < MAX_FIGURE_BYTES, (name, len(data))
        assert data == (tmp_path / "b" / name).read_bytes(), name
    photo = cv2.imread(str(figures.PHOTO))
    assert cv2.imread(str(tmp_path / "a" / figures.PHOTO_FIGURE)).shape == photo.shape
    scenes = cv2.imread(str(tmp_path / "a" / figures.SCENES_FIGURE))
    rows, (height, width) = len(figures.SCENES), (figures.CAMERA["height"], figures.CAMERA["width"])
    assert scenes.shape == (rows * height + (rows - 1) * 4, 2 * width + figures.COLOUR_BAR_MARGIN_PX, 3)


def test_the_photo_figure_is_what_lens_grasp_draws(tmp_path, capsys):
    assert grasp_main(["--image", str(figures.PHOTO), "--mask", str(figures.CUP_MASK), "--label",
                       figures.CUP_LABEL, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    overlay = cv2.imread(str(tmp_path / "overlay.png"))[:, :, ::-1]
    np.testing.assert_array_equal(figures.photo_figure(), overlay)


def test_scene_rows_draw_3d_grasps_on_rgb_and_depth():
    row = figures.scene_row(*figures.SCENES[0])
    width = figures.CAMERA["width"]
    rgb, depth = row[:, :width], row[:, width:2 * width]
    assert (depth == 0).all(axis=-1).mean() < 0.05  # every pixel sees the table or the mug
    # The grasp colours (yellow jaws, magenta approach arrow) on both panels.
    for panel in (rgb, depth):
        assert (np.abs(panel.astype(int) - (255, 230, 0)).sum(axis=-1) < 30).sum() > 50
        assert (np.abs(panel.astype(int) - (255, 0, 255)).sum(axis=-1) < 30).sum() > 20


def test_colour_image_shades_object_and_table_apart():
    scene = render(Mug(radius=0.035), orbit(0.5, 60, 30, width=320, height=240, fx=400, fy=400))
    rgb = colour_image(scene)
    assert rgb.dtype == np.uint8 and rgb.shape == (240, 320, 3)
    obj, table = rgb[scene.mask].astype(float), rgb[~scene.mask & (scene.depth > 0)].astype(float)
    assert (obj[:, 2] > obj[:, 0]).mean() > 0.95  # blue
    assert (table[:, 0] > table[:, 2]).mean() > 0.99  # wood
    assert len(np.unique(obj, axis=0)) > 20  # shaded, not flat
    np.testing.assert_array_equal(rgb, colour_image(scene))
    # A box's top (facing up, the light comes from above) is lighter than its sides.
    box = render(Box((0.1, 0.1, 0.05)), orbit(0.5, 50, 0, width=320, height=240, fx=400, fy=400))
    shade = colour_image(box).astype(float).sum(axis=-1)
    height = (camera_points(box) @ box.camera.rotation.T + box.camera.eye)[..., 2]  # world z
    top, sides = box.mask & (np.abs(height - 0.05) < 0.001), box.mask & (height < 0.045)
    assert top.sum() > 500 and sides.sum() > 500
    assert shade[top].mean() > shade[sides].mean() + 30
