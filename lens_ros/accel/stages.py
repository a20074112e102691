"""The stages a backend can replace, and their PyTorch reference.

``LensPipeline`` reaches the model's heavy stages only through a ``Stages`` object, so a backend
(onnxruntime here, TensorRT on a robot) swaps a stage without the pipeline knowing. ``Stages``
itself is the reference: it calls ``LensModel``'s own steps, and every other backend is tested
against it. A backend subclasses it and overrides the stages it accelerates; the rest stay torch.

Stages (LENS_REFERENCE.md §2), by name (``STAGES``) and method:
  ``sam_image_encoder``  ``encode_sam_image``: SAM2's image encoder (pixels -> ``SamImageEmbedding``)
  ``vision_tower``       ``image_features``: Qwen2.5-VL's vision tower (pixel patches -> merged features)
  ``mask_pass``          ``mask_pass``: pass 2, the LLM over prompt + answer + queries with the explicit
                         1-D positions, then the context head (-> one SAM2 prompt token)
  ``sam_mask_decoder``   ``decode_mask``: SAM2's prompt encoder and mask decoder (-> 256 x 256 mask
                         logits and IoU)
The decode loop (pass 1) is transformers' ``generate``; ``lens_ros.accel.decode`` compiles it.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lens_ros.accel import (
    MASK_PASS,
    SAM_IMAGE_ENCODER,
    SAM_MASK_DECODER,
    STAGES,
    VISION_TOWER,
)
from lens_ros.model.sam import SamImageEmbedding


class Stages:
    """The PyTorch stages of one ``LensModel`` (the reference backend)."""

    name = "torch"

    def __init__(self, model) -> None:
        self.model = model

    def encode_sam_image(self, pixels: torch.Tensor) -> SamImageEmbedding:
        """SAM2's embedding of normalised pixels (1, 3, S, S)."""
        return self.model.encode_sam_image(pixels)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> BaseModelOutputWithPooling:
        """The vision tower's output; only ``pooler_output`` (one tensor per image) is used downstream."""
        return self.model.image_features(pixel_values, image_grid_thw)

    def mask_pass(self, sequence: torch.Tensor, attention: torch.Tensor, image_features) -> torch.Tensor:
        """The SAM2 prompt token (B, 1, C) of prompt + answer ids (attention 0 on padding)."""
        embeds, attention, positions = self.model.mask_pass_inputs(sequence, attention, image_features)
        return self.model.context_token(self.model.query_states(embeds, attention, positions))

    def decode_mask(self, embedding: SamImageEmbedding, token: torch.Tensor):
        """Low-resolution mask logits (1, 1, 256, 256) and SAM2's predicted IoU."""
        return self.model.decode_mask(embedding, token)

    def describe(self) -> dict[str, str]:
        """Which backend runs each stage (for logs and diagnostics)."""
        return dict.fromkeys(STAGES, self.name)


def features_output(features: torch.Tensor) -> BaseModelOutputWithPooling:
    """A vision-tower output holding one image's merged features, as transformers' own returns it."""
    return BaseModelOutputWithPooling(pooler_output=(features,))


class RoutedStages(Stages):
    """Each stage run by its own backend (``stage_backends`` overrides of ``backend``): e.g. the vision
    stages in TensorRT and the mask pass in torch while its engine is not built."""

    name = "mixed"

    def __init__(self, model, routes: dict[str, Stages]) -> None:
        super().__init__(model)
        self.routes = routes

    def encode_sam_image(self, pixels):
        return self.routes[SAM_IMAGE_ENCODER].encode_sam_image(pixels)

    def image_features(self, pixel_values, image_grid_thw):
        return self.routes[VISION_TOWER].image_features(pixel_values, image_grid_thw)

    def mask_pass(self, sequence, attention, image_features):
        return self.routes[MASK_PASS].mask_pass(sequence, attention, image_features)

    def decode_mask(self, embedding, token):
        return self.routes[SAM_MASK_DECODER].decode_mask(embedding, token)

    def describe(self) -> dict[str, str]:
        return {stage: self.routes[stage].name for stage in STAGES}
