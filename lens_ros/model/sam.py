"""SAM2 as LENS uses it: the stock ``sam2`` package, prompted by one context token.

LENS builds SAM2 Hiera-L with ``build_sam2`` (default post-processing), deletes the video
memory modules and calls the mask decoder directly with a single sparse prompt token. Nothing
here patches sam2: the token simply is the whole sparse prompt embedding.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# SAM2 2.0 Hiera-L, as LENS builds it. Released LENS checkpoints do not store the SAM2
# configuration; our own checkpoints store a spec only when it differs (tiny models).
SAM2_CONFIG = "configs/sam2/sam2_hiera_l.yaml"

# Modules SAM2 needs for video only; LENS deletes them, so checkpoints do not contain them.
VIDEO_ONLY_MODULES = ("memory_attention", "memory_encoder", "maskmem_tpos_enc")

# SAM2's input normalisation on the 0-255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


# A spec comes from a checkpoint's config.json, i.e. from whoever made the checkpoint, and Hydra
# instantiates whatever a config names: an override such as ``++model.x={_target_:os.system,...}``
# (or ``_args_``, ``_partial_``, a ``${...}`` resolver, a config file of one's own) would run a
# checkpoint's code. So a spec may only pick one of sam2's own model configs and change sizes in it:
# every override is ``++model.<dotted.name>=<literal>``, where no part of the name starts with "_"
# (that excludes all of Hydra's special keys, _target_, _args_, _partial_, _convert_, _recursive_)
# and the literal is a number, a bool or a flat list of numbers: nothing Hydra could resolve or call.
_SAM2_CONFIG = re.compile(r"configs/sam2(?:\.1)?/[A-Za-z0-9_.+-]+\.yaml")
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_LITERAL = rf"(?:{_NUMBER}|true|false|True|False|\[\s*(?:{_NUMBER}(?:\s*,\s*{_NUMBER})*)?\s*\])"
_SAM2_OVERRIDE = re.compile(rf"\+\+model(?:\.[A-Za-z][A-Za-z0-9_]*)+={_LITERAL}")
_SPEC_KEYS = ("config", "overrides")


class Sam2SpecError(ValueError):
    """A SAM2 spec that is not a stock sam2 config with literal size overrides."""


@dataclass(frozen=True)
class Sam2Spec:
    """Which SAM2 to build: one of sam2's own model configs plus literal Hydra overrides (checked
    here on construction, see ``_SAM2_OVERRIDE``)."""

    config: str = SAM2_CONFIG
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.config, str) and _SAM2_CONFIG.fullmatch(self.config)):
            raise Sam2SpecError(f"config {self.config!r} is not one of sam2's model configs "
                                f"(configs/sam2/NAME.yaml or configs/sam2.1/NAME.yaml)")
        for override in self.overrides:
            if not (isinstance(override, str) and _SAM2_OVERRIDE.fullmatch(override)):
                raise Sam2SpecError(f"override {override!r} is not allowed: only ++model.<name>=<number, bool or "
                                    f"list of numbers>, with no Hydra special key (_target_, ...) or ${{...}}")

    def to_dict(self) -> dict:
        return {"config": self.config, "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Sam2Spec":
        """The spec a checkpoint stores (``to_dict``'s form); ``Sam2SpecError`` for anything else."""
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise Sam2SpecError(f"must be a mapping with {' and '.join(_SPEC_KEYS)}, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _SPEC_KEYS)
        if unknown:
            raise Sam2SpecError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(_SPEC_KEYS)})")
        overrides = data.get("overrides", [])
        if not isinstance(overrides, list):
            raise Sam2SpecError(f"overrides must be a list of strings, got {type(overrides).__name__}")
        return cls(config=data.get("config", SAM2_CONFIG), overrides=tuple(overrides))


def check_packaged_config(config: str) -> None:
    """The config must be a file of the installed sam2 package (Hydra finds it there, never elsewhere)."""
    package = importlib.util.find_spec("sam2")
    locations = list(package.submodule_search_locations or []) if package else []
    if not any((Path(location) / config).is_file() for location in locations):
        raise Sam2SpecError(f"config {config!r} is not in the installed sam2 package")


def build_sam2_for_lens(spec: Sam2Spec = Sam2Spec(), device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build SAM2 exactly as LENS does: ``build_sam2`` with its default post-processing
    (dynamic multimask via stability in eval mode), random weights, video modules removed."""
    check_packaged_config(spec.config)
    from sam2.build_sam import build_sam2  # heavy import (hydra): only when a model is built

    sam = build_sam2(spec.config, ckpt_path=None, device=str(device), mode="eval",
                     hydra_overrides_extra=list(spec.overrides), apply_postprocessing=True)
    for name in VIDEO_ONLY_MODULES:
        delattr(sam, name)
    return sam


@dataclass
class SamImageEmbedding:
    """SAM2's embedding of one image, ready for any number of prompts.

    ``image_embed`` is the lowest-resolution level with ``no_mem_embed`` already added (as in
    SAM2's image predictor); ``high_res_feats`` are the two higher levels, already projected
    by the mask decoder's ``conv_s0``/``conv_s1``.
    """

    image_embed: torch.Tensor
    high_res_feats: list[torch.Tensor] = field(default_factory=list)


def keep_positional_encoding_float32(sam: torch.nn.Module) -> None:
    """Keep the prompt encoder's random-frequency matrix in float32.

    SAM2 builds its positional-encoding grid in float32 whatever the model's dtype, so a
    bfloat16/float16 matrix fails the matmul; in float32 the encoding is also the accurate one.
    ``decode_mask`` casts the result to the model's dtype.
    """
    pe_layer = sam.sam_prompt_encoder.pe_layer
    pe_layer.positional_encoding_gaussian_matrix = pe_layer.positional_encoding_gaussian_matrix.float()


def sam_input_size(sam: torch.nn.Module) -> int:
    """Side of the square image SAM2 takes (1024 for the released models)."""
    return int(sam.image_size)


def encode_image(sam: torch.nn.Module, pixels: torch.Tensor) -> SamImageEmbedding:
    """Run SAM2's image encoder on normalised pixels of shape (1, 3, S, S)."""
    return embed_backbone(sam, sam.image_encoder(pixels), pixels.dtype)


def embed_backbone(sam: torch.nn.Module, backbone_out: dict, dtype: torch.dtype) -> SamImageEmbedding:
    """The embedding from the image encoder's raw output (``sam.image_encoder(pixels)``), as SAM2's
    ``forward_image`` + ``_prepare_backbone_features`` + its image predictor make it.

    Split from ``encode_image`` for training: the image encoder is frozen, so its output is computed
    once without gradients, while ``conv_s0``/``conv_s1`` (applied here, as ``forward_image`` does)
    belong to the mask decoder, which LENS's stage 2 trains. ``backbone_out`` is not modified.
    """
    fpn = list(backbone_out["backbone_fpn"])
    if sam.use_high_res_features_in_sam:
        fpn[0] = sam.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = sam.sam_mask_decoder.conv_s1(fpn[1])
    _, vision_feats, _, feat_sizes = sam._prepare_backbone_features({**backbone_out, "backbone_fpn": fpn})
    # SAM2's FPN upsamples in float32, so some levels come out float32 under bfloat16/float16
    # weights; LENS casts every level back to the input's dtype before decoding.
    vision_feats = [feat.to(dtype) for feat in vision_feats]
    if sam.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
    batch = fpn[-1].shape[0]
    # (HW, B, C) -> (B, C, H, W), as SAM2ImagePredictor does, with sizes read from the model
    # rather than hard-coded for 1024 px so that reduced test models work too.
    feats = [feat.permute(1, 2, 0).reshape(batch, -1, *size) for feat, size in zip(vision_feats, feat_sizes)]
    return SamImageEmbedding(image_embed=feats[-1], high_res_feats=feats[:-1])


def decode_mask(sam: torch.nn.Module, embedding: SamImageEmbedding, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one mask from one prompt token.

    ``token`` has shape (1, 1, C): it is the whole sparse prompt embedding (no point, no box);
    the dense prompt is SAM's ``no_mask_embed``. Returns the low-resolution logits (1, 1, h, w)
    and SAM2's predicted IoU of that mask (1, 1). In eval mode the decoder may substitute its
    best multi-mask output when the single mask is unstable, exactly as in LENS.
    """
    _, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
    sparse = token.to(embedding.image_embed.dtype)
    low_res, iou, _, _ = sam.sam_mask_decoder(
        image_embeddings=embedding.image_embed,
        image_pe=sam.sam_prompt_encoder.get_dense_pe().to(sparse.dtype),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense.to(sparse.dtype),
        multimask_output=False,
        repeat_image=True,
        high_res_features=embedding.high_res_feats,
    )
    return low_res, iou


def upsample_logits(low_res: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of mask logits to the source image size (align_corners False)."""
    return F.interpolate(low_res.float(), size_hw, mode="bilinear", align_corners=False)
