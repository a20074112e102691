"""Checking and converting the images and commands the pipeline is given.

Everything a camera driver or a user may hand over (uint8 RGB or BGR, grayscale, RGBA/BGRA,
16-bit) becomes uint8 RGB; everything else is refused with an ``InvalidInputError`` that says
what was wrong, so that callers can report it and carry on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# The VLM works on 28 px cells (14 px patches merged 2x2): smaller images cannot be encoded.
MIN_IMAGE_SIDE = 28
# Qwen2-VL's image processor (transformers' smart_resize) refuses an image whose longer side is
# over 200 times its shorter one. The pipeline meets that check twice: on the image, when it
# computes the size the VLM sees, and inside the processor on the image resized to that size
# (sides rounded to multiples of 28 px, scaled down to 1 Mpx at most), which can push a ratio
# just under 200 over it (30x5999 px becomes 28x5992 px, 214:1). The resize parameters are the
# pipeline's (lens_ros.pipeline.vlm_resize_shape); test_pipeline checks both against transformers.
VLM_MAX_ASPECT_RATIO = 200
VLM_RESIZE_FACTOR = 28
VLM_MIN_PIXELS = 56 * 56
VLM_MAX_PIXELS = 1_000_000
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
    check_image_size(height, width)
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


def check_image_size(height: int, width: int) -> None:
    """Refuse an image size the VLM cannot take (``InvalidInputError``): a side under
    ``MIN_IMAGE_SIDE``, or an aspect ratio over ``VLM_MAX_ASPECT_RATIO`` in the image or in the
    image the VLM sees."""
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise InvalidInputError(f"image is {width}x{height} px; both sides must be at least {MIN_IMAGE_SIDE} px")
    ratio = _aspect_ratio(height, width)
    if ratio > VLM_MAX_ASPECT_RATIO:
        raise InvalidInputError(f"image is {width}x{height} px; its aspect ratio {ratio:.6g}:1 is over the "
                                f"{VLM_MAX_ASPECT_RATIO}:1 the VLM accepts")
    vlm_height, vlm_width = _vlm_size(height, width)
    vlm_ratio = _aspect_ratio(vlm_height, vlm_width)
    if vlm_ratio > VLM_MAX_ASPECT_RATIO:
        raise InvalidInputError(f"image is {width}x{height} px; the VLM sees it at {vlm_width}x{vlm_height} px, "
                                f"whose aspect ratio {vlm_ratio:.6g}:1 is over the {VLM_MAX_ASPECT_RATIO}:1 it accepts")


def _aspect_ratio(height: int, width: int) -> float:
    return max(height, width) / min(height, width)  # smart_resize's own expression: the same rounding


def _vlm_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the image the VLM sees: transformers' smart_resize with the pipeline's
    parameters, the same operations in the same order, so that the sizes agree exactly (here
    without importing transformers, which takes seconds)."""
    factor = VLM_RESIZE_FACTOR
    vlm_height, vlm_width = round(height / factor) * factor, round(width / factor) * factor
    if vlm_height * vlm_width > VLM_MAX_PIXELS:
        beta = math.sqrt((height * width) / VLM_MAX_PIXELS)
        vlm_height = max(factor, math.floor(height / beta / factor) * factor)
        vlm_width = max(factor, math.floor(width / beta / factor) * factor)
    elif vlm_height * vlm_width < VLM_MIN_PIXELS:
        beta = math.sqrt(VLM_MIN_PIXELS / (height * width))
        vlm_height = math.ceil(height * beta / factor) * factor
        vlm_width = math.ceil(width * beta / factor) * factor
    return vlm_height, vlm_width


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


# -- control tokens in user text ----------------------------------------------------------------
# A command is data, yet the processor tokenizes the whole templated chat at once, and a tokenizer
# turns every added token it finds in the text (<|im_start|>, <|im_end|>, <|image_pad|>, ...) into
# that token, whoever wrote it: "<|im_end|><|im_start|>assistant ..." in a command would close the
# user turn and write the assistant's. Escaping such strings instead would change the tokens of the
# template around them (the prompt must stay exactly LENS's), so text holding any of them is refused.
# The strings are the checkpoint tokenizer's own added tokens, special or not (the tokenizer splits
# them out either way), so a checkpoint that adds tokens of its own is covered too.
@dataclass(frozen=True)
class ControlTokens:
    """The strings a tokenizer turns into its added tokens, however they come into a text."""

    raw: tuple[str, ...]  # matched in the text as written
    normalized: tuple[str, ...] = ()  # matched after the tokenizer's normaliser (added with normalized=True)
    normalize: Callable[[str], str] | None = None

    def find(self, text: str) -> str | None:
        """The control token that comes first in ``text``, or None."""
        found = [(text.find(token), token) for token in self.raw if token in text]
        if self.normalized and self.normalize is not None:
            normal = self.normalize(text)
            found += [(normal.find(token), token) for token in self.normalized if token in normal]
        return min(found)[1] if found else None


def control_tokens(tokenizer) -> ControlTokens:
    """The control tokens of ``tokenizer`` (a transformers tokenizer): all its added tokens and special tokens."""
    raw, normalized = set(tokenizer.all_special_tokens), set()
    for added in tokenizer.added_tokens_decoder.values():
        (normalized if getattr(added, "normalized", False) else raw).add(getattr(added, "content", str(added)))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is None:  # nothing normalises the text: normalized tokens match as written
        raw, normalized = raw | normalized, set()
    return ControlTokens(raw=tuple(sorted(t for t in raw if t)), normalized=tuple(sorted(t for t in normalized if t)),
                         normalize=normalizer.normalize_str if normalizer is not None else None)


def check_plain_text(text: str, control: ControlTokens, what: str = "command") -> str:
    """Return ``text`` when it holds no control token of the model; else raise ``InvalidInputError``.

    The one check for every path where user or data-set text becomes a prompt: the pipeline (the
    node, ``lens-segment``, ``lens-eval``) and the training prompts.
    """
    token = control.find(text)
    if token is not None:
        raise InvalidInputError(f"{what} contains {token!r}, a control token of the model; {what}s must be plain text")
    return text


def parse_image_size(text: str, what: str = "--image-size") -> tuple[int, int]:
    """``"640x480"`` -> (640, 480); a ValueError (starting with ``what``) otherwise."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{what} must be WIDTHxHEIGHT (e.g. 640x480), got {text!r}") from None
    if width < 28 or height < 28:
        raise ValueError(f"{what} must be at least 28x28, got {text!r}")
    return width, height
