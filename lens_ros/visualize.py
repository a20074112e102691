"""Drawing masks and grasp regions over their image (lens-segment, lens-grasp, the node's overlay,
the README figures).

``draw_overlay`` draws a ``SegmentationResult``; ``draw_regions`` draws any mask, box and grasps
(a mask given by hand, a rendered scene's), which is what ``draw_overlay`` does for a result.
"""

from __future__ import annotations

import cv2
import numpy as np

MASK_COLOUR = (255, 64, 32)  # RGB
BOX_COLOUR = (40, 220, 40)
TEXT_COLOUR = (255, 255, 255)
GRASP_COLOUR = (30, 144, 255)
BEST_GRASP_COLOUR = (255, 230, 0)
APPROACH_COLOUR = (255, 0, 255)
APPROACH_ARROW_M = 0.06  # length of the drawn approach arrow (3-D grasps), in the scene
MAX_TEXT_CHARS = 90
RANK_SCALE = 1.4  # a grasp's rank is one digit beside busy lines: larger than the captions
FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_overlay(rgb: np.ndarray, result, alpha: float = 0.5) -> np.ndarray:
    """Return a copy of ``rgb`` with the result's mask tinted, its box, grasps and command drawn."""
    return draw_regions(rgb, result.mask, box=result.box, grasps=getattr(result, "grasps", None) or [],
                        caption=_caption(result), alpha=alpha)


def draw_regions(rgb: np.ndarray, mask=None, box=None, grasps=(), caption: str = "", alpha: float = 0.5,
                 labels: bool = False, intrinsics=None) -> np.ndarray:
    """Return a copy of ``rgb`` (uint8 RGB) with ``mask`` tinted and outlined, ``box`` (x1, y1, x2,
    y2), ``grasps`` (best first, drawn on top) and ``caption`` drawn.

    ``labels``: each grasp's rank beside it and, at the bottom, a legend of ranks, centres and
    openings (``describe_grasp``). ``intrinsics`` (a ``lens_ros.grasp.Intrinsics``): the best
    grasp, when it is 3-D, also gets an arrow along its approach direction, ending at its centre
    (one arrow: several would hide the jaws).
    """
    out = rgb.copy()
    height, width = out.shape[:2]
    if mask is not None and mask.shape == (height, width) and mask.any():
        _draw_mask(out, mask, alpha)
    thickness = max(1, round(min(height, width) / 200))
    if box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
    grasps = list(grasps)
    for rank in reversed(range(len(grasps))):  # the best (first) one drawn last, on top
        _draw_grasp(out, grasps[rank], thickness, best=rank == 0)
        if intrinsics is not None and rank == 0 and grasps[0].has_3d:
            _draw_approach(out, grasps[rank], intrinsics, thickness)
        if labels:
            _draw_rank(out, grasps[rank], rank + 1)
    if caption:
        _draw_text_block(out, [caption], top=True)
    if labels and grasps:
        _draw_text_block(out, [f"{rank}: {describe_grasp(g)}" for rank, g in enumerate(grasps, 1)], top=False)
    return out


def describe_grasp(grasp) -> str:
    """One line: where the grasp is and how wide the jaws open (in metres when it is 3-D), and
    why it is degraded when it is."""
    if grasp.has_3d:
        x, y, z = grasp.position_m
        text = (f"centre ({x:+.3f}, {y:+.3f}, {z:.3f}) m, opening {grasp.width_m * 100:.1f} cm "
                f"(object {grasp.object_width_m * 100:.1f} cm)")
    else:
        u, v = grasp.center_px
        text = f"centre ({u:.0f}, {v:.0f}) px, opening {grasp.width_px:.0f} px"
    return f"{text}; {grasp.reason}" if grasp.reason else text


def _caption(result) -> str:
    if result.error:
        return f"{result.command} -> error: {result.error}"
    if not result.found:
        return f"{result.command} -> not found"
    return f"{result.command} (score {result.score:.2f})"


def _draw_mask(out: np.ndarray, mask: np.ndarray, alpha: float) -> None:
    height, width = out.shape[:2]
    tint = np.array(MASK_COLOUR, dtype=np.float32)
    region = out[mask].astype(np.float32)
    out[mask] = np.clip(region * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, MASK_COLOUR, max(1, round(min(height, width) / 300)))


def _text_scale(out: np.ndarray) -> tuple[float, int]:
    """Font scale and stroke for the image's size: legible from 320x240 to 1080p."""
    scale = max(0.4, min(out.shape[:2]) / 900)
    return scale, max(1, round(scale * 2))


def _draw_text_block(out: np.ndarray, lines: list[str], top: bool) -> None:
    """White lines on a black band at the top or bottom left, each cut to fit the image."""
    height, width = out.shape[:2]
    scale, thickness = _text_scale(out)
    lines = [_fit(line, width - 12, scale, thickness) for line in lines]
    (_, line_height), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    step = line_height + baseline + 4
    block_width = max(cv2.getTextSize(line, FONT, scale, thickness)[0][0] for line in lines) + 12
    y0 = 0 if top else height - step * len(lines) - 8
    cv2.rectangle(out, (0, y0), (min(width, block_width), y0 + step * len(lines) + 8), (0, 0, 0), -1)
    for i, line in enumerate(lines):
        cv2.putText(out, line, (6, y0 + 6 + line_height + i * step), FONT, scale, TEXT_COLOUR, thickness, cv2.LINE_AA)


def _fit(text: str, max_width: int, scale: float, thickness: int) -> str:
    """``text`` cut (with "...") to at most ``MAX_TEXT_CHARS`` and to ``max_width`` pixels."""
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS - 3] + "..."
    while len(text) > 4 and cv2.getTextSize(text, FONT, scale, thickness)[0][0] > max_width:
        text = text[:-4] + "..."
    return text


def _jaw_geometry(grasp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, half the opening (along the closing direction) and half a jaw (across it), in px."""
    closing = np.array([np.cos(grasp.angle_rad), np.sin(grasp.angle_rad)])
    across = np.array([-closing[1], closing[0]])
    center = np.array(grasp.center_px, dtype=np.float64)
    return center, closing * grasp.width_px / 2, across * grasp.length_px / 2


def _point(p) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _draw_grasp(out: np.ndarray, grasp, thickness: int, best: bool = False) -> None:
    """A parallel-jaw grasp: the two jaws (thick, across the closing direction) joined by the
    opening line; the best grasp in its own colour."""
    center, half_open, half_jaw = _jaw_geometry(grasp)
    colour = BEST_GRASP_COLOUR if best else GRASP_COLOUR
    weight = thickness + 1 if best else thickness
    cv2.line(out, _point(center - half_open), _point(center + half_open), colour, max(1, weight // 2), cv2.LINE_AA)
    for side in (-1, 1):
        jaw = center + side * half_open
        cv2.line(out, _point(jaw - half_jaw), _point(jaw + half_jaw), colour, weight + 1, cv2.LINE_AA)
    cv2.circle(out, _point(center), weight + 1, colour, -1, cv2.LINE_AA)


def _draw_approach(out: np.ndarray, grasp, intrinsics, thickness: int) -> None:
    """An arrow from ``APPROACH_ARROW_M`` back along the approach axis to the grasp centre: where
    the gripper comes from, as the camera sees it."""
    position, approach = np.asarray(grasp.position_m), np.asarray(grasp.approach_axis)
    start = position - approach * APPROACH_ARROW_M
    if start[2] <= 0:  # behind the camera: nothing to project
        return
    tail = intrinsics.project(start)
    cv2.arrowedLine(out, _point(tail), _point(grasp.center_px), APPROACH_COLOUR, thickness, cv2.LINE_AA,
                    tipLength=0.2)


def _draw_rank(out: np.ndarray, grasp, rank: int) -> None:
    """The grasp's rank (1 = best) past the end of its first jaw, outlined so it reads on any colour."""
    center, half_open, half_jaw = _jaw_geometry(grasp)
    scale, thickness = _text_scale(out)
    scale *= RANK_SCALE
    text = str(rank)
    (tw, th), _ = cv2.getTextSize(text, FONT, scale, thickness)
    reach = half_jaw + half_jaw / max(np.linalg.norm(half_jaw), 1e-9) * (th + 4)
    anchor = center + half_open + reach
    x = int(np.clip(anchor[0] - tw / 2, 0, out.shape[1] - tw))
    y = int(np.clip(anchor[1] + th / 2, th, out.shape[0] - 1))
    colour = BEST_GRASP_COLOUR if rank == 1 else GRASP_COLOUR
    cv2.putText(out, text, (x, y), FONT, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(out, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)
