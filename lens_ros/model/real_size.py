"""Real-size LENS stages with random weights, for export and speed figures without the weights.

No LENS, Qwen2.5-VL or SAM2 weights can be fetched where this package is developed, but what a
stage costs and whether it exports depend only on its architecture: Qwen2.5-VL-3B-Instruct's
published configuration (``lens_ros/data/configs/qwen2_5_vl_3b_instruct.json``) and SAM2 Hiera-L
(sam2's own packaged ``configs/sam2/sam2_hiera_l.yaml``, the one LENS builds: LENS_REFERENCE.md).

``build_real_size_model()`` returns a ``LensModel`` whose vision tower, SAM2 and context head are
real-size with random weights, and whose 3B language model is left on PyTorch's meta device
(shapes only: generation needs it materialised, which costs 12 GB in float32); the processor is
Qwen2.5-VL's image processing with the tiny checkpoint's tokenizer.
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


def build_real_size_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(LensModel, processor): real-size vision tower and SAM2 Hiera-L with random weights on the CPU,
    the language model on the meta device."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

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
    sam = build_sam2_for_lens().to(dtype)
    model = LensModel(vlm, sam).eval()
    model.source = REAL_SIZE
    processor = AutoProcessor.from_pretrained(str(ensure_tiny_checkpoint()))
    return model, processor
