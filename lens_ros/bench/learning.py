"""Does training learn? The tiny model, trained on the synthetic data set (CPU or GPU), against a held-out split.

    python -m lens_ros.bench.learning [--minutes 20] [--out DIR] [--device cuda]

A benchmark script, not a test: it builds a small random LENS checkpoint (``BENCH_SPEC``), writes the
synthetic referring data set, evaluates the model on the synthetic ``val`` split (images never
trained on), trains it in three stages within ``--minutes`` of wall time (evaluations included),
evaluates it again at regular intervals and at the end, and prints and writes the curve.

The stages, in order:

0. **Format warm-up (our addition, not in LENS's recipe; ``format_warmup`` below).** Supervised
   next-token training (cross-entropy) of the whole VLM on LENS's stage-1 answer
   ``<|object_ref_start|>{expr}.<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with the
   GT box, plus LENS's mask loss on the mask pass of that teacher-forced answer for a few rows of
   each batch (``WARMUP["mask_rows"]``), which also trains the context head and SAM2's prompt encoder
   and mask decoder. Why: a random model never writes a parseable box, so every GRPO reward is 0,
   every group's advantage is 0 and GRPO has no signal at all; the evaluation's ``found`` rate is 0
   too, so no mask is ever computed. LENS starts from Qwen2.5-VL-3B-Instruct (which already writes
   boxes) and a pre-trained SAM2 (which already segments); this stage stands in for both
   pre-trainings. Its learning rate follows a cosine over its time slice.
1. **LENS stage 1** (``training/lens_stage1.yaml`` through ``build_trainer``): mask loss only, the GT box
   teacher-forced as the answer, only the context head trained.
2. **LENS stage 2** (``training/lens_stage2_refcoco.yaml`` through ``build_trainer``): GRPO on the unified
   reward (box IoU^2 + mask IoU^2) plus the mask loss on every rollout; VLM, context head and SAM2's
   prompt encoder and mask decoder trained.

The recipes' LENS-scale values (epochs, 3e-6 / 3e-5 learning rates for a pre-trained 3B model,
768-token completions, batch sizes, checkpointing) are overridden by ``STAGE1_OVERRIDES`` /
``STAGE2_OVERRIDES``, which the JSON report lists; everything else comes from the recipe files.

Every evaluation point runs the real ``evaluate()`` (``LensPipeline.segment``, greedy, as ``lens-eval``)
on the same val samples and scores each answer with the real reward functions of
``lens_ros.training.rewards``: mean box IoU^2 reward (box in VLM pixels, 0 when nothing parses),
mean mask IoU^2 reward, plus cIoU, gIoU, box accuracy and found rate from ``SegmentationMetrics``.
It also reports the teacher-forced mask IoU (the mask from the GT-box answer, what stage 1 optimises),
which isolates the mask head from the box the VLM writes.

To read the figures, the run also scores answers that ignore the expression (``reference_points``): the
median training box for every sample, the whole image, every shape of the image, one of its shapes at
random. A model that segments shapes but does not ground the expression scores like "a random shape";
only a model that uses the expression rises above both that and the constant box.

Outputs in ``--out``: ``learning.json`` (settings, stage overrides, every evaluation point, the
before/after figures, the reference points, wall times), ``learning_curve.png`` (val metrics against
wall time), the stage-2 ``training_curves.png`` and the final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lens_ros.training.evaluate import json_ready
from lens_ros.training.synthetic import parse_size

DEFAULT_OUT = "lens_learning_out"
RESULT_JSON = "learning.json"
CURVE_PNG = "learning_curve.png"
RECIPES_DIR = Path(__file__).resolve().parents[2] / "training"

# Keys of an evaluation point, in the order printed.
POINT_KEYS = ("box_iou_reward", "mask_iou_reward", "box_iou", "mask_iou", "cIoU", "gIoU", "box_accuracy",
              "found_rate", "teacher_forced_mask_iou")


def bench_spec():
    """The tiny model of this benchmark: a wider and deeper VLM than the test model (still < 3M
    parameters), 8 context-head queries; the same tiny SAM2."""
    from lens_ros.model.tiny import TinySpec

    return TinySpec(num_queries=8, text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
                    vision_hidden=64, vision_layers=2, vocab_size=640, seed=0)


# LENS recipes -> this benchmark's scale (a random 3M-parameter model, a 2-core CPU, minutes).
STAGE1_OVERRIDES = {
    "learning_rate": 3e-4, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 10,
    "num_train_epochs": 1000, "per_device_train_batch_size": 8, "gradient_checkpointing": False,
    "save_strategy": "no", "logging_steps": 5, "dataloader_num_workers": 0, "seed": 0, "plot_curves": False,
}
STAGE2_OVERRIDES = {
    "learning_rate": 1e-4, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5,
    "num_train_epochs": 1000, "num_generations": 8, "per_device_train_batch_size": 16, "max_completion_length": 40,
    "gradient_checkpointing": False, "save_strategy": "no", "logging_steps": 5, "dataloader_num_workers": 0,
    "seed": 0, "plot_curves": False,
}
WARMUP = {"learning_rate": 2e-3, "batch_size": 16, "warmup_steps": 30, "weight_decay": 0.0, "mask_rows": 4}


# -- data -------------------------------------------------------------------------------------------
def is_simple(expression: str) -> bool:
    """'the <kind>', 'the <colour> shape', 'the <colour> <kind>': the expressions naming the target by
    its own attributes (no relations, superlatives or landmarks)."""
    from lens_ros.training.synthetic import COLOURS, KINDS

    words = expression.split()
    if not words or words[0] != "the":
        return False
    words = words[1:]
    if len(words) == 1:
        return words[0] in KINDS
    return len(words) == 2 and words[0] in COLOURS and (words[1] in KINDS or words[1] == "shape")


class SentenceSubset(Sequence):
    """The samples of a ``RefDataset`` (``sentences="all"``) whose expression passes ``keep``."""

    def __init__(self, dataset, keep: Callable[[str], bool]) -> None:
        self.dataset = dataset
        self.indices = [i for i, (entry, sentence) in enumerate(dataset._index)
                        if keep(dataset._entries[entry].sentences[sentence])]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.dataset[self.indices[index]]


def load_splits(root: Path, expressions: str, val_limit: int | None):
    """(train samples, val samples as a list) of the synthetic data set at ``root``."""
    from lens_ros.training.data import RefDataset

    if expressions == "simple":
        train = SentenceSubset(RefDataset(root, dataset="synthetic", split_by="unc", split="train", sentences="all"),
                               is_simple)
        val = SentenceSubset(RefDataset(root, dataset="synthetic", split_by="unc", split="val", sentences="all"),
                             is_simple)
    else:  # LENS's way: one random expression per ref and epoch for training, every expression for evaluation
        train = RefDataset(root, dataset="synthetic", split_by="unc", split="train", sentences="random")
        val = RefDataset(root, dataset="synthetic", split_by="unc", split="val", sentences="all")
    count = len(val) if val_limit is None else min(val_limit, len(val))
    # Spread the kept val samples over the whole split (consecutive ones share an image).
    picks = np.linspace(0, len(val) - 1, count).round().astype(int) if count else []
    return train, [val[int(i)] for i in picks]


# -- reference points -------------------------------------------------------------------------------
# Pixels this far apart between their brightest and darkest channel are a drawn shape: the synthetic
# colours span 120-210, the light textured background at most ~60.
SHAPE_CHROMA = 80


def _gt_box_vlm(sample) -> list[float]:
    from lens_ros.pipeline import vlm_resize_shape
    from lens_ros.training.trainer import vlm_box

    height, width = sample.image.shape[:2]
    return vlm_box(sample.box, (height, width), vlm_resize_shape(height, width))


def shape_masks(image: np.ndarray) -> list[np.ndarray]:
    """The drawn shapes of a synthetic image, one bool mask each (they never touch: ``GAP_PX``)."""
    import cv2

    chroma = image.max(axis=2).astype(np.int16) - image.min(axis=2)
    count, labels = cv2.connectedComponents((chroma > SHAPE_CHROMA).astype(np.uint8), connectivity=8)
    return [labels == label for label in range(1, count)]


def reference_points(train: Sequence, val: Sequence, train_boxes: int = 300) -> dict:
    """What answers that ignore the expression score on ``val``, so that a learning curve can be read:

    - ``constant_box``: the median GT box of ``train_boxes`` training samples (VLM pixels) for every
      sample (box IoU; its squared mean is the box reward it would earn);
    - ``whole_image``: the whole image as the mask;
    - ``all_shapes``: every drawn shape of the image as one mask (knows shapes, not which one);
    - ``random_shape``: one drawn shape at random (the mean over the image's shapes): a model that
      segments a shape but ignores the expression lands here; beating it needs grounding.
    """
    from lens_ros.training.metrics import box_iou, mask_iou

    picks = np.linspace(0, len(train) - 1, min(train_boxes, len(train))).round().astype(int)
    constant = np.median([_gt_box_vlm(train[int(i)]) for i in picks], axis=0)
    box_ious = [box_iou(constant, _gt_box_vlm(sample)) for sample in val]
    whole, every, one, one_reward = [], [], [], []
    for sample in val:
        shapes = shape_masks(sample.image)
        per_shape = [mask_iou(shape, sample.mask) for shape in shapes] or [0.0]
        whole.append(mask_iou(np.ones_like(sample.mask, dtype=bool), sample.mask))
        every.append(mask_iou(np.logical_or.reduce(shapes), sample.mask) if shapes else 0.0)
        one.append(float(np.mean(per_shape)))
        one_reward.append(float(np.mean(np.square(per_shape))))

    def mask_point(ious: list[float]) -> dict:
        return {"mask_iou": float(np.mean(ious)), "mask_iou_reward": float(np.mean(np.square(ious)))}

    return {
        "constant_box": {"box": [round(float(v), 1) for v in constant], "box_iou": float(np.mean(box_ious)),
                         "box_iou_reward": float(np.mean(np.square(box_ious)))},
        "whole_image": mask_point(whole),
        "all_shapes": mask_point(every),
        "random_shape": {"mask_iou": float(np.mean(one)), "mask_iou_reward": float(np.mean(one_reward))},
    }


def format_references(references: dict) -> str:
    """``reference_points`` on one line: each point's scores (its box coordinates left out)."""
    return "; ".join(f"{name} " + ", ".join(f"{key} {value:.3f}" for key, value in point.items() if key != "box")
                     for name, point in references.items())


# -- evaluation -------------------------------------------------------------------------------------
class _Recording:
    """A pipeline that keeps every ``SegmentationResult`` it returns (the full answer text and mask),
    so that the reward functions can score exactly what ``evaluate`` scored."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.model_name = pipeline.model_name
        self.results: list = []

    def segment(self, image, command):
        result = self.pipeline.segment(image, command)
        self.results.append(result)
        return result


def _module_modes(module):
    return [(m, m.training) for m in module.modules()]


def evaluate_point(lens, processor, val: list, max_new_tokens: int) -> dict:
    """One evaluation point on ``val`` (see the module docstring). The model's train/eval modes are restored."""
    import torch

    from lens_ros.pipeline import LensPipeline, PipelineConfig
    from lens_ros.training.evaluate import evaluate
    from lens_ros.training.metrics import mask_iou
    from lens_ros.training.rewards import box_iou_reward, mask_iou_reward
    from lens_ros.training.trainer import stage1_answer

    modes = _module_modes(lens)
    lens.eval()
    start = time.monotonic()
    try:
        # A fresh pipeline: the old one's cached image embedding predates the last training steps.
        config = PipelineConfig(model="bench", max_new_tokens=max_new_tokens)
        pipeline = _Recording(LensPipeline(lens, processor, config))
        report = evaluate(pipeline, val, progress=False, data="synthetic val")
        if report.summary["errors"] or len(pipeline.results) != len(val):
            raise RuntimeError(f"evaluation errors: {[row['error'] for row in report.rows if row['error']]}")
        box_rewards, mask_rewards, teacher_forced = [], [], []
        for sample, result in zip(val, pipeline.results):
            gt_box_vlm = _gt_box_vlm(sample)
            box_rewards += box_iou_reward([result.reasoning], gt_box_vlm=[gt_box_vlm])
            mask_rewards += mask_iou_reward([result.reasoning], pred_masks=[result.mask if result.found else None],
                                            gt_masks=[sample.mask])
            with torch.inference_mode():
                logits, _ = pipeline.pipeline.answer_mask_logits(sample.image, sample.expression,
                                                                 stage1_answer(sample.expression, gt_box_vlm))
            teacher_forced.append(mask_iou((logits[0, 0] > 0).cpu().numpy(), sample.mask))
    finally:
        for module, training in modes:
            module.training = training
    rows = report.rows
    summary = report.summary
    return {
        "box_iou_reward": float(np.mean(box_rewards)),
        "mask_iou_reward": float(np.mean(mask_rewards)),
        "box_iou": float(np.mean([row["box_iou"] for row in rows])),
        "mask_iou": float(np.mean([row["iou"] for row in rows])),
        "cIoU": summary["cIoU"], "gIoU": summary["gIoU"], "box_accuracy": summary["box_accuracy"],
        "found_rate": summary["found_rate"],
        "teacher_forced_mask_iou": float(np.mean(teacher_forced)),
        "samples": len(val),
        "eval_s": round(time.monotonic() - start, 1),
        "example": f"{val[0].expression!r} -> {pipeline.results[0].reasoning[:80]!r}",
    }


class Curve:
    """The evaluation points, printed as they come."""

    def __init__(self, lens, processor, val: list, max_new_tokens: int, start: float) -> None:
        self.lens, self.processor, self.val, self.max_new_tokens = lens, processor, val, max_new_tokens
        self.start = start
        self.points: list[dict] = []

    def evaluate(self, stage: str, step: int) -> dict:
        point = {"stage": stage, "step": int(step), "elapsed_s": 0.0,
                 **evaluate_point(self.lens, self.processor, self.val, self.max_new_tokens)}
        point["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.points.append(point)
        if len(self.points) == 1:
            print(f"{'stage':<10}{'step':>6}{'t[s]':>7}" + "".join(f"{key[:12]:>13}" for key in POINT_KEYS), flush=True)
        print(f"{stage:<10}{step:>6}{point['elapsed_s']:>7.0f}"
              + "".join(f"{point[key]:>13.3f}" for key in POINT_KEYS) + f"   eval {point['eval_s']:.0f}s  "
              + point["example"], flush=True)
        return point


# -- stage 0: format warm-up (our addition) --------------------------------------------------------
def _warmup_batch(rows: list[dict], processor):
    """Prompt + GT answer ids for a batch of rows, labels on the answer tokens only (right padding)."""
    import torch

    from lens_ros import prompts
    from lens_ros.training.trainer import stage1_answer

    tokenizer = processor.tokenizer
    ids, labels, pixels, grids = [], [], [], []
    for row in rows:
        chat = processor.apply_chat_template(prompts.build_messages(row["expression"]), tokenize=False,
                                             add_generation_prompt=True)
        inputs = processor(text=[chat], images=[row["image"]], return_tensors="pt")
        answer = stage1_answer(row["expression"], row["gt_box_vlm"]) + tokenizer.eos_token
        answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        prompt_ids = inputs["input_ids"][0]
        ids.append(torch.cat([prompt_ids, answer_ids]))
        labels.append(torch.cat([torch.full_like(prompt_ids, -100), answer_ids]))
        pixels.append(inputs["pixel_values"])
        grids.append(inputs["image_grid_thw"])
    length = max(len(i) for i in ids)

    def pad(tensor, value):
        return torch.cat([tensor, tensor.new_full((length - len(tensor),), value)])

    return {"input_ids": torch.stack([pad(i, tokenizer.pad_token_id) for i in ids]),
            "attention_mask": torch.stack([pad(torch.ones_like(i), 0) for i in ids]),
            "labels": torch.stack([pad(label, -100) for label in labels]),
            "pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}


def format_warmup(lens, processor, samples: Sequence, deadline: float, *, learning_rate: float, batch_size: int,
                  warmup_steps: int = 30, weight_decay: float = 0.0, seed: int = 0, mask_rows: int = 0,
                  on_eval: Callable[[int], None] | None = None, eval_every_s: float | None = None,
                  eval_cost_s: Callable[[], float] = lambda: 0.0) -> dict:
    """Stage 0 (our addition to LENS's recipe): supervised next-token training of the VLM (vision tower
    and language model) on the stage-1 answer with the GT box, until ``deadline`` (``time.monotonic()``).

    With ``mask_rows`` > 0, that many rows of each batch also get LENS's mask loss (BCE + Dice) on the
    mask pass of their teacher-forced answer (stage 1's ``teacher_forced_logits``), and the context head
    and SAM2's prompt encoder and mask decoder train too (stage 2's trainable set); with 0 only the VLM
    trains. Total loss = cross-entropy + mask loss.

    AdamW; linear warm-up over ``warmup_steps``, then a cosine decay to 0 at ``deadline``.
    ``on_eval(step)`` is called every ``eval_every_s`` seconds while more than twice ``eval_cost_s()``
    is left (its time counts: the deadline holds). Returns a summary (steps, epochs, last losses).
    """
    import torch

    from types import SimpleNamespace

    from lens_ros.training.trainer import STAGE_GRPO, ContextHeadObjective, mask_loss, sample_to_row, set_trainable

    if mask_rows > 0:
        set_trainable(lens, STAGE_GRPO)  # VLM, context head, SAM2 prompt encoder + mask decoder
        objective = ContextHeadObjective(lens, processor, SimpleNamespace(cot=False, bce_weight=1.0, dice_weight=1.0))
    else:
        lens.requires_grad_(False)
        lens.vlm.requires_grad_(True)
    mask_losses: list[float] = []
    params = [p for p in lens.parameters() if p.requires_grad]
    device = lens.learnable_query.device
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    rng = random.Random(seed)
    lens.train()
    step, epoch, losses, history = 0, 0, [], []
    begin = time.monotonic()
    seconds = max(deadline - begin, 1e-6)
    next_eval = begin + eval_every_s if eval_every_s else math.inf
    order: list[int] = []
    while time.monotonic() < deadline:
        if not order:
            if hasattr(samples, "set_epoch"):
                samples.set_epoch(epoch)
            order = list(range(len(samples)))
            rng.shuffle(order)
            epoch += 1
        indices, order = order[:batch_size], order[batch_size:]
        rows = [sample_to_row(samples[i], i) for i in indices]
        batch = {key: value.to(device) for key, value in _warmup_batch(rows, processor).items()}
        progress = min((time.monotonic() - begin) / seconds, 1.0)
        scale = (step + 1) / warmup_steps if step < warmup_steps else 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * scale
        loss = lens.vlm(**batch).loss
        if mask_rows > 0:
            terms = [mask_loss(objective.teacher_forced_logits(row),
                               torch.from_numpy(row["gt_masks"])[None].to(device))[0] for row in rows[:mask_rows]]
            masked = torch.stack(terms).mean()
            mask_losses.append(float(masked.detach()))
            loss = loss + masked
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            history.append({"step": step, "loss": float(np.mean(losses[-20:])), "lr": learning_rate * scale,
                            **({"mask_loss": float(np.mean(mask_losses[-20:]))} if mask_losses else {})})
        if on_eval is not None and next_eval <= time.monotonic() < deadline - 2 * eval_cost_s():
            on_eval(step)
            next_eval = time.monotonic() + eval_every_s
    lens.eval()
    return {"steps": step, "epochs": epoch, "train_s": round(time.monotonic() - begin, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "history": history}


# -- stages 1 and 2: LENS's recipes -----------------------------------------------------------------
def recipe_config(recipe_file: Path, overrides: dict, output_dir: Path):
    """A ``LensTrainingConfig`` from a recipe file with ``overrides`` applied (``model`` and ``data`` of
    the recipe are not used: the benchmark passes its model and samples itself)."""
    from lens_ros.training.cli import build_config, read_recipe

    recipe = {**read_recipe(recipe_file), **overrides, "output_dir": str(output_dir), "report_to": "none"}
    recipe["data"] = "synthetic"
    config, _, _, _ = build_config(recipe)
    return config


def _budget_callback(deadline: float, curve_eval: Callable[[int], None] | None, eval_every_s: float | None,
                     eval_cost_s: Callable[[], float] = lambda: 0.0):
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stops training at ``deadline`` (time.monotonic) and evaluates every ``eval_every_s``."""

        def __init__(self) -> None:
            self.next_eval = time.monotonic() + eval_every_s if eval_every_s else None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            if now >= deadline:
                control.should_training_stop = True
            elif self.next_eval is not None and self.next_eval <= now < deadline - 2 * eval_cost_s() and curve_eval:
                curve_eval(state.global_step)
                self.next_eval = time.monotonic() + eval_every_s
            return control

    return TimeBudget()


def run_stage(config, lens, processor, samples, deadline: float, curve_eval=None, eval_every_s=None,
              eval_cost_s=lambda: 0.0):
    """Train one LENS stage with ``build_trainer`` until ``deadline``; returns (trainer, summary)."""
    from lens_ros.training.trainer import TRAINABLES_NAME, build_trainer

    trainer = build_trainer(config, lens, processor, samples)
    trainer.add_callback(_budget_callback(deadline, curve_eval, eval_every_s, eval_cost_s))
    start = time.monotonic()
    trainer.train()
    lens.vlm._modules.pop(TRAINABLES_NAME, None)  # stage 2 rides the head and SAM2 inside the VLM
    lens.eval()
    return trainer, {"steps": trainer.state.global_step, "train_s": round(time.monotonic() - start, 1)}


# -- output -----------------------------------------------------------------------------------------
def plot_curve(points: list[dict], path: Path) -> Path | None:
    from lens_ros.training.trainer import plot_training_curves

    labels = {key: f"val {key} vs wall time [s]" for key in POINT_KEYS}
    entries = [{"step": int(round(p["elapsed_s"])), **{labels[k]: p[k] for k in POINT_KEYS}} for p in points]
    return plot_training_curves(entries, path, keys=[labels[k] for k in POINT_KEYS])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens_ros.bench.learning",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-time budget, evaluations included (20)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (./{DEFAULT_OUT})")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images, ~70%% train / 15%% val (2000)")
    parser.add_argument("--size", type=parse_size, default=(96, 96), help="synthetic image size WxH (96x96)")
    parser.add_argument("--expressions", choices=("simple", "all"), default="simple",
                        help="simple: 'the <kind>' / 'the <colour> shape|<kind>' only; all: the whole grammar")
    parser.add_argument("--val-samples", type=int, default=96, help="val samples per evaluation point (96)")
    parser.add_argument("--evals", type=int, default=5, help="evaluation points besides before/after (5)")
    parser.add_argument("--split", default="0.6,0.1,0.3",
                        help="fractions of the training time for stages 0,1,2 (0.6,0.1,0.3); 0 skips a stage")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="generation limit in evaluation (40)")
    parser.add_argument("--recipes", type=Path, default=RECIPES_DIR, help="folder of the recipe YAMLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None,
                        help="torch device of every stage (cuda when a CUDA GPU is there, else cpu)")
    args = parser.parse_args(argv)

    wall_start = time.monotonic()
    deadline = wall_start + args.minutes * 60
    fractions = [float(v) for v in args.split.split(",")]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not sum(fractions):
        parser.error("--split wants three non-negative fractions")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lens_ros.model.checkpoint import load_lens_model
    from lens_ros.model.tiny import build_tiny_checkpoint
    from lens_ros.training.synthetic import make_synthetic_refer
    from lens_ros.training.trainer import CURVES_FILE, plot_training_curves

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The trainers of stages 1 and 2 run on the device transformers picks: the same one, unless told cpu.
    on_cpu = {"use_cpu": torch.device(device).type == "cpu"}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    root = make_synthetic_refer(out / "synthetic_data", n_images=args.images, size=args.size, seed=0)
    train, val = load_splits(root, args.expressions, args.val_samples)
    spec = bench_spec()
    checkpoint = build_tiny_checkpoint(out / "initial", spec)
    lens, processor = load_lens_model(str(checkpoint), device=device)
    print(f"lens_ros.bench.learning: {len(train)} train samples, {len(val)} val samples "
          f"({args.expressions} expressions, {args.size[0]}x{args.size[1]}), model {spec}, "
          f"{sum(p.numel() for p in lens.vlm.parameters()) / 1e6:.2f}M VLM parameters, "
          f"device {device}, torch threads {torch.get_num_threads()}, budget {args.minutes:g} min", flush=True)

    curve = Curve(lens, processor, val, args.max_new_tokens, wall_start)
    references = reference_points(train, val)
    print(f"reference points (answers that ignore the expression): {format_references(references)}", flush=True)
    before = curve.evaluate("init", 0)
    # The first evaluation generates nothing (a random model stops at once); later ones write whole
    # answers and cost several times more. Reserve for the final one the longest seen, at least 4x this.
    def final_reserve() -> float:
        return 1.3 * max([4 * before["eval_s"]] + [p["eval_s"] for p in curve.points]) + 5

    train_time = deadline - time.monotonic() - final_reserve()
    if train_time <= 60:
        print(f"error: the budget leaves no time to train (one evaluation takes ~{final_reserve():.0f} s)",
              file=sys.stderr)
        return 2
    total = sum(fractions)
    ends = list(np.cumsum([train_time * f / total for f in fractions]) + time.monotonic())
    eval_every = train_time / (args.evals + 1)  # evaluations run inside the stages' time
    stages = {}

    def eval_cost() -> float:
        return curve.points[-1]["eval_s"]

    def eval_at(stage):
        return lambda step: curve.evaluate(stage, step)

    if fractions[0] > 0:
        stages["0_format_warmup"] = format_warmup(
            lens, processor, train, ends[0], learning_rate=WARMUP["learning_rate"], batch_size=WARMUP["batch_size"],
            warmup_steps=WARMUP["warmup_steps"], weight_decay=WARMUP["weight_decay"], seed=args.seed,
            mask_rows=WARMUP["mask_rows"], on_eval=eval_at("0-warmup"), eval_every_s=eval_every, eval_cost_s=eval_cost)
        curve.evaluate("0-warmup", stages["0_format_warmup"]["steps"])
    if fractions[1] > 0:
        config = recipe_config(args.recipes / "lens_stage1.yaml", {**STAGE1_OVERRIDES, **on_cpu}, out / "stage1")
        _, stages["1_context_head"] = run_stage(config, lens, processor, train, ends[1], eval_at("1-head"), eval_every,
                                                  eval_cost)
        curve.evaluate("1-head", stages["1_context_head"]["steps"])
    if fractions[2] > 0:
        config = recipe_config(args.recipes / "lens_stage2_refcoco.yaml", {**STAGE2_OVERRIDES, **on_cpu},
                               out / "stage2")
        stage_end = deadline - final_reserve()
        trainer, stages["2_grpo"] = run_stage(config, lens, processor, train, stage_end, eval_at("2-grpo"), eval_every,
                                                 eval_cost)
        plot_training_curves(trainer.state.log_history, out / "stage2" / CURVES_FILE)
        stages["2_grpo"]["log_history"] = trainer.state.log_history
        curve.evaluate("2-grpo", stages["2_grpo"]["steps"])
    after = curve.points[-1]
    wall = time.monotonic() - wall_start
    from lens_ros.model.checkpoint import save_lens_checkpoint

    save_lens_checkpoint(lens, processor, out / "final")

    print(f"\nbefore -> after on {len(val)} synthetic val samples, {wall / 60:.1f} min wall time:")
    for key in POINT_KEYS:
        print(f"  {key:<26}{before[key]:>8.3f} -> {after[key]:.3f}")
    print(f"  reference points: {format_references(references)}")
    document = {
        "command": " ".join(["python -m lens_ros.bench.learning", *(argv if argv is not None else sys.argv[1:])]),
        "wall_s": round(wall, 1), "budget_min": args.minutes, "device": device,
        "data": {"images": args.images, "size": list(args.size), "expressions": args.expressions,
                 "train_samples": len(train), "val_samples": len(val), "val_split": "val"},
        "model": asdict(spec), "vlm_parameters": sum(p.numel() for p in lens.vlm.parameters()),
        "stage_fractions": fractions,
        "stage0_format_warmup": {"ours_not_lens": True, **WARMUP},
        "stage1_overrides": {"recipe": "lens_stage1.yaml", **STAGE1_OVERRIDES},
        "stage2_overrides": {"recipe": "lens_stage2_refcoco.yaml", **STAGE2_OVERRIDES},
        "stages": stages, "reference_points": references, "before": before, "after": after, "curve": curve.points,
    }
    (out / RESULT_JSON).write_text(json.dumps(json_ready(document), indent=1) + "\n", encoding="utf-8")
    png = plot_curve(curve.points, out / CURVE_PNG)
    print(f"wrote {out / RESULT_JSON} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
