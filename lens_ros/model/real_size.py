"""Real-size LENS stages with random weights, for export and speed figures without the weights.

No LENS, Qwen2.5-VL or SAM2 weights can be fetched where this package is developed, but what a
stage costs and whether it exports depend only on its architecture: Qwen2.5-VL-3B-Instruct's
published configuration (``lens_ros/data/configs/qwen2_5_vl_3b_instruct.json``) and SAM2 Hiera-L
(sam2's own packaged ``configs/sam2/sam2_hiera_l.yaml``, the one LENS builds: LENS_REFERENCE.md).

``build_real_size_model()`` returns a ``LensModel`` whose vision tower, SAM2 and context head are
real-size with random weights, and whose 3B language model is left on PyTorch's meta device
(shapes only) unless ``language_model=True`` materialises it (12 GB in float32: generation and the
mask pass at real cost); the processor is Qwen2.5-VL's image processing with the tiny checkpoint's
tokenizer, whose special token ids the model's configuration takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REAL_SIZE = "real-size"  # the model source name (lens-export --model real-size)
QWEN2_5_VL_3B_CONFIG = Path(__file__).resolve().parents[1] / "data" / "configs" / "qwen2_5_vl_3b_instruct.json"


def qwen2_5_vl_3b_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**json.loads(QWEN2_5_VL_3B_CONFIG.read_text()))


def build_real_size_model(seed: int = 0, dtype: torch.dtype = torch.float32, language_model: bool = False):
    """(LensModel, processor): real-size vision tower and SAM2 Hiera-L with random weights on the CPU,
    the language model on the meta device, or with ``language_model`` materialised too (random
    weights, tied embeddings as the published model: 3.1 B parameters, 12 GB in float32; for speed
    figures of generation and the mask pass)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLTextModel,
    )

    from lens_ros.model.lens import LensModel
    from lens_ros.model.sam import build_sam2_for_lens
    from lens_ros.model.tiny import ensure_tiny_checkpoint

    config = qwen2_5_vl_3b_config()
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device("meta"):
        vlm = Qwen2_5_VLForConditionalGeneration(config)
    vlm.model.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config).to(dtype).eval()
    if language_model:
        vlm.model.language_model = Qwen2_5_VLTextModel._from_config(config.text_config).to(dtype).eval()
        vlm.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight  # tie_word_embeddings, as published
    sam = build_sam2_for_lens().to(dtype)
    model = LensModel(vlm, sam).eval()
    model.source = REAL_SIZE
    tiny = ensure_tiny_checkpoint()
    processor = AutoProcessor.from_pretrained(str(tiny))
    # The tokenizer is the tiny checkpoint's (Qwen's cannot be fetched here), so the special token ids
    # must be its ids too; the embedding table keeps Qwen's 151,936 rows, so every cost is the real one.
    token_ids = {k: v for k, v in json.loads((tiny / "config.json").read_text()).items() if k.endswith("_token_id")}
    for target in (vlm.config, vlm.config.text_config, vlm.generation_config):
        for name, value in token_ids.items():
            if hasattr(target, name):
                setattr(target, name, value)
    return model, processor
