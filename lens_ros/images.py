"""Checking and converting the images and commands the pipeline is given.

Everything a camera driver or a user may hand over (uint8 RGB or BGR, grayscale, RGBA/BGRA,
16-bit) becomes uint8 RGB; everything else is refused with an ``InvalidInputError`` that says
what was wrong, so that callers can report it and carry on.
"""

from __future__ import annotations

import cv2
import numpy as np

# The VLM works on 28 px cells (14 px patches merged 2x2): smaller images cannot be encoded.
MIN_IMAGE_SIDE = 28
DEFAULT_MAX_COMMAND_CHARS = 512


class InvalidInputError(ValueError):
    """An image or command the pipeline cannot use; the message names the problem."""


def to_rgb8(image, bgr: bool = False) -> np.ndarray:
    """Return ``image`` as a contiguous uint8 (H, W, 3) RGB array.

    Accepts (H, W) or (H, W, 1) grayscale, (H, W, 3) colour and (H, W, 4) colour with alpha
    (alpha dropped), as uint8 or uint16 (scaled to 8 bits). ``bgr`` says the colour channels
    are in OpenCV's BGR(A) order.
    """
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise InvalidInputError(f"image must have 2 or 3 dimensions (H, W[, C]), got shape {image.shape}")
    if image.size == 0:
        raise InvalidInputError(f"image is empty (shape {image.shape})")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"image must have 1, 3 or 4 channels, got {image.shape[2]} (shape {image.shape})")
    height, width = image.shape[:2]
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise InvalidInputError(f"image is {width}x{height} px; both sides must be at least {MIN_IMAGE_SIDE} px")
    if image.dtype == np.uint16:
        # Round to nearest: 65535 -> 255, 0 -> 0, spread evenly in between.
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InvalidInputError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    # OpenCV's conversions: numpy copies of channel-reversed or alpha-dropping views are several
    # times slower (about 15-20 ms against 3 ms for a 1080p frame).
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(image.reshape(height, width)), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(image)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)


def check_command(command, max_chars: int = DEFAULT_MAX_COMMAND_CHARS) -> str:
    """Return the command with surrounding whitespace removed, or refuse it."""
    if not isinstance(command, str):
        raise InvalidInputError(f"command must be a string, got {type(command).__name__}")
    text = command.strip()
    if not text:
        raise InvalidInputError("command is empty" if not command else "command is only whitespace")
    if len(text) > max_chars:
        raise InvalidInputError(f"command is {len(text)} characters long; the limit is {max_chars}")
    return text
