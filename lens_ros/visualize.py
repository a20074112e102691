"""Drawing a ``SegmentationResult`` over its image (for lens-segment and the node's overlay)."""

from __future__ import annotations

import cv2
import numpy as np

MASK_COLOUR = (255, 64, 32)  # RGB
BOX_COLOUR = (40, 220, 40)
TEXT_COLOUR = (255, 255, 255)
GRASP_COLOUR = (30, 144, 255)
BEST_GRASP_COLOUR = (255, 230, 0)


def draw_overlay(rgb: np.ndarray, result, alpha: float = 0.5) -> np.ndarray:
    """Return a copy of ``rgb`` with the mask tinted, the box drawn and the command written."""
    out = rgb.copy()
    height, width = out.shape[:2]
    if result.mask is not None and result.mask.shape == (height, width) and result.mask.any():
        tint = np.array(MASK_COLOUR, dtype=np.float32)
        region = out[result.mask].astype(np.float32)
        out[result.mask] = np.clip(region * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8)
        contours, _ = cv2.findContours(result.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, MASK_COLOUR, max(1, round(min(height, width) / 300)))
    thickness = max(1, round(min(height, width) / 200))
    if result.box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in result.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
    grasps = getattr(result, "grasps", None) or []
    for grasp in reversed(grasps):  # the best (first) one drawn last, on top
        _draw_grasp(out, grasp, thickness, best=grasp is grasps[0])
    _draw_caption(out, _caption(result))
    return out


def _caption(result) -> str:
    if result.error:
        return f"{result.command} -> error: {result.error}"
    if not result.found:
        return f"{result.command} -> not found"
    return f"{result.command} (score {result.score:.2f})"


def _draw_caption(out: np.ndarray, text: str) -> None:
    height, width = out.shape[:2]
    scale = max(0.4, min(height, width) / 900)
    thickness = max(1, round(scale * 2))
    text = text if len(text) <= 90 else text[:87] + "..."
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(out, (0, 0), (min(width, tw + 12), th + baseline + 12), (0, 0, 0), -1)
    cv2.putText(out, text, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOUR, thickness, cv2.LINE_AA)


def _draw_grasp(out: np.ndarray, grasp, thickness: int, best: bool = False) -> None:
    """A parallel-jaw grasp: the two jaws (thick, across the closing direction) joined by the
    opening line; the best grasp in its own colour."""
    (u, v), angle = grasp.center_px, grasp.angle_rad
    closing = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-closing[1], closing[0]])
    center = np.array([u, v], dtype=np.float64)
    half_open, half_jaw = closing * grasp.width_px / 2, across * grasp.length_px / 2
    colour = BEST_GRASP_COLOUR if best else GRASP_COLOUR
    weight = thickness + 1 if best else thickness

    def point(p):
        return int(round(p[0])), int(round(p[1]))

    cv2.line(out, point(center - half_open), point(center + half_open), colour, max(1, weight // 2), cv2.LINE_AA)
    for side in (-1, 1):
        jaw = center + side * half_open
        cv2.line(out, point(jaw - half_jaw), point(jaw + half_jaw), colour, weight + 1, cv2.LINE_AA)
    cv2.circle(out, point(center), weight + 1, colour, -1, cv2.LINE_AA)
