"""Every stage of a backend against the torch reference, each on the reference's own inputs.

``lens-export`` prints these differences for the graphs it writes, and the tests assert them:
each stage gets the inputs torch made for the stage before it (image features, SAM2 embedding,
prompt token), so a difference is that stage's alone and does not compound.
"""

from __future__ import annotations

import torch

from lens_ros.accel import MASK_PASS, SAM_IMAGE_ENCODER, SAM_MASK_DECODER, VISION_TOWER
from lens_ros.accel.stages import Stages

EXAMPLE_COMMAND = "the cup"
EXAMPLE_ANSWER = "<think>the box</think><answer>[40,30,120,90]</answer>"


def language_model_on_meta(model) -> bool:
    """True for ``real-size`` models, whose 3B language model has shapes only (no mask pass to run)."""
    return next(model.vlm.model.language_model.parameters()).device.type == "meta"


@torch.inference_mode()
def stage_inputs(model, processor, rgb, command: str = EXAMPLE_COMMAND, answer: str = EXAMPLE_ANSWER) -> dict:
    """The inputs of every stage for ``rgb``, ``command`` and a given ``answer``, as the torch pipeline
    makes them: SAM2 pixels, the vision tower's patches, prompt + answer ids, torch's image features,
    SAM2 embedding and prompt token (a seeded random token where the language model is on meta)."""
    from lens_ros.model.sam import sam_input_size
    from lens_ros.pipeline import LensPipeline, PipelineConfig, sam_pixels

    reference = Stages(model)
    pipeline = LensPipeline(model, processor, PipelineConfig(model="reference", overlap_sam_encoder=False),
                            stages=reference)
    prepared = pipeline.prepare_image(rgb)
    inputs = pipeline.prompt_inputs(prepared, command)
    pipeline.ensure_vision_features(prepared, inputs)
    answer_ids = processor.tokenizer(answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    sequence = torch.cat([inputs["input_ids"], answer_ids.to(pipeline.device)], dim=1)
    attention = torch.ones_like(sequence)
    if language_model_on_meta(model):
        shape = (1, 1, model.proj_to_sam[-1].out_features)
        token = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipeline.device, model.learnable_query.dtype)
    else:
        token = reference.mask_pass(sequence, attention, prepared.vision_features)
    return {"pixels": sam_pixels(rgb, sam_input_size(model.sam)).to(pipeline.device),
            "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
            "sequence": sequence, "attention": attention, "features": prepared.vision_features,
            "embedding": prepared.embedding(), "token": token}


@torch.inference_mode()
def stage_outputs(stages, given: dict, skip: tuple[str, ...] = ()) -> dict[str, list[torch.Tensor]]:
    """Each stage's outputs from ``stages`` on ``stage_inputs``'s inputs (the stages in ``skip`` not run)."""
    run = {
        SAM_IMAGE_ENCODER: lambda: (lambda e: [e.image_embed, *e.high_res_feats])(stages.encode_sam_image(given["pixels"])),
        VISION_TOWER: lambda: list(stages.image_features(given["pixel_values"], given["image_grid_thw"]).pooler_output),
        MASK_PASS: lambda: [stages.mask_pass(given["sequence"], given["attention"], given["features"])],
        SAM_MASK_DECODER: lambda: list(stages.decode_mask(given["embedding"], given["token"])),
    }
    return {stage: outputs() for stage, outputs in run.items() if stage not in skip}


@torch.inference_mode()
def reference_outputs(model, given: dict, skip: tuple[str, ...] = ()) -> dict[str, list[torch.Tensor]]:
    """torch's outputs of each stage: ``stage_inputs`` computed all of them but the mask decoder's (at
    real size the vision tower and SAM2's encoder take most of a minute each on a CPU: not run twice)."""
    embedding = given["embedding"]
    outputs = {SAM_IMAGE_ENCODER: [embedding.image_embed, *embedding.high_res_feats],
               VISION_TOWER: list(given["features"].pooler_output), MASK_PASS: [given["token"]],
               SAM_MASK_DECODER: list(Stages(model).decode_mask(embedding, given["token"]))}
    return {stage: tensors for stage, tensors in outputs.items() if stage not in skip}


def max_difference(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(max |candidate - reference|, max(1, max |reference|)) over a stage's outputs."""
    worst, scale = 0.0, 1.0
    for ref, got in zip(reference, candidate, strict=True):
        if ref.shape != got.shape:
            raise ValueError(f"output shape {list(got.shape)}, torch's is {list(ref.shape)}")
        worst = max(worst, float((ref.float() - got.float()).abs().max()))
        scale = max(scale, float(ref.float().abs().max()))
    return worst, scale


def stages_not_runnable(model) -> tuple[str, ...]:
    """Stages a model cannot run: the mask pass of a real-size model (its language model is on meta)."""
    return (MASK_PASS,) if language_model_on_meta(model) else ()
