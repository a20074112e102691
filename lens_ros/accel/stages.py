"""The stages a backend can replace, and their PyTorch reference.

``LensPipeline`` reaches the model's heavy stages only through a ``Stages`` object, so a backend
(onnxruntime here, TensorRT on a robot) swaps a stage without the pipeline knowing. ``Stages``
itself is the reference: it calls ``LensModel``'s own steps, and every other backend is tested
against it. A backend subclasses it and overrides the stages it accelerates; the rest stay torch.

Stages (LENS_REFERENCE.md §2):
  ``encode_sam_image``  SAM2's image encoder (pixels -> ``SamImageEmbedding``)
  ``image_features``    Qwen2.5-VL's vision tower (pixel patches -> merged image features)
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

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

    def describe(self) -> dict[str, str]:
        """Which backend runs each stage (for logs and diagnostics)."""
        return {"sam_image_encoder": self.name, "vision_tower": self.name}


def features_output(features: torch.Tensor) -> BaseModelOutputWithPooling:
    """A vision-tower output holding one image's merged features, as transformers' own returns it."""
    return BaseModelOutputWithPooling(pooler_output=(features,))
