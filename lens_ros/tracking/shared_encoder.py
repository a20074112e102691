"""One SAM2 image-encoder pass per frame for both LENS and the tracker.

LENS keeps SAM2's image encoder frozen at the SAM 2.0 Hiera-L weights (LENS_REFERENCE.md §4), so
with the stock SAM 2.0 checkpoint as the tracker the two encoders are the same weights
(``shares_image_encoder`` compares them by hash). Then a frame that both answers a command (a goal,
a re-acquisition, a re-grounding) and is tracked is encoded once: ``SharedImageEncoder`` keeps the
raw encoder output of the last pixels it saw, and both sides take it from there. Each side still
applies its own mask decoder's ``conv_s0``/``conv_s1`` (LENS fine-tuned them; the tracker's are
stock), as ``SAM2Base.forward_image`` and ``lens_ros.model.sam.embed_backbone`` do.

The tracker then sees LENS's preprocessing (``lens_ros.pipeline.sam_pixels``: bilinear resize)
instead of sam2's video loader's (PIL's default bicubic), so that the pixels, and so the pass,
are the same. Exactness against stock SAM2VideoPredictor is tested without sharing.
"""

from __future__ import annotations

import threading

import torch

from lens_ros.accel import SAM_IMAGE_ENCODER
from lens_ros.model.sam import embed_backbone


class SharedImageEncoder:
    """``image_encoder(pixels)`` computed once for the same pixels in a row (thread-safe: LENS may
    encode on its background thread). The output is shared: callers must not modify it."""

    def __init__(self, image_encoder: torch.nn.Module) -> None:
        self.image_encoder = image_encoder
        self._lock = threading.Lock()
        self._pixels: torch.Tensor | None = None
        self._output: dict | None = None

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict:
        with self._lock:
            last = self._pixels
            if last is None or last.shape != pixels.shape or last.dtype != pixels.dtype \
                    or last.device != pixels.device or not torch.equal(last, pixels):
                self._output = self.image_encoder(pixels)
                self._pixels = pixels
            return self._output


class SharedEncoderStages:
    """A pipeline's stages with SAM2's image encoder taken from a SharedImageEncoder (the rest as before)."""

    def __init__(self, stages, model, shared: SharedImageEncoder) -> None:
        self._stages, self._model, self.shared = stages, model, shared

    def __getattr__(self, name):  # image_features, mask_pass, decode_mask, describe, ...
        return getattr(self._stages, name)

    def encode_sam_image(self, pixels: torch.Tensor):
        sam = self._model.sam
        pixels = pixels.to(sam.no_mem_embed.dtype)  # as LensModel.encode_sam_image
        return embed_backbone(sam, self.shared(pixels), pixels.dtype)


def share_image_encoder(pipeline, tracker) -> str:
    """Make ``pipeline`` (a LensPipeline) and ``tracker`` (a StreamingTracker) encode each frame once
    through one SharedImageEncoder; returns why they cannot ("" when they now share)."""
    from lens_ros.pipeline import sam_pixels
    from lens_ros.tracking.models import shares_image_encoder

    if pipeline.stages.describe().get(SAM_IMAGE_ENCODER) != "torch":
        return f"LENS's image encoder runs on {pipeline.stages.describe().get(SAM_IMAGE_ENCODER)}, the tracker's on torch"
    if not shares_image_encoder(pipeline.model.sam, tracker.model):
        return "the tracker's image encoder weights differ from LENS's"
    shared = SharedImageEncoder(pipeline.model.sam.image_encoder)
    pipeline.stages = SharedEncoderStages(pipeline.stages, pipeline.model, shared)
    size = tracker.image_size
    tracker.use_image_encoder(shared, lambda rgb: sam_pixels(rgb, size)[0])
    return ""
