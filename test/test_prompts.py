"""Tests of lens_ros.prompts: LENS's templates, answer parsing, think-format check."""

from __future__ import annotations

import math
import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens_ros import prompts
from lens_ros.prompts import (
    COT_TEMPLATE,
    SYSTEM_PROMPT,
    THINK_ANSWER_PATTERN,
    USER_TEMPLATE,
    ParsedAnswer,
    build_messages,
    has_think_format,
    parse_answer,
    parse_box,
    user_prompt,
)

SRC = (480, 640)  # (height, width) of a RefCOCO image
VLM = (476, 644)  # what smart_resize makes of it

# --------------------------------------------------------------------------- templates

PLAIN_EXPECTED = "Output the bounding box of the red mug on the left in the image."
COT_EXPECTED = (
    'Locate "red mug on the left", report the bbox coordinates in JSON format.Compare the difference '
    "between objects and find the most closely matched one.Output the thinking process in <think> "
    "</think> and final answer in <answer> </answer> tags.Output the one bbox inside the interested "
    "object in JSON format.i.e., <think>thinking process here</think><answer>answer here</answer>"
)


def test_constants_are_lens_strings():
    assert SYSTEM_PROMPT == "You are a helpful assistant. "
    assert USER_TEMPLATE == "Output the bounding box of the {expr} in the image."
    assert COT_TEMPLATE.format(expr="red mug on the left") == COT_EXPECTED


def test_user_prompts_render_exactly():
    assert user_prompt("red mug on the left") == PLAIN_EXPECTED
    assert user_prompt("red mug on the left", cot=True) == COT_EXPECTED


def test_command_is_inserted_as_is():
    # No stripping, no added period, braces are not re-interpreted.
    assert user_prompt("  the {cup}") == "Output the bounding box of the   the {cup} in the image."
    assert user_prompt("the cup.", cot=True).startswith('Locate "the cup.", report')


@pytest.mark.parametrize("cot,expected", [(False, PLAIN_EXPECTED), (True, COT_EXPECTED)])
def test_build_messages(cot, expected):
    assert build_messages("red mug on the left", cot=cot) == [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant. "}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": expected}]},
    ]


def test_build_messages_returns_fresh_lists():
    first = build_messages("a")
    first[1]["content"].append({"type": "text", "text": "x"})
    assert len(build_messages("a")[1]["content"]) == 2


def _render(messages):
    """Render with the Qwen2-VL chat template the way transformers does (sandboxed jinja2)."""
    jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
    pytest.importorskip("torch")  # lens_ros.model.tiny imports torch
    from lens_ros.model.tiny import QWEN2_VL_CHAT_TEMPLATE

    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(QWEN2_VL_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("cot,expected", [(False, PLAIN_EXPECTED), (True, COT_EXPECTED)])
def test_chat_renders_like_lens_demo(cot, expected):
    ours = build_messages("red mug on the left", cot=cot)
    # LENS's demo and evaluation pass the system content as a plain string.
    demo = [{"role": "system", "content": SYSTEM_PROMPT}, ours[1]]
    text = _render(ours)
    assert text == _render(demo)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant. <|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + expected + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------- answers

JSON_ANSWER = '```json\n[\n\t{"bbox_2d": [136, 48, 420, 300], "label": "red mug"}\n]\n```'
COT_ANSWER = (
    "<think>The mug at [10, 10, 50, 50] is blue, so it is not the one. The red mug is on the "
    "right.</think>\n<answer>[{\"bbox_2d\": [300, 100, 400, 200], \"label\": \"red mug\"}]</answer>"
)
BIG = "1" + "0" * 307  # 1e307: finite, but overflows once rescaled

# (text, vlm_size, image_size, expected box or the reason it is not found)
CASES = [
    ("[12, 30, 200, 180]", SRC, SRC, (12.0, 30.0, 200.0, 180.0)),
    ("[12.5, 30.25, 200.75, 180.0]", SRC, SRC, (12.5, 30.25, 200.75, 180.0)),
    ("[-5, -10.5, 100, 120]", SRC, SRC, (0.0, 0.0, 100.0, 120.0)),
    (JSON_ANSWER, SRC, SRC, (136.0, 48.0, 420.0, 300.0)),
    ("<|object_ref_start|>the cup.<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|><|im_end|>",
     SRC, SRC, (10.0, 20.0, 300.0, 400.0)),
    ("(10, 20), (300, 400)", SRC, SRC, (10.0, 20.0, 300.0, 400.0)),
    ("The cup is at (15, 25, 315, 425).", SRC, SRC, (15.0, 25.0, 315.0, 425.0)),
    (COT_ANSWER, SRC, SRC, (300.0, 100.0, 400.0, 200.0)),
    ("[10, 20, 30, 40] or maybe [50, 60, 70, 80]", SRC, SRC, (10.0, 20.0, 30.0, 40.0)),
    # LENS prefers the [..] form over (..) forms wherever they stand.
    ("(1, 2, 3, 4) then [50, 60, 70, 80]", SRC, SRC, (50.0, 60.0, 70.0, 80.0)),
    ("[ 12 ,30 ,\n 200 , 180 ]", SRC, SRC, (12.0, 30.0, 200.0, 180.0)),
    ("There is no such object in the image.", SRC, SRC, prompts.REASON_NO_BOX),
    ("", SRC, SRC, prompts.REASON_NO_BOX),
    ("   \n ", SRC, SRC, prompts.REASON_NO_BOX),
    ("[nan, 1, 2, 3]", SRC, SRC, prompts.REASON_NO_BOX),
    ("[1., 2, 3, 4]", SRC, SRC, prompts.REASON_NO_BOX),  # LENS's number needs digits after '.'
    ("[1, 2, 3]", SRC, SRC, prompts.REASON_NO_BOX),
    ("[200, 30, 12, 180]", SRC, SRC, prompts.REASON_DEGENERATE),
    ("[12, 30, 200, 30]", SRC, SRC, prompts.REASON_DEGENERATE),
    ("[700, 500, 900, 600]", SRC, SRC, prompts.REASON_OUTSIDE),
    ("[-50, 10, -1, 100]", SRC, SRC, prompts.REASON_OUTSIDE),
    ("[640, 10, 700, 100]", SRC, SRC, prompts.REASON_OUTSIDE),  # zero width left on the border
    ("[600, 400, 700, 520]", SRC, SRC, (600.0, 400.0, 640.0, 480.0)),
    ("[" + "9" * 400 + ", 1, " + "9" * 401 + ", 2]", SRC, SRC, prompts.REASON_NOT_FINITE),
    ("[0, 0, " + BIG + ", 10]", VLM, SRC, prompts.REASON_NOT_FINITE),
    # Rescale 644x476 -> 640x480: x * 640 / 644, y * 480 / 476.
    ("[161, 119, 483, 357]", VLM, SRC, (160.0, 120.0, 480.0, 360.0)),
    ("[0, 0, 644, 476]", VLM, SRC, (0.0, 0.0, 640.0, 480.0)),
    ("[100, 50, 200, 150]", VLM, SRC, (100 * 640 / 644, 50 * 480 / 476, 200 * 640 / 644, 150 * 480 / 476)),
    ("[10.5, 20.5, 600.25, 470]", VLM, SRC, (10.5 * 640 / 644, 20.5 * 480 / 476, 600.25 * 640 / 644, 470 * 480 / 476)),
    # Upscaling, other aspect: a 1000x750 source seen as 1008x756 (height, width: 756x1008).
    ("[504, 378, 1008, 756]", (756, 1008), (750, 1000), (500.0, 375.0, 1000.0, 750.0)),
    # A CoT model may quote the tags while thinking: the last <answer> block counts.
    ("<think>Answer in <answer> </answer> tags. Not [1, 1, 5, 5].</think><answer>[20, 30, 40, 50]</answer>",
     SRC, SRC, (20.0, 30.0, 40.0, 50.0)),
    # An answer block without a box falls back to the whole text.
    ("I see it at [10, 20, 30, 40]. <answer>the cup</answer>", SRC, SRC, (10.0, 20.0, 30.0, 40.0)),
    # Truncated by the token limit: the open answer block is still searched first.
    ("<think>Not [1, 1, 5, 5].</think><answer>[{\"bbox_2d\": [20, 30, 40, 50], \"label\": \"cu",
     SRC, SRC, (20.0, 30.0, 40.0, 50.0)),
]


@pytest.mark.parametrize("text,vlm_size,image_size,expected", CASES)
def test_parse_answer_table(text, vlm_size, image_size, expected):
    parsed = parse_answer(text, vlm_size=vlm_size, image_size=image_size)
    assert isinstance(parsed, ParsedAnswer)
    assert parsed.reasoning == text.strip()
    if isinstance(expected, str):
        assert (parsed.found, parsed.box, parsed.reason) == (False, None, expected)
    else:
        assert parsed.found and parsed.reason == ""
        assert parsed.box == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert all(type(v) is float for v in parsed.box)


def test_rescale_is_exact_on_the_border_and_on_multiples():
    assert parse_answer("[0, 0, 644, 476]", VLM, SRC).box == (0.0, 0.0, 640.0, 480.0)
    assert parse_answer("[161, 119, 483, 357]", VLM, SRC).box == (160.0, 120.0, 480.0, 360.0)


def test_box_vlm_is_the_raw_box():
    parsed = parse_answer("[-5, -10.5, 100, 700]", VLM, SRC)
    assert parsed.found and parsed.box_vlm == (-5.0, -10.5, 100.0, 700.0)
    assert parsed.box == pytest.approx((0.0, 0.0, 100 * 640 / 644, 480.0))
    # Kept for rejected boxes too (the box reward scores them), None when nothing parsed.
    assert parse_answer("[200, 30, 12, 180]", SRC, SRC).box_vlm == (200.0, 30.0, 12.0, 180.0)
    assert parse_answer("[700, 500, 900, 600]", SRC, SRC).box_vlm == (700.0, 500.0, 900.0, 600.0)
    assert parse_answer("no box", SRC, SRC).box_vlm is None


def test_think_is_extracted():
    parsed = parse_answer(COT_ANSWER, SRC, SRC)
    assert parsed.think == ("The mug at [10, 10, 50, 50] is blue, so it is not the one. The red mug is on "
                            "the right.")
    assert parse_answer("<think>\n  a\n</think><answer>[1, 2, 3, 4]</answer>", SRC, SRC).think == "a"
    assert parse_answer("[1, 2, 3, 4]", SRC, SRC).think is None
    assert parse_answer("<think>unfinished [1, 2, 3, 4]", SRC, SRC).think is None


def test_parse_box_forms_and_order():
    assert parse_box('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8]}]') == (1, 2, 3, 4)
    assert parse_box("<|box_start|>(-1.5,2),(3,4.25)<|box_end|>") == (-1.5, 2.0, 3.0, 4.25)
    assert parse_box("(1, 2), (3, 4) and (5, 6, 7, 8)") == (5.0, 6.0, 7.0, 8.0)  # LENS's order
    assert parse_box("no") is None
    assert parse_box(None) is None  # type: ignore[arg-type]


def test_bad_arguments():
    with pytest.raises(TypeError):
        parse_answer(None, SRC, SRC)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_answer(b"[1, 2, 3, 4]", SRC, SRC)  # type: ignore[arg-type]
    for size in [(0, 640), (480,), None, (480, -1), ("a", 3)]:
        with pytest.raises(ValueError):
            parse_answer("[1, 2, 3, 4]", size, SRC)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            parse_answer("[1, 2, 3, 4]", SRC, size)  # type: ignore[arg-type]


def test_parsed_answer_is_frozen():
    parsed = parse_answer("[1, 2, 3, 4]", SRC, SRC)
    with pytest.raises(Exception):
        parsed.found = False  # type: ignore[misc]


# --------------------------------------------------------------------------- properties

sizes = st.tuples(st.integers(1, 4096), st.integers(1, 4096))


def _check_invariants(parsed: ParsedAnswer, image_size):
    height, width = image_size
    assert isinstance(parsed, ParsedAnswer)
    if parsed.found:
        x1, y1, x2, y2 = parsed.box
        assert all(math.isfinite(v) for v in parsed.box)
        assert 0 <= x1 < x2 <= width
        assert 0 <= y1 < y2 <= height
        assert parsed.reason == ""
        assert parsed.box_vlm is not None
    else:
        assert parsed.box is None
        assert parsed.reason in (prompts.REASON_NO_BOX, prompts.REASON_NOT_FINITE,
                                 prompts.REASON_DEGENERATE, prompts.REASON_OUTSIDE)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), vlm_size=sizes, image_size=sizes)
def test_parse_answer_never_raises_on_any_text(text, vlm_size, image_size):
    _check_invariants(parse_answer(text, vlm_size, image_size), image_size)


def _number():
    ints = st.integers(-10**6, 10**6).map(str)
    decimals = st.tuples(st.integers(-5000, 5000), st.integers(0, 10**6)).map(lambda t: f"{t[0]}.{t[1]}")
    huge = st.integers(300, 420).map(lambda n: "9" * n)
    return st.one_of(ints, ints, decimals, st.sampled_from(["0", "-0", "0.0"]), huge)


spaces = st.sampled_from(["", "", " ", "  ", "\n", "\t "])
# Surrounding text with no brackets, parentheses or digits, so the embedded box is the only one.
filler = st.text(alphabet=st.characters(blacklist_characters="[]()0123456789", blacklist_categories=("Cs",)),
                 max_size=30)


@st.composite
def embedded_boxes(draw):
    nums = [draw(_number()) for _ in range(4)]
    s = [draw(spaces) for _ in range(12)]
    form = draw(st.sampled_from(["square", "round", "pairs", "json", "box_tokens"]))
    if form in ("square", "json"):
        box = f"[{s[0]}{nums[0]}{s[1]},{s[2]}{nums[1]}{s[3]},{s[4]}{nums[2]}{s[5]},{s[6]}{nums[3]}{s[7]}]"
        if form == "json":
            box = '[{"bbox_2d": ' + box + ', "label": "thing"}]'
    elif form == "round":
        box = f"({s[0]}{nums[0]}{s[1]},{s[2]}{nums[1]}{s[3]},{s[4]}{nums[2]}{s[5]},{s[6]}{nums[3]}{s[7]})"
    else:
        box = f"({s[0]}{nums[0]},{s[1]}{nums[1]}{s[2]}){s[3]},{s[4]}({nums[2]},{s[5]}{nums[3]})"
        if form == "box_tokens":
            box = f"<|object_ref_start|>it<|object_ref_end|><|box_start|>{box}<|box_end|>"
    if draw(st.booleans()):
        box = f"<think>{draw(filler)}</think>{draw(spaces)}<answer>{box}</answer>"
    return draw(filler) + box + draw(filler), tuple(float(n) for n in nums)


@settings(max_examples=500, deadline=None)
@given(case=embedded_boxes(), vlm_size=sizes, image_size=sizes)
def test_parse_answer_on_embedded_boxes(case, vlm_size, image_size):
    text, numbers = case
    parsed = parse_answer(text, vlm_size, image_size)
    _check_invariants(parsed, image_size)
    assert parsed.box_vlm == numbers
    x1, y1, x2, y2 = numbers
    if all(math.isfinite(v) for v in numbers) and x2 > x1 and y2 > y1:
        # Found exactly when some of the rescaled box lies inside the image.
        height, width = image_size
        sx1, sx2 = x1 * width / vlm_size[1], x2 * width / vlm_size[1]
        sy1, sy2 = y1 * height / vlm_size[0], y2 * height / vlm_size[0]
        finite = all(math.isfinite(v) for v in (sx1, sy1, sx2, sy2))
        inside = sx1 < width and sx2 > 0 and sy1 < height and sy2 > 0
        assert parsed.found == (finite and inside and sx2 > sx1 and sy2 > sy1)
    else:
        assert not parsed.found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.sampled_from(["[", "]", "(", ")", ",", " ", "-", ".", "1", "23", "4.5", "nan",
                                        "<answer>", "</answer>", "<think>", "</think>"]), max_size=60),
       vlm_size=sizes, image_size=sizes)
def test_parse_answer_never_raises_on_bracket_soup(pieces, vlm_size, image_size):
    _check_invariants(parse_answer("".join(pieces), vlm_size, image_size), image_size)


# --------------------------------------------------------------------------- long inputs


def _fast(fn, text, limit_s=2.0):
    start = time.perf_counter()
    fn(text)
    elapsed = time.perf_counter() - start
    assert elapsed < limit_s, f"{elapsed:.2f} s on {len(text)} characters"


@pytest.mark.parametrize("make", [
    lambda rng: "".join(rng.choice("0123456789[](), -.") for _ in range(1_000_000)),
    lambda rng: "".join(rng.choice("0123456789[],") for _ in range(1_000_000)),
    lambda rng: "[" + "1" * 1_000_000,
    lambda rng: "[1, 2, 3, " * 100_000,
    lambda rng: "(1, 2), (3, " * 80_000,
    lambda rng: "[" + " " * 1_000_000 + "1",
    lambda rng: "<answer>" * 120_000 + "[1, 2, 3",
    lambda rng: "<think>" * 140_000,
    lambda rng: "<think>" + "</think><answer>" * 60_000,
    lambda rng: "<think>" + "</think>" + " " * 1_000_000,
], ids=["random-soup", "digits-brackets-commas", "open-bracket-digits", "unclosed-lists", "unclosed-pairs",
        "open-bracket-spaces", "many-answer-tags", "many-think-tags", "many-unclosed-answers", "think-spaces"])
def test_long_inputs_are_fast(make):
    # LENS's think regex alone needs about 6 s for 100 KB of "</think><answer>" (quadratic).
    text = make(random.Random(0))
    _fast(lambda t: parse_answer(t, VLM, SRC), text)
    _fast(has_think_format, text)


# --------------------------------------------------------------------------- think format


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>b</answer>",
    "<think></think><answer></answer>",
    "<think>The red one.</think>\n<answer>[1, 2, 3, 4]</answer>",
    "<think>\nline\nline\n</think> \n\t<answer>\n[1, 2, 3, 4]\n</answer>",
    COT_ANSWER,
    "<think>a</think><answer>b</answer><|im_end|>",  # re.match: anything may follow
    "<think>a</think><answer>b</answer> and more text",
    "<think>a</think>x</think><answer>b</answer>",  # the lazy think part may span a </think>
])
def test_think_format_positive(text):
    assert has_think_format(text)
    assert THINK_ANSWER_PATTERN.match(text)


@pytest.mark.parametrize("text", [
    "",
    "[1, 2, 3, 4]",
    " <think>a</think><answer>b</answer>",  # re.match: anchored at the start
    "\n<think>a</think><answer>b</answer>",
    "Sure. <think>a</think><answer>b</answer>",
    "<answer>b</answer>",
    "<think>a</think>",
    "<think>a</think>text<answer>b</answer>",
    "<think>a</think><answer>b",
    "<think>a<answer>b</answer>",
    "<think>a</answer></think><answer>b",
    "<THINK>a</THINK><ANSWER>b</ANSWER>",
])
def test_think_format_negative(text):
    assert not has_think_format(text)
    assert not THINK_ANSWER_PATTERN.match(text)


def test_think_pattern_is_lens_pattern():
    assert THINK_ANSWER_PATTERN.pattern == r"<think>.*?</think>\s*<answer>.*?</answer>"
    assert THINK_ANSWER_PATTERN.flags & re.DOTALL
    assert not has_think_format(None)  # type: ignore[arg-type]


@settings(max_examples=1000, deadline=None)
@given(pieces=st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u2003",
                                        "x", "<", ">", "/", "think", "answer"]), max_size=14))
def test_think_format_equals_lens_regex_match(pieces):
    text = "".join(pieces)
    assert has_think_format(text) == bool(THINK_ANSWER_PATTERN.match(text))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_think_format_equals_lens_regex_match_on_any_text(text):
    assert has_think_format(text) == bool(THINK_ANSWER_PATTERN.match(text))
    assert has_think_format("<think>" + text) == bool(THINK_ANSWER_PATTERN.match("<think>" + text))
