"""LENS's unified rewards (LENS_REFERENCE §4) as reward functions for trl's ``GRPOTrainer``.

trl 1.16 calls every reward function as
``fn(prompts=..., completions=..., completion_ids=..., **columns)``, where ``columns`` are the
dataset's columns (one value per completion, i.e. repeated over a prompt's generations) plus
``trainer_state``, ``log_extra``, ``log_metric`` (and ``environments`` when used). Each function
here takes ``completions`` and the columns it needs by name, swallows the rest in ``**kwargs``
and returns one ``float | None`` per completion. The mask rewards read ``pred_masks`` (each
rollout's own predicted mask, which only our trainer can supply, not a dataset column) and
``gt_masks``.

``None`` means "not applicable" (no ground truth of that kind for this sample, e.g. a robot
episode labelled only with success/failure). trl turns it into NaN and then
(``_calculate_rewards`` / ``_generate_and_score_completions``, sum_then_normalize, the default):

* the weighted sum over reward functions is a ``nansum``: a None term is skipped, the other
  terms of that completion still count;
* a completion for which EVERY function returned None is "unscorable": its summed reward is NaN,
  it is left out of its group's mean and std (``nanmean`` / ``nanstd``) and its advantage is set
  to 0 (no learning signal); trl logs a warning naming the sample;
* per-function logged means use ``nanmean``, i.e. only the completions the function applied to.

A predicted mask of None (the model found nothing) is NOT "not applicable": it is a miss and
scores 0.0 unless the ground truth is empty too.

Squared IoUs by default: LENS rewards IoU**2, which widens the gap between good and excellent
answers within a group. Pure numpy + the standard library; the IoU helpers are the metrics'
(:mod:`lens_ros.training.metrics`) and the answer parser is :mod:`lens_ros.prompts`'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lens_ros.prompts import has_think_format, parse_box
from lens_ros.training.metrics import boundary_iou, box_iou, mask_iou

__all__ = [
    "completion_text",
    "think_format_reward",
    "box_iou_reward",
    "mask_iou_reward",
    "boundary_iou",
    "boundary_iou_reward",
    "success_reward",
    "UnifiedReward",
]

RewardFunction = Callable[..., list]


def completion_text(completion) -> str:
    """The answer text of one completion, in either of trl's formats.

    Standard format: the decoded string itself. Conversational format: a list of messages; the
    text is the content of the last assistant message (the final answer when tools were called),
    whose content may be a string or a list of parts (``{"type": "text", "text": ...}``).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, Sequence) or not completion:
        raise TypeError(f"completion must be a str or a non-empty list of messages, got {completion!r}")
    assistant = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
    if not assistant:
        raise TypeError(f"completion has no assistant message: {completion!r}")
    content = assistant[-1].get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _iou_reward(iou: float, squared: bool) -> float:
    return iou * iou if squared else iou


def _per_completion(completions, name: str, values) -> list:
    """``values`` as a list checked to hold one entry per completion (trl repeats columns per completion)."""
    values = list(values)
    if len(values) != len(completions):
        raise ValueError(f"{name} has {len(values)} entries for {len(completions)} completions")
    return values


def think_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the text matches ``<think>.*?</think>\\s*<answer>.*?</answer>`` at its start, else 0.0.

    LENS's CoT reward applies the pattern with ``re.match`` (DOTALL): anchored at the start, so
    any text (even whitespace) before ``<think>`` scores 0; anything may follow ``</answer>``.
    :func:`lens_ros.prompts.has_think_format` is that test, computed in linear time.
    """
    return [1.0 if has_think_format(completion_text(c)) else 0.0 for c in completions]


def box_iou_reward(completions, gt_box_vlm, squared: bool = True, **kwargs) -> list[float | None]:
    """IoU (squared by default) of each answer's box with the ground-truth box, both in VLM pixels.

    The box is read by :func:`lens_ros.prompts.parse_box` and scored as written: not rescaled,
    not clipped (LENS scores the raw box). 0.0 when nothing parses, a coordinate is not finite
    or the box is degenerate (x2 <= x1 or y2 <= y1; LENS's parser returns [0, 0, 0, 0] then,
    which scores 0 too). ``gt_box_vlm`` None for a completion (no box label) gives None.
    """
    rewards: list[float | None] = []
    for completion, gt_box in zip(completions, _per_completion(completions, "gt_box_vlm", gt_box_vlm)):
        if gt_box is None:
            rewards.append(None)
            continue
        box = parse_box(completion_text(completion))
        if box is None or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            rewards.append(0.0)
            continue
        rewards.append(_iou_reward(box_iou(box, gt_box), squared))
    return rewards


def mask_iou_reward(completions, pred_masks, gt_masks, squared: bool = True, **kwargs) -> list[float | None]:
    """IoU (squared by default) of each rollout's predicted mask with the GT mask at original size.

    ``pred_masks``: one bool (H, W) mask per completion, the same size as its GT, or None when
    the model found nothing (scored as an empty mask). ``gt_masks``: one bool (H, W) per
    completion, or None when the sample has no mask label (reward None).

    Empty union (empty GT, empty / None prediction) gives 1.0, LISA's evaluation convention
    (:func:`lens_ros.training.metrics.mask_iou`): "the object is not there" answered by "found
    nothing" is correct, and the reward should agree with the metric we report. LENS itself
    computes I / (U + 1e-6), i.e. 0.0 there; its training data never has an empty GT, so the
    choice only matters for our own (robot) data.
    """
    pred_masks = _per_completion(completions, "pred_masks", pred_masks)
    gt_masks = _per_completion(completions, "gt_masks", gt_masks)
    return [None if gt is None else _iou_reward(mask_iou(pred, gt), squared) for pred, gt in zip(pred_masks, gt_masks)]


def boundary_iou_reward(completions, pred_masks, gt_masks, squared: bool = True, dilation_ratio: float = 0.02,
                        **kwargs) -> list[float | None]:
    """Boundary IoU (:func:`boundary_iou`, squared by default like the other IoU rewards) of each rollout's mask.

    Same inputs and None / empty conventions as :func:`mask_iou_reward`. Rewards contour
    quality, which mask IoU hardly sees on large objects. LENS's own (optional, off by default)
    boundary reward uses a different band (width min(H, W) // 20, image border not counted as
    background); this is the standard definition of Cheng et al. 2021.
    """
    pred_masks = _per_completion(completions, "pred_masks", pred_masks)
    gt_masks = _per_completion(completions, "gt_masks", gt_masks)
    return [None if gt is None else _iou_reward(boundary_iou(pred, gt, dilation_ratio), squared)
            for pred, gt in zip(pred_masks, gt_masks)]


def success_reward(completions, success, **kwargs) -> list[float | None]:
    """Operator feedback as a reward: 1.0 for success, 0.0 for failure, None when unknown.

    The label belongs to the episode (the answer the robot acted on), so every generation of a
    prompt gets the same value; it shifts the group's rewards uniformly and only matters in
    combination with per-completion terms or across groups (trl's ``scale_rewards="batch"``).
    """
    return [None if s is None else (1.0 if bool(s) else 0.0) for s in _per_completion(completions, "success", success)]


_SQUARABLE = ("box_iou", "mask_iou", "boundary_iou")


def _unsquared(function: RewardFunction) -> RewardFunction:
    """``function`` with ``squared=False`` bound, keeping its ``__name__`` (trl logs rewards by name).

    A ``functools.partial`` of a module-level function rather than a closure, so that it pickles
    (trl's accelerate / multiprocessing paths may pickle reward functions).
    """
    bound = functools.partial(function, squared=False)
    functools.update_wrapper(bound, function)
    return bound


@dataclass
class UnifiedReward:
    """LENS's unified reward: a weighted sum of the terms above. Defaults = LENS stage 2 (box + mask IoU**2).

    For trl, pass ``functions()`` as ``reward_funcs`` and ``weights()`` as
    ``GRPOConfig.reward_weights``: trl then logs each term separately and does the weighted sum
    itself (None terms skipped, see the module docstring). Calling the instance computes the
    same sum directly, for tests and for evaluation reports. ``squared`` applies to all three
    IoU terms.
    """

    think_format: float = 0.0
    box_iou: float = 1.0
    mask_iou: float = 1.0
    boundary_iou: float = 0.0
    success: float = 0.0
    squared: bool = True

    def __post_init__(self) -> None:
        for name, weight in self._named_weights():
            if not math.isfinite(weight):
                raise ValueError(f"reward weight {name} must be finite, got {weight!r}")

    def _named_weights(self) -> list[tuple[str, float]]:
        return [("think_format", self.think_format), ("box_iou", self.box_iou), ("mask_iou", self.mask_iou),
                ("boundary_iou", self.boundary_iou), ("success", self.success)]

    def _active(self) -> list[tuple[RewardFunction, float]]:
        functions = {
            "think_format": think_format_reward,
            "box_iou": box_iou_reward,
            "mask_iou": mask_iou_reward,
            "boundary_iou": boundary_iou_reward,
            "success": success_reward,
        }
        active = []
        for name, weight in self._named_weights():
            if weight == 0.0:
                continue
            function = functions[name]
            if name in _SQUARABLE and not self.squared:
                function = _unsquared(function)
            active.append((function, float(weight)))
        return active

    def functions(self) -> list[RewardFunction]:
        """The reward callables with a non-zero weight, in a fixed order (think, box, mask, boundary, success)."""
        return [function for function, _ in self._active()]

    def weights(self) -> list[float]:
        """The weights matching :meth:`functions`, for ``GRPOConfig.reward_weights``."""
        return [weight for _, weight in self._active()]

    def __call__(self, completions, **kwargs) -> list[float | None]:
        """Weighted sum per completion, None terms skipped; None when every term is None (trl: unscorable)."""
        totals: list[float | None] = [None] * len(completions)
        for function, weight in self._active():
            for i, reward in enumerate(function(completions=completions, **kwargs)):
                if reward is not None:
                    totals[i] = (totals[i] or 0.0) + weight * reward
        return totals
