"""Tests of lens_ros.training.rewards: LENS's rewards with trl's reward-function signature (values by hand)."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from lens_ros.prompts import THINK_ANSWER_PATTERN
from lens_ros.training.rewards import (
    UnifiedReward,
    boundary_iou,
    boundary_iou_reward,
    box_iou_reward,
    completion_text,
    mask_iou_reward,
    success_reward,
    think_format_reward,
)

GT = [0, 0, 10, 10]  # ground-truth box in VLM pixels, area 100


def conversational(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def trl_extras() -> dict:
    """What trl 1.16's _calculate_rewards passes besides completions and the dataset columns."""
    return {"prompts": ["p"], "completion_ids": [[1, 2]], "trainer_state": None,
            "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}


# --------------------------------------------------------------------------- completion formats


def test_completion_text_formats():
    assert completion_text("[1, 2, 3, 4]") == "[1, 2, 3, 4]"
    assert completion_text(conversational("abc")) == "abc"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "ab"
    # with tool calls the last assistant message holds the final answer
    messages = [{"role": "assistant", "content": "first"}, {"role": "tool", "content": "result"},
                {"role": "assistant", "content": "final"}]
    assert completion_text(messages) == "final"
    with pytest.raises(TypeError):
        completion_text(42)


# --------------------------------------------------------------------------- think format


@pytest.mark.parametrize(("text", "expected"), [
    ("<think>look left</think><answer>[1, 2, 3, 4]</answer>", 1.0),
    ("<think>multi\nline</think>\n\n<answer>\n[1, 2, 3, 4]\n</answer>", 1.0),  # DOTALL, \s* between tags
    ("<think>a</think><answer>b</answer> trailing text", 1.0),  # re.match: trailing text allowed
    ("Sure. <think>a</think><answer>b</answer>", 0.0),  # re.match: anchored at the start
    (" <think>a</think><answer>b</answer>", 0.0),  # even a leading space
    ("<think>a</think>", 0.0),  # no answer
    ("<think>a</think> so <answer>b</answer>", 0.0),  # only whitespace between </think> and <answer>
    ("<answer>b</answer><think>a</think>", 0.0),
    ("[1, 2, 3, 4]", 0.0),
])
def test_think_format_reward(text, expected):
    assert think_format_reward([text]) == [expected]
    assert think_format_reward([conversational(text)], **trl_extras()) == [expected]
    # the very test LENS runs
    assert expected == (1.0 if re.match(THINK_ANSWER_PATTERN, text) else 0.0)


# --------------------------------------------------------------------------- box IoU


def test_box_iou_reward_by_hand():
    completions = [
        "[0, 0, 10, 10]",  # identical: IoU 1 -> 1
        "The mug is at [5, 0, 15, 10].",  # half-overlapping: I 50, U 150, IoU 1/3 -> 1/9
        '[{"bbox_2d": [0, 0, 10, 5], "label": "mug"}]',  # Qwen JSON: I 50, U 100 -> 1/4
        "<|box_start|>(0,0),(10,10)<|box_end|>",  # stage-1 form: 1
        "I cannot see it.",  # nothing parses: 0
        "[10, 10, 5, 5]",  # degenerate (x2 <= x1): 0
        "[20, 20, 30, 30]",  # disjoint: 0
    ]
    rewards = box_iou_reward(completions, gt_box_vlm=[GT] * len(completions), **trl_extras())
    assert rewards == pytest.approx([1.0, 1 / 9, 1 / 4, 1.0, 0.0, 0.0, 0.0])
    unsquared = box_iou_reward(completions[:3], gt_box_vlm=[GT] * 3, squared=False)
    assert unsquared == pytest.approx([1.0, 1 / 3, 1 / 2])


def test_box_iou_reward_conversational_and_answer_block():
    completions = [conversational("[5, 0, 15, 10]"),
                   # prompts.parse_box searches the <answer> block first (LENS: first box in the whole text)
                   conversational("<think>not [0, 0, 1, 1]</think><answer>[0, 0, 10, 10]</answer>")]
    assert box_iou_reward(completions, gt_box_vlm=[GT, GT]) == pytest.approx([1 / 9, 1.0])


def test_box_iou_reward_raw_box_is_not_clipped_and_huge_numbers_score_zero():
    # a box partly outside the image is scored as written: I = 100, U = 200 -> 1/2 -> 1/4
    assert box_iou_reward(["[-10, 0, 10, 10]"], gt_box_vlm=[GT]) == pytest.approx([0.25])
    assert box_iou_reward(["[0, 0, 1" + "0" * 400 + ", 10]"], gt_box_vlm=[GT]) == [0.0]  # inf coordinate


def test_box_iou_reward_without_gt_box_is_none():
    assert box_iou_reward(["[0, 0, 10, 10]", "[0, 0, 10, 10]"], gt_box_vlm=[None, GT]) == [None, 1.0]


def test_column_length_mismatch_raises():
    with pytest.raises(ValueError, match="gt_box_vlm"):
        box_iou_reward(["a", "b"], gt_box_vlm=[GT])


# --------------------------------------------------------------------------- mask IoU


def test_mask_iou_reward_by_hand():
    gt = np.array([[1, 0], [0, 0]], dtype=bool)
    half = np.array([[1, 1], [0, 0]], dtype=bool)  # I 1, U 2 -> 1/2 -> 1/4
    empty = np.zeros((2, 2), dtype=bool)
    rewards = mask_iou_reward(["a"] * 6, pred_masks=[gt, half, None, empty, None, half],
                              gt_masks=[gt, gt, gt, empty, empty, None], **trl_extras())
    # exact, 1/4, None prediction = miss, empty GT + empty pred = 1 (LISA), same with None, no GT mask
    assert rewards == pytest.approx([1.0, 0.25, 0.0, 1.0, 1.0, None])
    assert mask_iou_reward(["a"], pred_masks=[half], gt_masks=[gt], squared=False) == pytest.approx([0.5])
    # a prediction where the GT is empty is wrong: I 0, U 2
    assert mask_iou_reward(["a"], pred_masks=[half], gt_masks=[empty]) == [0.0]


def test_mask_iou_reward_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        mask_iou_reward(["a"], pred_masks=[np.zeros((2, 3), bool)], gt_masks=[np.zeros((3, 2), bool)])


# --------------------------------------------------------------------------- boundary IoU


def test_boundary_iou_reward_square_vs_shifted_square():
    # See test_metrics: 10x10 image, d = 1, 4x4 squares shifted by one column:
    # bands of 12 px each sharing 6 -> Boundary IoU 6 / 18 = 1/3 -> squared 1/9
    a = np.zeros((10, 10), dtype=bool)
    a[2:6, 2:6] = True
    b = np.zeros((10, 10), dtype=bool)
    b[2:6, 3:7] = True
    assert boundary_iou(a, b) == pytest.approx(1 / 3)
    rewards = boundary_iou_reward(["x", "x", "x"], pred_masks=[b, a, None], gt_masks=[a, a, a], **trl_extras())
    assert rewards == pytest.approx([1 / 9, 1.0, 0.0])
    assert boundary_iou_reward(["x"], pred_masks=[b], gt_masks=[a], squared=False) == pytest.approx([1 / 3])
    assert boundary_iou_reward(["x"], pred_masks=[b], gt_masks=[None]) == [None]


# --------------------------------------------------------------------------- success


def test_success_reward_passes_none_through():
    assert success_reward(["a", "b", "c", "d"], success=[True, False, None, np.bool_(True)],
                          **trl_extras()) == [1.0, 0.0, None, 1.0]


# --------------------------------------------------------------------------- unified reward


def test_unified_reward_defaults_are_lens_stage2():
    unified = UnifiedReward()
    assert unified.functions() == [box_iou_reward, mask_iou_reward]
    assert unified.weights() == [1.0, 1.0]
    assert [f.__name__ for f in unified.functions()] == ["box_iou_reward", "mask_iou_reward"]


def test_unified_reward_weighted_sum_by_hand():
    gt_mask = np.array([[1, 0], [0, 0]], dtype=bool)
    half = np.array([[1, 1], [0, 0]], dtype=bool)
    columns = {"gt_box_vlm": [GT, GT, None], "pred_masks": [half, None, None], "gt_masks": [gt_mask, gt_mask, None],
               "success": [None, True, None]}
    completions = ["<think>t</think><answer>[5, 0, 15, 10]</answer>", "nothing here", "[0, 0, 10, 10]"]
    unified = UnifiedReward(think_format=0.5, success=2.0)
    assert [f.__name__ for f in unified.functions()] == [
        "think_format_reward", "box_iou_reward", "mask_iou_reward", "success_reward"]
    assert unified.weights() == [0.5, 1.0, 1.0, 2.0]
    # completion 1: 0.5 * 1 (think) + 1/9 (box IoU 1/3 squared) + 1/4 (mask IoU 1/2 squared), success None skipped
    # completion 2: 0 + 0 (no box) + 0 (no mask) + 2 * 1 (success)
    # completion 3: only the think term applies (no GT box, no GT mask, no label): 0.5 * 0 = 0
    assert unified(completions, **columns, **trl_extras()) == pytest.approx([0.5 + 1 / 9 + 1 / 4, 2.0, 0.0])
    # with only terms that do not apply, the completion is unscorable (None), as trl treats it
    assert UnifiedReward(box_iou=1.0, mask_iou=0.0)(["[0, 0, 10, 10]"], gt_box_vlm=[None]) == [None]


def test_unified_reward_unsquared_keeps_names_and_pickles():
    # trl names a reward by __name__ (after unwrapping functools.partial) and may pickle it
    unified = UnifiedReward(boundary_iou=0.5, squared=False)
    functions = unified.functions()
    assert [f.__name__ for f in functions] == ["box_iou_reward", "mask_iou_reward", "boundary_iou_reward"]
    assert functions[0](["[5, 0, 15, 10]"], gt_box_vlm=[GT]) == pytest.approx([1 / 3])
    restored = pickle.loads(pickle.dumps(functions[0]))
    assert restored.__name__ == "box_iou_reward"
    assert restored(["[5, 0, 15, 10]"], gt_box_vlm=[GT]) == pytest.approx([1 / 3])
    assert unified.weights() == [1.0, 1.0, 0.5]


def test_unified_reward_rejects_non_finite_weights():
    with pytest.raises(ValueError, match="box_iou"):
        UnifiedReward(box_iou=float("nan"))
