"""Tiny random LENS checkpoints, built offline in about a second.

Same classes, same layout, same loader as the released weights; only the sizes shrink:
Qwen2.5-VL with 2 vision and 2 text layers and a byte-level BPE tokenizer trained on the spot
(Qwen's split pattern, special tokens and chat template), SAM2 Hiera with a reduced trunk at
256 px, and the LENS context head with a configurable number of queries. The outputs are
meaningless; the shapes, code paths and files are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lens_ros.model.sam import SAM2_CONFIG, Sam2Spec

# Bump when the tiny model's construction changes, so cached copies are rebuilt.
TINY_FORMAT = 1

# Qwen2's pre-tokenizer split pattern.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2-VL's special tokens, in Qwen's order (ids follow the trained vocabulary here).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# The Qwen2-VL / Qwen2.5-VL chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-VL-Instruct's generation defaults (LENS generates greedily on top of them).
QWEN_GENERATION_DEFAULTS = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}

# SAM2 Hiera reduced to a few blocks at 256 px; SAM2's prompt width stays 256 (fixed by SAM2).
TINY_SAM2_SPEC = Sam2Spec(config=SAM2_CONFIG, overrides=(
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.memory_attention.num_layers=1",
))

_TOKENIZER_CORPUS = (
    "You are a helpful assistant. Output the bounding box of the {expr} in the image.",
    'Locate "{expr}", report the bbox coordinates in JSON format.',
    "Compare the difference between objects and find the most closely matched one.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    'Output the one bbox inside the interested object in JSON format. <think>thinking process here</think><answer>answer here</answer>',
    '[{"bbox_2d": [12, 34, 567, 890], "label": "{expr}"}] (10,20),(300,400) [0.5, 1.25, -3, 7]',
)
_WORDS = ("mug cup bottle red blue green yellow left right top bottom small large person man woman dog cat chair "
          "table the a of on in with near behind front grab pick up handle chipped white black box circle square "
          "triangle object tool robot gripper apple banana knife fork spoon bowl plate phone book pen").split()


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny LENS model. Every field changes the cache key."""

    num_queries: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    vocab_size: int = 640
    seed: int = 0

    def cache_key(self) -> str:
        blob = json.dumps({"format": TINY_FORMAT, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> Path:
    base = os.environ.get("LENS_ROS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lens_ros")
    return Path(base)


def train_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with Qwen's pre-tokenizer and special tokens, trained here."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t.replace("{expr}", " ".join(_WORDS[i:i + 3])) for t in _TOKENIZER_CORPUS for i in range(0, len(_WORDS), 3)]
    corpus += [" ".join(_WORDS)] * 4 + [" ".join(str(n) for n in range(1000))]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        model_max_length=32768, clean_up_tokenization_spaces=False)


def build_tiny_processor(vocab_size: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = train_tiny_tokenizer(vocab_size)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_tiny_model(spec: TinySpec = TinySpec()):
    """A random tiny LensModel and its processor (not saved)."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lens_ros.model.lens import LensModel
    from lens_ros.model.sam import build_sam2_for_lens

    processor = build_tiny_processor(spec.vocab_size)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # Qwen's 16/24/24 split, scaled
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True, max_window_layers=spec.text_layers),
        vision_config=dict(
            depth=spec.vision_layers, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
            num_heads=2, out_hidden_size=spec.text_hidden, fullatt_block_indexes=[spec.vision_layers - 1],
            window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
            hidden_act="silu"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(spec.seed)
    vlm = Qwen2_5_VLForConditionalGeneration(config)
    vlm.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], **QWEN_GENERATION_DEFAULTS)
    sam = build_sam2_for_lens(TINY_SAM2_SPEC)
    model = LensModel(vlm, sam, num_queries=spec.num_queries, sam_spec=TINY_SAM2_SPEC).eval()
    return model, processor


def build_tiny_checkpoint(directory: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Build a tiny random LENS checkpoint and save it in the released layout."""
    from lens_ros.model.checkpoint import save_lens_checkpoint

    model, processor = build_tiny_model(spec)
    return save_lens_checkpoint(model, processor, directory)


def ensure_tiny_checkpoint(spec: TinySpec = TinySpec(), cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached tiny checkpoint for ``spec``, built on first use (atomically, so concurrent
    processes never see a half-written one)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-{spec.cache_key()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        build_tiny_checkpoint(staging, spec)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
