"""What LENS's own inference costs on the same machine, to compare this pipeline against.

LENS's demo runs every stage in sequence and its mask pass (pass 2) is one full forward of the
VLM: the vision tower runs again on the same pixels, the language model runs with
``output_hidden_states=True`` and its LM head computes logits for every position
(LENS_REFERENCE.md §2). This pipeline computes the vision tower once, runs the language model
without the head, and encodes SAM2's image beside generation. ``lens_pass_two`` reproduces LENS's
pass 2 with this package's modules; its prompt token must equal this pipeline's mask pass (checked).
"""

from __future__ import annotations

import time

import torch

from lens_ros.model.sam import upsample_logits


@torch.inference_mode()
def lens_pass_two(model, inputs, sequence: torch.Tensor, embedding, size_hw: tuple[int, int]):
    """LENS's pass 2 on prompt + answer ids ``sequence`` (``inputs``: the processor's prompt inputs
    with the pixels): (prompt token, mask logits, milliseconds)."""
    start = time.perf_counter()
    features = model.image_features(inputs["pixel_values"], inputs["image_grid_thw"])  # recomputed, as LENS does
    embeds, attention, positions = model.mask_pass_inputs(sequence, torch.ones_like(sequence), features)
    out = model.vlm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, output_hidden_states=True)
    token = model.context_token(out.hidden_states[-1][:, -model.num_queries:])
    low_res, _ = model.decode_mask(embedding, token)
    logits = upsample_logits(low_res, size_hw)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return token, logits, (time.perf_counter() - start) * 1000


def answer_sequence(pipeline, inputs, answer_tokens: int) -> torch.Tensor:
    """Prompt ids + ``answer_tokens`` filler answer ids: what pass 2 costs after an answer of that length."""
    filler = pipeline.processor.tokenizer("a", add_special_tokens=False)["input_ids"][0]
    answer = torch.full((1, answer_tokens), filler, dtype=inputs["input_ids"].dtype, device=pipeline.device)
    return torch.cat([inputs["input_ids"], answer], dim=1)


def pass_two_ms(pipeline, rgb, command: str, answer_tokens: int) -> float:
    """This pipeline's mask pass (its stages, SAM2 decoder and upsampling) after an answer of
    ``answer_tokens`` tokens on frame ``rgb``; the image's embedding and features computed first."""
    prepared = pipeline.prepare_image(rgb)
    inputs = pipeline.prompt_inputs(prepared, command)
    with torch.inference_mode():
        pipeline.ensure_vision_features(prepared, inputs)
    prepared.embedding()  # waits for the background encoder: not part of the mask pass
    sequence = answer_sequence(pipeline, inputs, answer_tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        logits, _ = pipeline.mask_logits(prepared, sequence)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return (time.perf_counter() - start) * 1000


def lens_two_pass_ms(pipeline, rgb, command: str, answer_tokens: int) -> tuple[float, float, float]:
    """(LENS's command -> mask in ms, its pass 2 alone in ms, |token - this pipeline's token|) on frame
    ``rgb``: this pipeline with the torch stages run in sequence (eager generate) up to the answer, then
    LENS's pass 2 on prompt + ``answer_tokens`` answer ids instead of this pipeline's mask pass."""
    timings = pipeline.segment(rgb, command).timings
    prepared = pipeline.prepare_image(rgb)  # the same frame: reused, not recomputed
    inputs = pipeline.prompt_inputs(prepared, command)
    sequence = answer_sequence(pipeline, inputs, answer_tokens)
    token, _, pass_two = lens_pass_two(pipeline.model, inputs, sequence, prepared.embedding(), prepared.size)
    with torch.inference_mode():
        ours = pipeline.stages.mask_pass(sequence, torch.ones_like(sequence), prepared.vision_features)
    difference = float((token.float() - ours.float()).abs().max())
    before_pass_two = timings.preprocess_ms + timings.image_encoder_ms + timings.vision_ms + timings.reasoning_ms
    return before_pass_two + pass_two, pass_two, difference
