"""LENS training on trl: stage 1 (context head, GT box teacher-forced) and stage 2 (GRPO + mask loss).

LENS_REFERENCE §4. Stage 2 is trl's ``GRPOTrainer`` with these additions, each in the smallest trl
hook that carries it (trl 1.16):

* ``_generate`` is wrapped only to keep the rollouts' prompt ids for the mask pass;
  ``_generate_and_score_completions`` only to attach each row's image (source pixels, GT mask, the
  cached SAM2 encoder output) before trl runs and to return them with the batch, as a list that trl's
  shuffling and splitting carry along row for row.
* ``_calculate_rewards``: before trl scores the completions, every completion whose answer holds
  a usable box goes through the mask pass (prompt + that completion -> context head -> SAM2), and
  its binarised mask becomes the ``pred_masks`` column the mask rewards read. No gradients: these
  are the rollouts' own masks, like their text.
* ``compute_loss``: trl's GRPO loss plus the mask loss (BCE + Dice) of every completion with a GT
  mask, recomputed with gradients on the slice being optimised, so that it stays correct when trl
  reuses a generation batch over several steps (``steps_per_generation``, ``num_iterations``). It is
  computed inside trl's forward of the policy (a forward hook for that call), so that under DDP every
  parameter is used inside the wrapped forward.

The mask pass is ``LensPipeline.mask_logits``, the inference code itself. SAM2's image encoder is
frozen: its output is computed once per image of a generation batch without gradients and kept
with the rollouts; the rest of SAM2's image path (the mask decoder's ``conv_s0``/``conv_s1``) runs
with gradients in the loss.

How trl gets to optimise everything: trl wants the VLM itself (generation, log-probs, PEFT,
reference model). The context head and SAM2 are therefore registered as one extra submodule of
the VLM (``lens_trainables``, the same parameter objects as the ``LensModel``'s). Trainer then puts
them on the device, in train mode, in the optimizer (with its weight-decay groups), in gradient
clipping and in DDP's gradient reduction, with no trl method overridden for it. The submodule is
detached whenever a checkpoint is written, so checkpoints keep LENS's layout exactly.

Stage 1 is a plain ``transformers.Trainer`` on a small module whose ``forward`` is the teacher-forced
mask loss; only the context head is trainable.

Both trainers override ``_save`` so that every checkpoint (``checkpoint-N`` and ``final``) is a LENS
checkpoint that ``load_lens_model`` reads; trl's model card is skipped (it describes a plain
transformers model). transformers writes the rest of a ``checkpoint-N`` beside it (optimizer,
scheduler, RNG states, ``trainer_state.json``); a LoRA run adds its unmerged adapters
(``ADAPTER_DIR``). Resuming (``resume_from_checkpoint``) is transformers' own, with one override,
``_load_from_checkpoint``: the weights go back into the LensModel in place (``load_for_resume``);
transformers' loader would match none of LENS's names and, loading non-strictly, keep the starting weights.

Several processes (``training/accelerate/``; what ran where: training/README.md): DDP, FSDP2 and
DeepSpeed ZeRO-2/3 executed on 2 CPU processes (FSDP2 and DeepSpeed past accelerate's GPU-only gates,
see test/fsdp_on_cpu.py and test/deepspeed_on_cpu.py), resume included, none on GPUs. Sharded (FSDP2,
ZeRO-3), the checkpoints are written from the whole weights transformers gathers for saving. FSDP2:
``learnable_query``, a bare parameter, is re-pointed at the one FSDP2 swaps in
(``_query_from_trainables``). ZeRO-3: the model is loaded whole (``whole_at_load``), and the parameters
the mask pass reads outside their modules' forward are gathered around the policy's forward and for
the rollouts (``mask_pass_parameters``). vLLM rollouts: trl's, with our weights left out of its weight sync.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Trainer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from lens_ros import prompts
from lens_ros.images import InvalidInputError, check_plain_text, control_tokens
from lens_ros.model.checkpoint import load_lens_weights, read_lens_weights, save_lens_checkpoint
from lens_ros.model.sam import embed_backbone, sam_input_size
from lens_ros.pipeline import ImageSizes, LensPipeline, PipelineConfig, PreparedImage, sam_pixels, vlm_resize_shape
from lens_ros.training.data import drop_expressions
from lens_ros.training.rewards import UnifiedReward, completion_text


STAGE_CONTEXT_HEAD = 1
STAGE_GRPO = 2
# The attribute under which the context head and SAM2 ride inside the VLM during training.
TRAINABLES_NAME = "lens_trainables"
CONTEXT_HEAD_MODULES = ("connector", "conv_1d", "proj_to_sam")
FINAL_DIR = "final"
# Inside a LoRA run's checkpoint-N: the adapters in peft's own layout (the LENS weights beside it have
# them merged, for deployment); resuming reads them from here. A subfolder, so that the loader, which
# reads every *.safetensors at the top, never takes them for model weights.
ADAPTER_DIR = "lora_adapter"
# What a checkpoint needs to be resumed from: transformers writes it last (after weights, optimizer,
# scheduler and RNG states), so a checkpoint-N without it was cut off while being written.
TRAINER_STATE_FILE = "trainer_state.json"
RESUME_LATEST = "latest"
CURVES_FILE = "training_curves.png"
LOG_HISTORY_FILE = "log_history.json"
# Qwen2.5's attention and MLP projections; the regex below limits them to the language model.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class LensTrainingConfig(GRPOConfig):
    r"""trl's ``GRPOConfig`` plus what LENS adds. Defaults suit a small run; the recipes in ``training/``
    carry LENS's own hyper-parameters (LENS_REFERENCE §4).

    Changed trl defaults: ``bf16`` is None by default and then means "on when a CUDA GPU with bf16 is
    present" (trl would turn bf16 on everywhere, which breaks or crawls on a CPU); ``reward_weights`` is
    derived from the ``*_reward_weight`` fields and must not be set directly.

    Parameters:
        stage (`int`, defaults to `2`):
            1: mask loss only, the GT box teacher-forced as the answer, only the context head trained.
            2: GRPO on unified rewards + the mask loss on every rollout; VLM, context head, SAM2 prompt
            encoder and mask decoder trained.
        cot (`bool`, defaults to `False`):
            Use the chain-of-thought prompt (the ``_CoT`` model's); pair it with ``think_format_reward_weight``.
        mask_loss_weight (`float`, defaults to `1.0`):
            Weight of the mask loss added to the GRPO loss (stage 2); 0 turns it off.
        bce_weight (`float`, defaults to `1.0`):
            Weight of the per-pixel BCE-with-logits term of the mask loss.
        dice_weight (`float`, defaults to `1.0`):
            Weight of the Dice term (sigmoid, smoothing 1) of the mask loss.
        think_format_reward_weight (`float`, defaults to `0.0`):
            Weight of the think-format reward (1 for ``<think>...</think><answer>...</answer>``). LENS's CoT model: 1.
        box_iou_reward_weight (`float`, defaults to `1.0`):
            Weight of the box IoU reward (GT box in VLM pixels).
        mask_iou_reward_weight (`float`, defaults to `1.0`):
            Weight of the mask IoU reward (the rollout's own mask against the GT mask).
        boundary_iou_reward_weight (`float`, defaults to `0.0`):
            Weight of the boundary IoU reward (not in LENS's recipes).
        success_reward_weight (`float`, defaults to `0.0`):
            Weight of the operator success reward (robot episodes).
        squared_rewards (`bool`, defaults to `True`):
            Square the IoU rewards, as LENS does.
        use_lora (`bool`, defaults to `False`):
            Train LoRA adapters on the VLM's language model instead of all VLM weights (stage 2). The
            context head and SAM2's prompt encoder and mask decoder stay fully trained. Adapters are
            merged into the weights of every saved checkpoint.
        lora_r (`int`, defaults to `16`):
            LoRA rank.
        lora_alpha (`int`, defaults to `32`):
            LoRA scaling numerator (scale = alpha / r).
        lora_dropout (`float`, defaults to `0.05`):
            Dropout on the LoRA branch.
        lora_target_modules (`list[str]`, defaults to Qwen2.5's attention and MLP projections):
            Module names that get adapters, matched inside the language model only (never the vision
            tower, the context head or SAM2).
        freeze_sam_image_encoder (`bool`, defaults to `True`):
            SAM2's image encoder is always frozen in LENS; only True is accepted.
        plot_curves (`bool`, defaults to `True`):
            Write ``training_curves.png`` (loss, rewards, mask loss, KL, completion length) into
            ``output_dir`` at the end of training.
    """

    stage: int = field(default=STAGE_GRPO, metadata={"help": "1: context head only; 2: GRPO + mask loss."})
    cot: bool = field(default=False, metadata={"help": "Use the chain-of-thought prompt."})
    mask_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the mask loss (stage 2)."})
    bce_weight: float = field(default=1.0, metadata={"help": "Weight of the BCE term of the mask loss."})
    dice_weight: float = field(default=1.0, metadata={"help": "Weight of the Dice term of the mask loss."})
    think_format_reward_weight: float = field(default=0.0, metadata={"help": "Think-format reward weight."})
    box_iou_reward_weight: float = field(default=1.0, metadata={"help": "Box IoU reward weight."})
    mask_iou_reward_weight: float = field(default=1.0, metadata={"help": "Mask IoU reward weight."})
    boundary_iou_reward_weight: float = field(default=0.0, metadata={"help": "Boundary IoU reward weight."})
    success_reward_weight: float = field(default=0.0, metadata={"help": "Operator success reward weight."})
    squared_rewards: bool = field(default=True, metadata={"help": "Square the IoU rewards (LENS)."})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the VLM's language model (stage 2)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                                           metadata={"help": "Language-model modules that get LoRA adapters."})
    freeze_sam_image_encoder: bool = field(default=True, metadata={"help": "Always True (LENS)."})
    plot_curves: bool = field(default=True, metadata={"help": "Write training_curves.png at the end."})

    def __post_init__(self) -> None:
        if self.stage not in (STAGE_CONTEXT_HEAD, STAGE_GRPO):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if not self.freeze_sam_image_encoder:
            raise ValueError("freeze_sam_image_encoder must be True: LENS never trains SAM2's image encoder")
        if self.reward_weights is not None:
            raise ValueError("set the *_reward_weight fields, not reward_weights (it is derived from them)")
        if self.sync_ref_model:
            raise ValueError("sync_ref_model is not supported by LensGRPOTrainer")
        if self.trust_remote_code:  # trl would pass it to any model or processor it loads by name
            raise ValueError("trust_remote_code must be false: lens_ros never runs code shipped with a checkpoint")
        if self.use_lora and self.stage == STAGE_CONTEXT_HEAD:
            raise ValueError("use_lora applies to stage 2 only (stage 1 trains the context head alone)")
        if self.use_vllm and self.vllm_mode == "colocate":  # trl's default mode
            raise ValueError("vllm_mode=colocate is not supported: trl's colocated vLLM loads the model by name, and "
                             "a LENS checkpoint is no Qwen2.5-VL directory vLLM reads; serve a Qwen2.5-VL of the "
                             "same size (trl vllm-serve) and set vllm_mode=server")
        if self.use_vllm:
            from trl.import_utils import is_vllm_available

            if not is_vllm_available():  # trl would say so only after the model is loaded, in a traceback
                raise ValueError("use_vllm needs vLLM, which is not installed: pip install 'trl[vllm]' (a CUDA "
                                 "GPU; vLLM generates the rollouts' text, the mask pass stays in PyTorch), or set "
                                 "use_vllm=false")
        if self.bf16 is None:  # trl would say True even on a CPU
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.stage == STAGE_CONTEXT_HEAD:
            # GRPO's generation-batch bookkeeping is unused in stage 1; satisfy its divisibility checks.
            self.generation_batch_size, self.steps_per_generation = None, self.num_generations
        elif self.ddp_find_unused_parameters is None:
            # DDP: some trainable parameters never get a gradient (SAM2's point and mask prompt paths, its
            # IoU and object-score heads) and a slice without GT masks has no mask loss; DDP's search for
            # unused parameters handles both (LensGRPOTrainer.compute_loss puts the mask loss in the
            # forward's output). transformers would turn it off with gradient checkpointing, which needs
            # it off only when reentrant (trl's default is not).
            self.ddp_find_unused_parameters = True
        reward = self.unified_reward()
        if not reward.functions() and self.stage == STAGE_GRPO:
            raise ValueError("every reward weight is 0: GRPO needs at least one reward")
        self.reward_weights = reward.weights()
        super().__post_init__()

    def unified_reward(self) -> UnifiedReward:
        return UnifiedReward(think_format=self.think_format_reward_weight, box_iou=self.box_iou_reward_weight,
                             mask_iou=self.mask_iou_reward_weight, boundary_iou=self.boundary_iou_reward_weight,
                             success=self.success_reward_weight, squared=self.squared_rewards)


# ---------------------------------------------------------------------------------------------
# Samples -> rows for trl
# ---------------------------------------------------------------------------------------------
def vlm_box(box, image_size: tuple[int, int], vlm_size: tuple[int, int]) -> list[float]:
    """A box in source pixels (x1, y1, x2, y2) scaled per axis into the VLM-resized image's pixels."""
    (height, width), (vlm_h, vlm_w) = image_size, vlm_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 * vlm_w / width, y1 * vlm_h / height, x2 * vlm_w / width, y2 * vlm_h / height]


def stage1_answer(expression: str, box_vlm: Sequence[float]) -> str:
    """LENS's stage-1 teacher-forced answer: Qwen's grounding format with the GT box in VLM pixels.

    ``<|object_ref_start|>{expr}.<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``; the
    final period is added only when the expression lacks one.
    """
    x1, y1, x2, y2 = (int(round(v)) for v in box_vlm)
    text = expression.strip()
    text = text if text.endswith(".") else text + "."
    return f"<|object_ref_start|>{text}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def prompt_messages(expression: str, cot: bool = False) -> list[dict]:
    """The LENS chat prompt in trl's conversational form (string contents; trl inserts the image
    placeholder before the user text, which renders exactly as ``prompts.build_messages``)."""
    return [{"role": "system", "content": prompts.SYSTEM_PROMPT},
            {"role": "user", "content": prompts.user_prompt(expression, cot)}]


def sample_to_row(sample, sample_id: int, cot: bool = False) -> dict:
    """One ``Sample`` as one trl row. ``image`` is what the VLM sees (smart_resize + bicubic, as the
    pipeline prepares it); ``source_image`` is the original, for SAM2 and the mask sizes."""
    rgb = np.ascontiguousarray(sample.image)
    height, width = rgb.shape[:2]
    vlm_h, vlm_w = vlm_resize_shape(height, width)
    source = Image.fromarray(rgb)
    mask = None if sample.mask is None else np.asarray(sample.mask, dtype=bool)
    if mask is not None and mask.shape != (height, width):
        raise ValueError(f"{sample.source}: mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
    return {
        "sample_id": int(sample_id),
        "prompt": prompt_messages(sample.expression, cot),
        "image": source.resize((vlm_w, vlm_h), Image.BICUBIC),
        "source_image": source,
        "image_size": [height, width],
        "expression": sample.expression,
        "gt_box_vlm": None if sample.box is None else vlm_box(sample.box, (height, width), (vlm_h, vlm_w)),
        "gt_masks": mask,
        "success": sample.success,
        "source": sample.source,
    }


# An expression becomes chat text (the prompt, and stage 1's teacher-forced answer), tokenized with the
# model's control tokens parsed: one from a data set or a recorded episode holding "<|im_end|>" would
# write the chat's structure, as a command would at inference (see lens_ros.pipeline). lens-train's
# path leaves such samples out with one warning (plain_text_samples); the rows refuse any that reach them.
def plain_text_samples(samples: Sequence, tokenizer) -> Sequence:
    """``samples`` without those whose expression holds a control token of the model (``check_plain_text``
    with ``tokenizer``'s own tokens), with one warning that counts them. No image is read."""
    control = control_tokens(tokenizer)
    kept, dropped = drop_expressions(samples, lambda text: expression_refusal(text, control))
    if dropped:
        warnings.warn(f"left out {len(dropped)} training expression(s) holding control tokens of the model "
                      f"({len(samples)} samples before, {len(kept)} after); the first: {dropped[0]}", stacklevel=2)
    return kept


def expression_refusal(text: str, control) -> str | None:
    """Why ``text`` cannot be a training expression (``check_plain_text``'s message), or None."""
    try:
        check_plain_text(text, control, what="expression")
    except InvalidInputError as error:
        return str(error)
    return None


def check_row_expression(sample, control) -> None:
    """Refuse (``InvalidInputError`` naming the sample) an expression holding a control token of the model."""
    reason = expression_refusal(sample.expression, control)
    if reason is not None:
        raise InvalidInputError(f"{sample.source}: {reason}")


def check_processor_keeps_size(processor, vlm_image: Image.Image) -> None:
    """Fail when the processor would resize the already resized image again (its pixel bounds
    differ from LENS's): the GT box would then not be in the pixels the VLM sees."""
    patch = processor.image_processor.patch_size
    grid = processor.image_processor(images=[vlm_image], return_tensors="pt")["image_grid_thw"][0].tolist()
    if grid[1:] != [vlm_image.height // patch, vlm_image.width // patch]:
        raise ValueError(f"the processor resizes a {vlm_image.width}x{vlm_image.height} image to "
                         f"{grid[2] * patch}x{grid[1] * patch}: its min/max pixels differ from LENS's")


def samples_to_rows(samples: Sequence, processor=None, cot: bool = False) -> list[dict]:
    """Rows for trl (see ``sample_to_row``), all in memory. With ``processor``, each distinct image
    size is checked to reach the VLM unresized (``check_processor_keeps_size``) and each expression
    to hold no control token of the model (``check_row_expression``)."""
    rows, checked = [], set()
    control = control_tokens(processor.tokenizer) if processor is not None else None
    for index, sample in enumerate(samples):
        if control is not None:
            check_row_expression(sample, control)
        row = sample_to_row(sample, index, cot)
        if processor is not None and row["image"].size not in checked:
            check_processor_keeps_size(processor, row["image"])
            checked.add(row["image"].size)
        rows.append(row)
    return rows


def rows_dataset(samples: Sequence, processor=None, cot: bool = False):
    """A ``datasets.Dataset`` (what trl requires) that builds each row from ``samples`` when it is read.

    The Arrow table holds only the sample ids; images and masks stay in the sample sequence (lazy
    data sets read them from disk), so RefCOCO-sized data sets cost no memory and no conversion, and
    masks reach the rewards as bool numpy arrays rather than nested lists. With ``processor``, a row
    whose expression holds a control token of the model is refused when read (``check_row_expression``;
    ``plain_text_samples`` leaves such samples out beforehand).
    """
    import datasets

    if len(samples) == 0:
        raise ValueError("no training samples")
    control = None
    if processor is not None:
        check_processor_keeps_size(processor, sample_to_row(samples[0], 0, cot)["image"])
        control = control_tokens(processor.tokenizer)

    def read_row(index: int) -> dict:
        sample = samples[index]
        if control is not None:
            check_row_expression(sample, control)
        return sample_to_row(sample, index, cot)

    def build(batch: dict) -> dict:
        rows = [read_row(int(i)) for i in batch["sample_id"]]
        return {key: [row[key] for row in rows] for key in rows[0]}

    return datasets.Dataset.from_dict({"sample_id": list(range(len(samples)))}).with_transform(build)


class SetEpochCallback(TrainerCallback):
    """Calls ``samples.set_epoch(epoch)`` each epoch (RefDataset draws a new expression per ref)."""

    def __init__(self, samples) -> None:
        self.samples = samples

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.samples, "set_epoch"):
            self.samples.set_epoch(int(state.epoch or 0))


# ---------------------------------------------------------------------------------------------
# Mask loss
# ---------------------------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask Dice loss on sigmoid probabilities: 1 - (2|P.T| + s) / (|P| + |T| + s); shape (N,)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    return 1 - (2 * (probs * targets).sum(-1) + smooth) / (probs.sum(-1) + targets.sum(-1) + smooth)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, bce_weight: float = 1.0,
              dice_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LENS's mask loss on (N, H, W) logits at the GT size: weighted BCE-with-logits (mean over pixels)
    + Dice, each averaged over the N masks. Returns (total, bce, dice)."""
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), targets.flatten(1), reduction="none").mean(-1).mean()
    dice = dice_loss(logits, targets).mean()
    return bce_weight * bce + dice_weight * dice, bce, dice


# ---------------------------------------------------------------------------------------------
# The mask pass in training (LensPipeline.mask_logits on training inputs)
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class RolloutImage(ImageSizes):
    """One image of a batch, shared by all rows (completions) about it."""

    rgb: np.ndarray
    vlm_image: Image.Image
    gt_mask: np.ndarray | None
    sam_backbone: dict | None = None  # SAM2's frozen image-encoder output, computed once, no grad


def rollout_images(rows: list[dict]) -> list[RolloutImage]:
    """One ``RolloutImage`` per row, the same object for rows of the same sample."""
    by_sample: dict[int, RolloutImage] = {}
    images = []
    for row in rows:
        image = by_sample.get(row["sample_id"])
        if image is None:
            image = RolloutImage(rgb=np.asarray(row["source_image"].convert("RGB")), vlm_image=row["image"],
                                 gt_mask=row.get("gt_masks"))
            by_sample[row["sample_id"]] = image
        images.append(image)
    return images


def groups_by_image(images: Sequence[RolloutImage]) -> list[tuple[RolloutImage, list[int]]]:
    """(image, indices of the rows about it), in first-seen order."""
    groups: dict[int, tuple[RolloutImage, list[int]]] = {}
    for index, image in enumerate(images):
        groups.setdefault(id(image), (image, []))[1].append(index)
    return list(groups.values())


@torch.no_grad()
def sam_image_backbone(lens, image: RolloutImage) -> dict:
    """SAM2's image-encoder output for ``image`` (frozen encoder: computed once, without gradients)."""
    if image.sam_backbone is None:
        sam = lens.sam
        pixels = sam_pixels(image.rgb, sam_input_size(sam)).to(lens.learnable_query.device, sam.no_mem_embed.dtype)
        image.sam_backbone = sam.image_encoder(pixels)
    return image.sam_backbone


def repeat_vision_features(features, count: int):
    """The vision tower output of one image, repeated for ``count`` sequences of a batch."""
    return SimpleNamespace(pooler_output=tuple(features.pooler_output) * count)


def batch_mask_logits(pipeline: LensPipeline, image: RolloutImage, sequences: torch.Tensor, pixel_values: torch.Tensor,
                      image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Mask logits (N, H, W) at the source size for N prompt + answer sequences about one image.

    Runs under the caller's grad mode: the vision tower, the mask pass, the context head and SAM2's
    decoder (with ``conv_s0``/``conv_s1``) record gradients when enabled; the image encoder never does.
    Padding (pad ids, either side) gets attention 0, as in the pipeline.
    """
    lens = pipeline.model
    features = lens.image_features(pixel_values, image_grid_thw)
    embedding = embed_backbone(lens.sam, sam_image_backbone(lens, image), lens.sam.no_mem_embed.dtype)
    prepared = PreparedImage(rgb=image.rgb, fingerprint="", vlm_image=image.vlm_image, sam_embedding=embedding,
                             preprocess_ms=0.0, image_encoder_ms=0.0,
                             vision_features=repeat_vision_features(features, sequences.shape[0]))
    with warnings.catch_warnings():  # mask_logits reads SAM2's IoU score as a float: harmless with gradients on
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        logits, _ = pipeline.mask_logits(prepared, sequences)
    return logits[:, 0]


def pad_right(sequences: list[list[int]], pad_id: int, device) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# Which parameters train
# ---------------------------------------------------------------------------------------------
class LensTrainables(nn.Module):
    """The context head and SAM2 of a ``LensModel`` (the same parameter objects), to be registered
    inside the VLM so that the trainer treats them as part of the model it optimises."""

    def __init__(self, lens) -> None:
        super().__init__()
        self.learnable_query = lens.learnable_query
        for name in CONTEXT_HEAD_MODULES:
            if hasattr(lens, name):
                setattr(self, name, getattr(lens, name))
        self.sam = lens.sam


def context_head_parameters(lens) -> list[nn.Parameter]:
    params = [lens.learnable_query]
    for name in CONTEXT_HEAD_MODULES:
        if hasattr(lens, name):
            params += list(getattr(lens, name).parameters())
    return params


def set_trainable(lens, stage: int, vlm_trainable: bool = True) -> None:
    """Stage 1: the context head only. Stage 2: the VLM (unless LoRA handles it), the context head,
    SAM2's prompt encoder and mask decoder. SAM2's image encoder (and its other parts) never."""
    lens.requires_grad_(False)
    if stage == STAGE_GRPO:
        with trainables_detached(lens.vlm):  # the VLM's own weights only
            lens.vlm.requires_grad_(vlm_trainable)
    for param in context_head_parameters(lens):
        param.requires_grad_(True)
    if stage == STAGE_GRPO:
        lens.sam.sam_prompt_encoder.requires_grad_(True)
        lens.sam.sam_mask_decoder.requires_grad_(True)
    lens.sam.image_encoder.requires_grad_(False)


@contextlib.contextmanager
def trainables_detached(vlm: nn.Module):
    """The VLM without the ``lens_trainables`` submodule, e.g. while a checkpoint is written."""
    trainables = vlm._modules.pop(TRAINABLES_NAME, None)
    try:
        yield vlm
    finally:
        if trainables is not None:
            vlm._modules[TRAINABLES_NAME] = trainables


def lora_config(config: LensTrainingConfig):
    from peft import LoraConfig

    # A regex (full match): the named projections of the language model's layers, nothing else.
    targets = "|".join(sorted(set(config.lora_target_modules)))
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                      target_modules=rf".*language_model\.layers\.\d+\..*\.({targets})")


class SetupError(ValueError):
    """A distributed setup lens-train cannot train as asked (the message says what to use instead)."""


def vlm_weights_only(named_weights):
    """trl's iterator of the weights it sends vLLM (``VLLMGeneration._iter_named_params``), without the
    context head and SAM2 riding in the VLM (``TRAINABLES_NAME``): vLLM's Qwen2.5-VL has no such
    weights. Every process still walks all parameters (gathering them is a collective)."""
    prefix = TRAINABLES_NAME + "."

    def iterate():
        for name, weight in named_weights():
            if not name.startswith(prefix):
                yield name, weight

    return iterate


def check_sharding(trainer: Trainer) -> None:
    """Refuse, before training, the setups lens-train cannot run as asked: FSDP or DeepSpeed that
    accelerate dropped, ZeRO-3 told to shard while loading (``whole_at_load``), and under FSDP or ZeRO-3
    what they cannot save (a LENS checkpoint is written from the whole weights, which only a full state
    dict holds, and LoRA is merged into them, which needs the base weights whole: a LoRA run fits one
    GPU per process, DDP or ZeRO-2)."""
    from accelerate.utils import parse_flag_from_env

    # accelerate 1.15 turns FSDP and DeepSpeed on for GPU-type devices only: elsewhere (use_cpu) it drops
    # them without a word and trains as DDP, which must not pass for the setup that was asked for.
    for name, asked, enabled in (("FSDP", parse_flag_from_env("ACCELERATE_USE_FSDP") or bool(trainer.args.fsdp),
                                  trainer.is_fsdp_enabled),
                                 ("DeepSpeed", parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or
                                  bool(trainer.args.deepspeed), trainer.is_deepspeed_enabled)):
        if asked and not enabled:
            raise SetupError(f"{name} was asked for, but accelerate did not enable it on {trainer.accelerator.device}"
                             f" ({trainer.accelerator.distributed_type}): accelerate runs {name} on GPUs only; "
                             "on CPUs use training/accelerate/ddp.yaml")
    zero3 = zero3_enabled(trainer)
    if zero3 and trainer.accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise SetupError("DeepSpeed ZeRO-3: set zero3_init_flag: false (training/accelerate/deepspeed_zero3.yaml); "
                         "every process loads the LENS checkpoint whole, and DeepSpeed shards it when training starts")
    if not (trainer.is_fsdp_enabled or zero3):
        return
    if getattr(trainer.args, "stage", STAGE_GRPO) == STAGE_CONTEXT_HEAD or trainer.args.use_lora:
        raise SetupError(f"{'FSDP' if trainer.is_fsdp_enabled else 'DeepSpeed ZeRO-3'} is for full fine-tuning in "
                         "stage 2; stage 1 and LoRA runs use training/accelerate/ddp.yaml (or deepspeed_zero2.yaml)")
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        raise SetupError("FSDP: set fsdp_state_dict_type: FULL_STATE_DICT (training/accelerate/fsdp.yaml); "
                         "lens_ros writes LENS checkpoints from the whole weights")


def load_for_resume(lens, vlm: nn.Module, directory: str | os.PathLike) -> None:
    """Put the weights of our own ``checkpoint-N`` back into ``lens`` (in place, before the optimizer
    is built), for transformers' resume. Its own loader would find no weight of the VLM it trains under
    LENS's names and, loading non-strictly, silently keep the starting weights.

    ``vlm`` is the model the trainer optimises: the LensModel's VLM, or trl's PeftModel around it. With
    LoRA the checkpoint's Qwen weights are merged, so the base stays the starting model (checked: the
    frozen weights must be the checkpoint's), and the adapters come from ``ADAPTER_DIR``.
    """
    from peft import PeftModel

    directory = Path(directory)
    if sharded(vlm):  # FSDP2: torch's loader puts each process's shard of the whole weights in place
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights = trained_names(read_lens_weights(directory))
        if lens.vlm.config.tie_word_embeddings:  # left out of the checkpoint, as save_pretrained does
            weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]
        set_model_state_dict(vlm, weights, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    with trainables_detached(lens.vlm):
        if not isinstance(vlm, PeftModel):
            load_lens_weights(lens, directory)
            return
        load_lens_weights(lens, directory, vlm=False)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = directory / ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_DIR}/adapter_model.safetensors; a LoRA run resumes only "
                                "from checkpoints that hold their adapters")
    weights = load_file(str(adapter))
    with trainables_detached(lens.vlm):
        result = set_peft_model_state_dict(vlm, weights)
        expected = {k for k, p in vlm.named_parameters() if "lora_" in k}
    missing = {k for k in result.missing_keys if "lora_" in k}
    if result.unexpected_keys or missing or len(expected) != len(weights):
        raise ValueError(f"{adapter}: adapters do not match this run's LoRA configuration (unexpected "
                         f"{sorted(result.unexpected_keys)[:3]}, missing {sorted(missing)[:3]})")


def resume_checkpoint(config: LensTrainingConfig) -> str | None:
    """``config.resume_from_checkpoint`` as a checkpoint directory: None (start afresh), a path, or
    ``latest``, the complete ``checkpoint-N`` of ``output_dir`` with the highest N. A checkpoint that
    is not there, or was not completely written, is a ``FileNotFoundError`` that says so."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

    wanted = config.resume_from_checkpoint
    if wanted is None:
        return None
    if wanted == RESUME_LATEST:
        output = Path(config.output_dir)
        found = sort_checkpoints(str(output), PREFIX_CHECKPOINT_DIR) if output.is_dir() else []
        complete = [path for path in found if (Path(path) / TRAINER_STATE_FILE).is_file()]
        if not complete:
            raise FileNotFoundError(f"resume_from_checkpoint=latest: no complete {PREFIX_CHECKPOINT_DIR}-N (with "
                                    f"{TRAINER_STATE_FILE}) in {output}")
        return complete[-1]
    path = Path(wanted)
    if not (path / TRAINER_STATE_FILE).is_file():
        problem = "does not exist" if not path.exists() else f"holds no {TRAINER_STATE_FILE} (not a checkpoint-N " \
                                                             "written during training, or cut off while written)"
        raise FileNotFoundError(f"resume_from_checkpoint: {path} {problem}")
    return str(path)


def zero3_enabled(trainer: Trainer) -> bool:
    return trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


@contextlib.contextmanager
def whole_at_load(config: LensTrainingConfig):
    """Models loaded inside are whole, not ZeRO-3 partitions: the KL reference is a copy of the VLM, which
    a partitioned VLM cannot give, and SAM2 and the context head are not built by transformers.

    Under ``accelerate launch`` with DeepSpeed, the training arguments register their DeepSpeed config
    for transformers globally, zero3_init_flag or not (accelerate 1.15), and ``from_pretrained`` then
    partitions while it loads. DeepSpeed shards the whole model when training starts."""
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    # What transformers registered: the config of ``deepspeed=<file>``, or accelerate's under accelerate launch.
    registered = getattr(config, "hf_deepspeed_config", None) or \
        getattr(getattr(config, "deepspeed_plugin", None), "dschf", None)
    if registered is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def mask_pass_parameters(trainables: nn.Module) -> list[nn.Parameter]:
    """The mask pass's own parameters (the context head's, SAM2's but its image encoder's), which it reads
    outside their modules' forward too (``learnable_query``, SAM2's ``no_mem_embed``, the mask decoder's
    token embeddings): ZeRO-3 gathers a module's own parameters only around its forward, and finds other
    uses by itself only inside the forward of the model it trains."""
    encoder = {id(p) for p in trainables.sam.image_encoder.parameters()}
    return [p for p in trainables.parameters() if id(p) not in encoder]


def sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are shards (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions): then
    its weights are whole only in the state dict transformers gathers for saving."""
    return any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in module.parameters())


def lens_names(trained_state: dict) -> dict:
    """The state dict of the model trl trains (the VLM, the context head and SAM2 inside it under
    ``TRAINABLES_NAME``) under the ``LensModel``'s own names, and ``trained_names`` the other way."""
    prefix = TRAINABLES_NAME + "."
    return {(k[len(prefix):] if k.startswith(prefix) else "vlm." + k): v for k, v in trained_state.items()}


def trained_names(lens_state: dict) -> dict:
    return {(k[len("vlm."):] if k.startswith("vlm.") else f"{TRAINABLES_NAME}.{k}"): v for k, v in lens_state.items()}


def _write_checkpoint(lens, processor, args, output_dir, weights=None) -> Path:
    path = save_lens_checkpoint(lens, processor, output_dir, weights=weights)
    torch.save(args, os.path.join(output_dir, "training_args.bin"))
    return path


# ---------------------------------------------------------------------------------------------
# Stage 2: GRPO + mask loss
# ---------------------------------------------------------------------------------------------
@dataclass
class OutputWithMaskLoss(FusedCausalLMOutput):
    """trl's policy-forward output plus the mask loss computed in the same forward (a ``ModelOutput``
    subclass, hence a pytree node, as DDP's handling of the output requires)."""

    mask_loss: torch.Tensor | None = None


class LensGRPOTrainer(GRPOTrainer):
    """LENS stage 2 on trl's GRPOTrainer (see the module docstring for what is overridden and why).

    Args:
        lens: a ``LensModel`` (e.g. from ``load_lens_model``), trained in place.
        processor: its processor.
        args: a ``LensTrainingConfig`` with ``stage=2``.
        train_dataset: rows as ``rows_dataset`` makes them.
    """

    def __init__(self, lens, processor, args: LensTrainingConfig, train_dataset, eval_dataset=None,
                 callbacks=None, reward_funcs=None) -> None:
        """``reward_funcs`` (with ``args.reward_weights``) replaces the config's unified reward, as
        trl's own argument does: for experiments and tests."""
        if args.stage != STAGE_GRPO:
            raise ValueError(f"LensGRPOTrainer runs stage 2; got stage={args.stage}")
        self.lens = lens
        self.mask_pipeline = LensPipeline(lens, processor, PipelineConfig(model="training", cot=args.cot))
        self._rollout_prompt_ids: list[list[int]] | None = None
        set_trainable(lens, STAGE_GRPO, vlm_trainable=not args.use_lora)
        lens.train()
        vlm = lens.vlm
        # trl would build the KL reference by loading the model by name, which a LENS checkpoint is not:
        # copy the VLM now (before LoRA and the extra submodule) and let trl believe beta is 0 meanwhile.
        reference = None
        if args.beta != 0.0 and not args.use_lora:
            reference = copy.deepcopy(vlm).eval().requires_grad_(False)
        vlm.add_module(TRAINABLES_NAME, LensTrainables(lens))
        beta, args.beta = args.beta, 0.0
        try:
            super().__init__(model=vlm, reward_funcs=reward_funcs or args.unified_reward().functions(), args=args,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processor,
                             callbacks=callbacks, peft_config=lora_config(args) if args.use_lora else None)
        finally:
            args.beta = beta
        self.beta = beta
        check_sharding(self)
        # ZeRO-3: gathered around the policy's forward (the mask loss is computed inside it) and for the rollouts.
        self._zero3_gathered = mask_pass_parameters(vlm._modules[TRAINABLES_NAME]) if zero3_enabled(self) else []
        if self._zero3_gathered:
            import deepspeed

            for param in self._zero3_gathered:
                deepspeed.zero.register_external_parameter(vlm, param)
        if self.use_vllm:  # vLLM gets the VLM's weights after each step; the context head and SAM2 are ours
            self.vllm_generation._iter_named_params = vlm_weights_only(self.vllm_generation._iter_named_params)
        if reference is not None:
            self.ref_model = self._prepare_reference(reference)
        if args.use_lora:  # PEFT froze every base parameter, ours included
            set_trainable(lens, STAGE_GRPO, vlm_trainable=False)
            for name, param in self.model.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)

    def _prepare_reference(self, reference: nn.Module) -> nn.Module:
        from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

        if self.args.disable_dropout:
            disable_dropout_in_model(reference)
        add_fused_lm_head(reference, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        # As trl prepares its own reference model: DeepSpeed and FSDP need their own wrapping (under ZeRO-3 a
        # plain prepare_model leaves its weights partitioned outside any engine).
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            return prepare_fsdp(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    # -- rollouts -------------------------------------------------------------------------------
    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        self._rollout_prompt_ids = result[0]  # un-padded prompt ids, one list per completion
        return result

    def _generate_and_score_completions(self, inputs):
        images = rollout_images(inputs)
        inputs = [{**row, "lens_image": image} for row, image in zip(inputs, images)]
        with warnings.catch_warnings():  # trl 1.16 reads a property transformers 5 deprecates, twice a step
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            output = super()._generate_and_score_completions(inputs)
        # A list travels with trl's shuffling and splitting of the generation batch, row for row.
        output["lens_images"] = images
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        pred_masks = self._rollout_masks(inputs, completions, completion_ids_list)
        inputs = [{**row, "pred_masks": mask} for row, mask in zip(inputs, pred_masks)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _query_from_trainables(self) -> None:
        """Point the LensModel's ``learnable_query`` at the parameter the trained model holds now.

        They are one object until FSDP2 shards the model: it swaps the parameters of the modules it
        manages (for shards, and for whole ones while they run), and the LensModel, outside the tree it
        was given, kept the original query, which then no longer trained. The context head's and SAM2's
        modules are shared objects, so they follow by themselves."""
        held = self.lens.vlm._modules[TRAINABLES_NAME]._parameters["learnable_query"]
        if self.lens._parameters["learnable_query"] is not held:
            self.lens._parameters["learnable_query"] = held

    @contextlib.contextmanager
    def _whole_weights(self):
        """The parameters the rollouts' mask pass reads outside a module's forward, whole: FSDP2's root
        unit, ZeRO-3's ``mask_pass_parameters``; nested units and modules gather themselves when they
        run. Without sharding: nothing to do."""
        if self._zero3_gathered:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self._zero3_gathered):
                yield
            return
        if not (sharded(self.model) and hasattr(self.model, "unshard")):
            yield
            return
        self.model.unshard()
        try:
            self._query_from_trainables()
            yield
        finally:
            self.model.reshard()

    @torch.no_grad()
    def _rollout_masks(self, inputs, completions, completion_ids_list) -> list[np.ndarray | None]:
        """Each completion's own mask (bool, source size), None when its answer has no usable box
        (the pipeline's ``found``)."""
        with self._whole_weights():
            return self._rollout_masks_unsharded(inputs, completions, completion_ids_list)

    def _rollout_masks_unsharded(self, inputs, completions, completion_ids_list) -> list[np.ndarray | None]:
        masks: list[np.ndarray | None] = [None] * len(inputs)
        pad_id = self.processing_class.tokenizer.pad_token_id
        device = self.accelerator.device
        for image, indices in groups_by_image([row["lens_image"] for row in inputs]):
            found = [i for i in indices if prompts.parse_answer(
                completion_text(completions[i]), vlm_size=image.vlm_size, image_size=image.size).found]
            if not found:
                continue
            sequences = pad_right([list(self._rollout_prompt_ids[i]) + list(completion_ids_list[i]) for i in found],
                                  pad_id, device)
            vision = self.processing_class.image_processor(images=[image.vlm_image], return_tensors="pt")
            with self.accelerator.autocast():
                logits = batch_mask_logits(self.mask_pipeline, image, sequences, vision["pixel_values"].to(device),
                                           vision["image_grid_thw"].to(device))
            for i, mask in zip(found, (logits > 0).cpu().numpy()):
                masks[i] = mask
        return masks

    # -- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.mask_loss_weight == 0.0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms = []

        def mask_loss_in_forward(module, args, output):
            # trl's forward of the policy computes the mask loss too and returns it with its output. Under
            # DDP the mask pass is then part of the wrapped forward, and the mask loss an output whose
            # graph DDP searches for the parameters used: the context head and SAM2 (used by the mask loss
            # alone) are found. Computed after the forward, they were marked unused, then their gradients
            # came ("marked as ready twice"). One process: the same computation.
            if terms:  # the first forward only
                return None
            terms.append(self._rollout_mask_loss(inputs))
            return None if terms[0][0] is None else OutputWithMaskLoss(**output, mask_loss=terms[0][0])

        # On the module inside the DDP wrapper, for this call only (a hook left on the model would follow
        # it into copies, e.g. _lens_for_saving's). Ahead of the sharding engines' own hooks: ZeRO-3 releases
        # the policy's external parameters in its post-forward hook, and gathers them again for the
        # backward of the outputs it sees then, the mask loss included.
        handle = self.accelerator.unwrap_model(model).register_forward_hook(mask_loss_in_forward, prepend=True)
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if not terms:
            raise RuntimeError("trl computed its loss without a forward of the policy: no mask loss")
        mode = "train" if self.model.training else "eval"
        total, bce, dice = terms[0]
        if total is None:
            return loss
        self._metrics[mode]["mask_loss"].append(total.item())
        self._metrics[mode]["mask_bce"].append(bce.item())
        self._metrics[mode]["mask_dice"].append(dice.item())
        # trl divides its loss by the accumulation steps itself; the mask loss must follow suit.
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + self.args.mask_loss_weight * total / normalizer

    def _rollout_mask_loss(self, inputs):
        """Mean mask loss over the completions of this slice that have a GT mask, with gradients."""
        self._query_from_trainables()  # inside the policy's forward: FSDP2's whole parameters are in place
        images = inputs["lens_images"]
        if all(image.gt_mask is None for image in images):
            return None, None, None
        sequences = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        grids = inputs["image_grid_thw"]
        pixel_chunks = torch.split(inputs["pixel_values"], grids.prod(-1).tolist())  # one image per completion
        logits, targets = [], []
        with self.accelerator.autocast():
            for image, indices in groups_by_image(images):
                if image.gt_mask is None:
                    continue
                first = indices[0]
                logits.append(batch_mask_logits(self.mask_pipeline, image, sequences[indices], pixel_chunks[first],
                                                grids[first:first + 1]))
                target = torch.from_numpy(image.gt_mask).to(logits[-1].device)
                targets.append(target.expand(len(indices), -1, -1))
        total, bce, dice = (torch.zeros((), device=sequences.device) for _ in range(3))
        count = 0
        for group_logits, group_targets in zip(logits, targets):  # sizes differ between images
            n = group_logits.shape[0]
            t, b, d = mask_loss(group_logits, group_targets, self.args.bce_weight, self.args.dice_weight)
            total, bce, dice, count = total + t * n, bce + b.detach() * n, dice + d.detach() * n, count + n
        return total / count, bce / count, dice / count

    # -- saving ---------------------------------------------------------------------------------
    def _is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.accelerator.unwrap_model(self.model), PeftModel)

    @contextlib.contextmanager
    def _lens_for_saving(self):
        """The LensModel as LENS's layout wants it: no extra submodule, LoRA merged (into a copy)."""
        vlm = self.lens.vlm
        with trainables_detached(vlm):
            if not self._is_peft():
                yield self.lens
                return
            merged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
            self.lens.vlm = merged
            try:
                yield self.lens
            finally:
                self.lens.vlm = vlm

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        if sharded(self.model):  # the whole weights are only in what transformers gathered (check_sharding)
            if state_dict is None:
                raise RuntimeError("the model is sharded: save through save_model, which gathers its weights")
            with trainables_detached(self.lens.vlm):
                _write_checkpoint(self.lens, self.processing_class, self.args, output_dir, weights=lens_names(state_dict))
            return
        with self._lens_for_saving() as lens:
            _write_checkpoint(lens, self.processing_class, self.args, output_dir)
        if self._is_peft():  # the unmerged adapters, to resume from (load_for_resume)
            with trainables_detached(self.lens.vlm):
                # (LoRA here never adapts the embeddings: peft's "auto" would look for a base config to check.)
                self.accelerator.unwrap_model(self.model).save_pretrained(os.path.join(output_dir, ADAPTER_DIR),
                                                                          save_embedding_layers=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_for_resume(self.lens, self.accelerator.unwrap_model(self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_for_resume(self.lens, self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """FSDP2: the optimizer state as transformers wrote it (optimizer.bin, full), loaded by torch without
        strictness. Parameters that never had a gradient (SAM2's point-prompt and IoU heads) have no AdamW
        state, in the interrupted run as in an uninterrupted one; accelerate's loader is strict and refuses
        the checkpoint for them."""
        if checkpoint is None or not sharded(self.model) or not self.is_fsdp_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(os.path.join(checkpoint, "optimizer.bin"), weights_only=True) \
            if self.accelerator.is_main_process else {}
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def create_model_card(self, *args, **kwargs) -> None:
        pass  # trl's card describes a transformers model; a LENS checkpoint is not one

    def save_final(self) -> Path:
        """Write ``<output_dir>/final`` and end training: LoRA is merged into the weights in place and
        the extra submodule removed, so ``self.lens`` is a plain ``LensModel`` again. Sharded (FSDP, ZeRO-3):
        written from the weights transformers gathers (every process takes part), and ``self.lens``
        stays sharded: load ``final`` from disk."""
        final = Path(self.args.output_dir) / FINAL_DIR
        if sharded(self.model):
            self.save_model(str(final))
            return final
        if self._is_peft():
            merged = self.accelerator.unwrap_model(self.model).merge_and_unload()
            if merged is not self.lens.vlm:
                raise RuntimeError("merging LoRA did not give back the LensModel's VLM")
            self.model = merged
        self.lens.vlm._modules.pop(TRAINABLES_NAME, None)
        if self.args.should_save:
            _write_checkpoint(self.lens, self.processing_class, self.args, final)
        return final


# ---------------------------------------------------------------------------------------------
# Stage 1: context head, GT box teacher-forced
# ---------------------------------------------------------------------------------------------
class ContextHeadObjective(nn.Module):
    """Stage 1 as a module ``Trainer`` can train: ``forward(rows)`` returns the mask loss of the
    teacher-forced answers. The VLM and SAM2 are frozen; gradients reach the queries through the
    frozen language model."""

    def __init__(self, lens, processor, config: LensTrainingConfig) -> None:
        super().__init__()
        self.lens = lens
        self.pipeline = LensPipeline(lens, processor, PipelineConfig(model="training", cot=config.cot))
        self.bce_weight, self.dice_weight = config.bce_weight, config.dice_weight
        self.last_terms: dict[str, float] = {}

    @property
    def config(self):
        return self.lens.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.lens.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.lens.vlm.gradient_checkpointing_disable()

    def teacher_forced_logits(self, row: dict) -> torch.Tensor:
        """Mask logits (1, H, W) for the row's prompt + its GT-box answer."""
        image = RolloutImage(rgb=np.asarray(row["source_image"].convert("RGB")), vlm_image=row["image"],
                             gt_mask=row["gt_masks"])
        lens = self.lens
        embedding = embed_backbone(lens.sam, sam_image_backbone(lens, image), lens.sam.no_mem_embed.dtype)
        prepared = PreparedImage(rgb=image.rgb, fingerprint="", vlm_image=image.vlm_image, sam_embedding=embedding,
                                 preprocess_ms=0.0, image_encoder_ms=0.0)
        inputs = self.pipeline.prompt_inputs(prepared, row["expression"])
        # The answer as LensPipeline.answer_mask_logits appends it (that method runs in inference mode).
        tokenizer = self.pipeline.processor.tokenizer
        answer = stage1_answer(row["expression"], row["gt_box_vlm"]) + (tokenizer.eos_token or "")
        answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        sequence = torch.cat([inputs["input_ids"], answer_ids.to(inputs["input_ids"].device)], dim=1)
        prepared.vision_features = lens.image_features(inputs["pixel_values"], inputs["image_grid_thw"])  # frozen
        with warnings.catch_warnings():  # see batch_mask_logits
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            logits, _ = self.pipeline.mask_logits(prepared, sequence)
        return logits[:, 0]

    def forward(self, rows: list[dict]) -> dict:
        usable = [row for row in rows if row["gt_masks"] is not None and row["gt_box_vlm"] is not None]
        if not usable:
            raise ValueError("stage 1 needs samples with both a GT box and a GT mask; this batch has none")
        totals, bces, dices = [], [], []
        for row in usable:  # images differ in size: one sequence at a time
            logits = self.teacher_forced_logits(row)
            target = torch.from_numpy(row["gt_masks"]).to(logits.device)[None]
            total, bce, dice = mask_loss(logits, target, self.bce_weight, self.dice_weight)
            totals.append(total), bces.append(bce.detach()), dices.append(dice.detach())
        self.last_terms = {"mask_bce": float(torch.stack(bces).mean()), "mask_dice": float(torch.stack(dices).mean())}
        return {"loss": torch.stack(totals).mean()}


class LensStage1Trainer(Trainer):
    """LENS stage 1: ``transformers.Trainer`` on ``ContextHeadObjective``; checkpoints in LENS's layout."""

    def __init__(self, lens, processor, args: LensTrainingConfig, train_dataset, callbacks=None) -> None:
        if args.stage != STAGE_CONTEXT_HEAD:
            raise ValueError(f"LensStage1Trainer runs stage 1; got stage={args.stage}")
        self.lens = lens
        self.lens_processor = processor
        set_trainable(lens, STAGE_CONTEXT_HEAD)
        lens.train()
        self._term_history: dict[str, list[float]] = defaultdict(list)
        super().__init__(model=ContextHeadObjective(lens, processor, args), args=args, train_dataset=train_dataset,
                         data_collator=lambda rows: {"rows": rows}, callbacks=callbacks)
        check_sharding(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        for key, value in self.accelerator.unwrap_model(model).last_terms.items():
            self._term_history[key].append(value)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: attach the loss terms since the last one
            logs["mask_loss"] = logs["loss"]
            for key, values in self._term_history.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._term_history.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            _write_checkpoint(self.lens, self.lens_processor, self.args, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_for_resume(self.lens, self.lens.vlm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_for_resume(self.lens, self.lens.vlm, self.state.best_model_checkpoint)

    def save_final(self) -> Path:
        final = Path(self.args.output_dir) / FINAL_DIR
        if self.args.should_save:
            _write_checkpoint(self.lens, self.lens_processor, self.args, final)
        return final


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------
CURVE_KEYS = ("loss", "reward", "rewards/box_iou_reward/mean", "rewards/mask_iou_reward/mean",
              "rewards/think_format_reward/mean", "rewards/success_reward/mean", "mask_loss", "mask_bce", "mask_dice",
              "kl", "completions/mean_length", "learning_rate")


def curve_series(log_history: list[dict], keys: Sequence[str] = CURVE_KEYS) -> dict[str, tuple[list, list]]:
    """(steps, values) per key present in the trainer's log history (finite values only)."""
    series = {}
    for key in keys:
        points = [(entry["step"], float(entry[key])) for entry in log_history
                  if isinstance(entry.get(key), (int, float)) and math.isfinite(float(entry[key])) and "step" in entry]
        if points:
            series[key] = ([p[0] for p in points], [p[1] for p in points])
    return series


def plot_training_curves(log_history: list[dict], path: str | os.PathLike,
                         keys: Sequence[str] = CURVE_KEYS) -> Path | None:
    """A PNG with one panel per logged quantity (OpenCV drawing: matplotlib is not a dependency).
    Returns the path, or None when nothing was logged."""
    import cv2

    series = curve_series(log_history, keys)
    if not series:
        return None
    panel_w, panel_h, margin, cols = 420, 220, 40, 3
    rows = math.ceil(len(series) / cols)
    canvas = np.full((rows * panel_h, cols * panel_w, 3), 255, np.uint8)
    for index, (key, (steps, values)) in enumerate(series.items()):
        x0, y0 = (index % cols) * panel_w, (index // cols) * panel_h
        left, top, right, bottom = x0 + margin + 20, y0 + margin, x0 + panel_w - 15, y0 + panel_h - margin
        cv2.rectangle(canvas, (left, top), (right, bottom), (200, 200, 200), 1)
        lo, hi = min(values), max(values)
        span, step_span = (hi - lo) or 1.0, (max(steps) - min(steps)) or 1
        points = np.array([[left + (s - min(steps)) / step_span * (right - left),
                            bottom - (v - lo) / span * (bottom - top)] for s, v in zip(steps, values)], np.int32)
        cv2.polylines(canvas, [points.reshape(-1, 1, 2)], False, (180, 80, 20), 2, cv2.LINE_AA)
        for point in points if len(points) <= 30 else ():
            cv2.circle(canvas, tuple(int(c) for c in point), 3, (180, 80, 20), -1, cv2.LINE_AA)
        cv2.putText(canvas, key, (x0 + 10, y0 + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(canvas, f"{hi:.4g}", (x0 + 4, top + 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (90, 90, 90), 1)
        cv2.putText(canvas, f"{lo:.4g}", (x0 + 4, bottom), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (90, 90, 90), 1)
        cv2.putText(canvas, f"step {min(steps)}..{max(steps)}", (left, bottom + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (90, 90, 90), 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"cannot write {path}")
    return path


# ---------------------------------------------------------------------------------------------
# One call: load, train, save
# ---------------------------------------------------------------------------------------------
def build_trainer(config: LensTrainingConfig, lens, processor, samples: Sequence):
    """The stage's trainer on ``samples`` (a Sequence[Sample]), without those whose expression holds
    a control token of the model (``plain_text_samples``)."""
    samples = plain_text_samples(samples, processor.tokenizer)
    dataset = rows_dataset(samples, processor, cot=config.cot)
    callbacks = [SetEpochCallback(samples)]
    if config.stage == STAGE_CONTEXT_HEAD:
        return LensStage1Trainer(lens, processor, config, dataset, callbacks=callbacks)
    return LensGRPOTrainer(lens, processor, config, dataset, callbacks=callbacks)


def train_lens(config: LensTrainingConfig, model_source: str, samples: Sequence, allow_download: bool = False) -> Path:
    """Load ``model_source``, train it on ``samples`` as ``config`` says, write ``<output_dir>/final``
    (plus ``log_history.json`` and, with ``plot_curves``, ``training_curves.png``); return the final path.

    With ``config.resume_from_checkpoint`` (a ``checkpoint-N`` or ``latest``, see ``resume_checkpoint``)
    training goes on from that checkpoint: ``model_source`` must be the interrupted run's starting model
    (it is the KL reference, and LoRA's base)."""
    from lens_ros.model.checkpoint import load_lens_model

    resume = resume_checkpoint(config)
    with whole_at_load(config):
        lens, processor = load_lens_model(model_source, device="cpu", dtype="float32", allow_download=allow_download)
    trainer = build_trainer(config, lens, processor, samples)
    trainer.train(resume_from_checkpoint=resume)
    final = trainer.save_final()
    if trainer.args.should_save:
        output = Path(config.output_dir)
        (output / LOG_HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        if config.plot_curves:
            plot_training_curves(trainer.state.log_history, output / CURVES_FILE)
    return final
