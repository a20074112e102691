"""LENS prompt templates and parsing of the VLM's answer.

The VLM (Qwen2.5-VL, LENS-trained) is asked for the bounding box of the object a command
refers to. It answers with reasoning text that holds a box in absolute pixels of the image
it saw (the ``smart_resize``-d image), e.g. ``[12, 30, 200, 180]``,
``[{"bbox_2d": [12, 30, 200, 180], "label": "mug"}]`` or, with the CoT model,
``<think>...</think><answer>...</answer>``.

This module builds the chat messages for that question and turns the answer into a
:class:`ParsedAnswer`: the box in source-image pixels, or an explicit "not found" with the
reason. LENS itself falls back to ``[0, 0, 0, 0]`` when nothing parses; a robot must not act
on a made-up box, hence ``found``.

Standard library only: this runs in the ROS node, the trainer and the evaluator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "COT_TEMPLATE",
    "THINK_ANSWER_PATTERN",
    "ParsedAnswer",
    "user_prompt",
    "build_messages",
    "parse_box",
    "parse_answer",
    "has_think_format",
    "extract_think",
    "REASON_NO_BOX",
    "REASON_NOT_FINITE",
    "REASON_DEGENERATE",
    "REASON_OUTSIDE",
]

# Trailing space included: the released models were trained with exactly this string.
SYSTEM_PROMPT = "You are a helpful assistant. "

# Used by all RefCOCO and ReasonSeg LENS models.
USER_TEMPLATE = "Output the bounding box of the {expr} in the image."

# Used by the `_CoT` model. The sentences are joined with no space between them, as in training.
COT_TEMPLATE = (
    'Locate "{expr}", report the bbox coordinates in JSON format.'
    "Compare the difference between objects and find the most closely matched one."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the one bbox inside the interested object in JSON format."
    "i.e., <think>thinking process here</think>"
    "<answer>answer here</answer>"
)

# LENS's think-format reward pattern; LENS applies it with re.match (anchored at the start,
# trailing text allowed), see has_think_format.
THINK_ANSWER_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

# LENS's number: optional minus, digits, optional fraction (no '+', no '.5', no exponent, no nan).
_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"\s*,\s*"
# In LENS's order of preference. Whitespace is allowed around every number and comma (LENS
# allows it only after '[', '(' and ',' and before the closing bracket). Each number is
# delimited by a literal comma or bracket, so no two quantifiers compete for the same
# characters: the search is linear, even on megabytes of digits and brackets.
_BOX_PATTERNS = (
    re.compile(r"\[\s*" + _NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM + r"\s*\]"),
    re.compile(r"\(\s*" + _NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM + r"\s*\)"),
    re.compile(r"\(\s*" + _NUM + _SEP + _NUM + r"\s*\)" + _SEP + r"\(\s*" + _NUM + _SEP + _NUM + r"\s*\)"),
)
_THINK_TO_ANSWER = re.compile(r"</think>\s*<answer>")

REASON_NO_BOX = "no box in the answer"
REASON_NOT_FINITE = "box is not finite"
REASON_DEGENERATE = "degenerate box (x2 <= x1 or y2 <= y1)"
REASON_OUTSIDE = "box lies outside the image"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ParsedAnswer:
    """What the VLM answered.

    ``box`` is (x1, y1, x2, y2) in source-image pixels, clipped to [0, W] x [0, H], set only
    when ``found``. ``box_vlm`` is the box as written by the VLM (VLM-resized pixels, not
    rescaled, not clipped); it is set whenever a box parsed, even one rejected as degenerate
    or outside, because the box reward scores the raw box. ``reason`` is empty when found.
    """

    reasoning: str
    think: str | None
    found: bool
    box: Box | None
    box_vlm: Box | None
    reason: str = ""


def user_prompt(command: str, cot: bool = False) -> str:
    """The user text for ``command``, inserted as is (LENS's evaluation adds nothing to it)."""
    return (COT_TEMPLATE if cot else USER_TEMPLATE).format(expr=command)


def build_messages(command: str, cot: bool = False) -> list[dict]:
    """Chat messages for Qwen2.5-VL's ``apply_chat_template``: system prompt, then image + question.

    The image is a placeholder (``{"type": "image"}``); the processor gets the pixels
    separately. The system content is a list with one text item; the Qwen2-VL chat template
    renders it exactly as the plain string LENS's demo passes.
    """
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_prompt(command, cot)}]},
    ]


def _answer_part(text: str) -> str | None:
    """The text of the last <answer> block (up to </answer>, or the end when truncated)."""
    # The last block: a CoT model may quote the tags inside its thinking before answering.
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    return text[start:] if end < 0 else text[start:end]


def _first_box(text: str) -> Box | None:
    for pattern in _BOX_PATTERNS:
        match = pattern.search(text)
        if match is not None:
            return tuple(float(g) for g in match.groups())  # type: ignore[return-value]
    return None


def parse_box(text: str) -> Box | None:
    """The box in an answer as (x1, y1, x2, y2) floats, in the units written, or None.

    Forms, in this order of preference (as LENS): ``[a, b, c, d]`` (this covers Qwen's JSON
    ``[{"bbox_2d": [...]}]``), ``(a, b, c, d)``, ``(a, b), (c, d)`` (Qwen's
    ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``). Within a form the first one wins. When an
    ``<answer>`` block is present it is searched first, then the whole text. Numbers too large
    for a float come back as inf. Non-str input gives None.
    """
    if not isinstance(text, str):
        return None
    answer = _answer_part(text)
    if answer is not None:
        box = _first_box(answer)
        if box is not None:
            return box
    return _first_box(text)


def extract_think(text: str) -> str | None:
    """The stripped content of the first complete <think>...</think> block, or None."""
    if not isinstance(text, str):
        return None
    # str.find, not a lazy regex: a regex rescans to the end from every unclosed <think>.
    start = text.find("<think>")
    if start < 0:
        return None
    start += len("<think>")
    end = text.find("</think>", start)
    return None if end < 0 else text[start:end].strip()


def has_think_format(text: str) -> bool:
    """LENS's think-format reward test: ``THINK_ANSWER_PATTERN.match(text)`` (re.match, DOTALL).

    Like LENS: anchored at the start (no leading whitespace allowed), anything may follow the
    first ``</answer>``. Computed without the regex, whose nested lazy scans are quadratic on
    long texts with many unclosed tags; the result is the same for every string.
    """
    if not isinstance(text, str) or not text.startswith("<think>"):
        return False
    # The earliest "</think>\s*<answer>" leaves the most text for a closing </answer>, so it
    # decides whether any way of matching exists.
    bridge = _THINK_TO_ANSWER.search(text, len("<think>"))
    return bridge is not None and text.find("</answer>", bridge.end()) >= 0


def _check_size(name: str, size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return height, width


def parse_answer(text: str, vlm_size: tuple[int, int], image_size: tuple[int, int]) -> ParsedAnswer:
    """Parse the VLM's answer and map its box onto the source image.

    ``vlm_size`` is (height, width) of the image the VLM saw, ``image_size`` that of the source
    image. The box is rescaled per axis and clipped to [0, W] x [0, H]. Not found (``box`` None,
    ``reason`` set) when no box parses, a coordinate is not finite, x2 <= x1 or y2 <= y1 as
    written, or nothing is left after clipping.

    Never raises for a str ``text``. Raises TypeError when ``text`` is not a str (a caller bug,
    not a model answer) and ValueError for sizes that are not two positive integers.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer text must be str, got {type(text).__name__}")
    vlm_h, vlm_w = _check_size("vlm_size", vlm_size)
    img_h, img_w = _check_size("image_size", image_size)

    reasoning = text.strip()
    think = extract_think(text)

    def not_found(reason: str, raw: Box | None = None) -> ParsedAnswer:
        return ParsedAnswer(reasoning, think, False, None, raw, reason)

    raw = parse_box(text)
    if raw is None:
        return not_found(REASON_NO_BOX)
    if not all(math.isfinite(v) for v in raw):
        return not_found(REASON_NOT_FINITE, raw)
    x1, y1, x2, y2 = raw
    if x2 <= x1 or y2 <= y1:
        return not_found(REASON_DEGENERATE, raw)

    # Multiply before dividing: integer coordinates on the VLM image's border map exactly
    # onto the source border (644 * 640 / 644 == 640.0). Python floats overflow to inf here
    # rather than raising.
    sx1, sx2 = x1 * img_w / vlm_w, x2 * img_w / vlm_w
    sy1, sy2 = y1 * img_h / vlm_h, y2 * img_h / vlm_h
    if not all(math.isfinite(v) for v in (sx1, sy1, sx2, sy2)):
        return not_found(REASON_NOT_FINITE, raw)
    box = (min(max(sx1, 0.0), float(img_w)), min(max(sy1, 0.0), float(img_h)),
           min(max(sx2, 0.0), float(img_w)), min(max(sy2, 0.0), float(img_h)))
    if box[2] <= box[0] or box[3] <= box[1]:
        return not_found(REASON_OUTSIDE, raw)
    return ParsedAnswer(reasoning, think, True, box, raw, "")
