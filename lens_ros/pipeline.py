"""Image + language command -> ``SegmentationResult``, exactly as LENS infers.

``LensPipeline`` follows the small stateful predictor style of sam2: an image is prepared once
(VLM-resized copy, SAM2 embedding, vision tower output) and any number of commands can then be
answered on it. ``segment`` does both in one call and reuses the preparation when it is given
the same image again. The steps, with LENS_REFERENCE.md §2:

1. VLM image: ``smart_resize`` (factor 28, 3136..1,000,000 px, aspect kept), bicubic.
   SAM image: the original resized to S x S (S = 1024 for LENS) ignoring aspect, bilinear,
   normalised with SAM's mean/std.
2. Pass 1: greedy generation (``do_sample=False`` over the checkpoint's generation config).
3. The answer is parsed for a box; no box means ``found = False`` and an empty mask.
4. Pass 2: prompt + answer embedded, image features scattered in, the learnable queries
   appended, explicit 1-D positions; the query states become one SAM2 prompt token.
5. SAM2 decodes 256x256 logits, upsampled bilinearly to H x W; mask = logits > 0.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from lens_ros import prompts
from lens_ros.images import (  # noqa: F401 (VLM_*: the resize parameters, defined beside the size checks)
    DEFAULT_MAX_COMMAND_CHARS,
    VLM_MAX_PIXELS,
    VLM_MIN_PIXELS,
    VLM_RESIZE_FACTOR,
    ControlTokens,
    InvalidInputError,
    check_command,
    check_plain_text,
    control_tokens,
    to_rgb8,
)
from lens_ros.accel.overlap import BackgroundEncoder
from lens_ros.model.checkpoint import DEFAULT_MODEL, load_lens_model
from lens_ros.model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamImageEmbedding, sam_input_size, upsample_logits

log = logging.getLogger(__name__)


# Stages reported to progress callbacks (and as action feedback by the ROS node).
STAGE_PREPARING = "preparing"
STAGE_REASONING = "reasoning"
STAGE_MASK = "mask"
STAGE_GRASP = "grasp"


@dataclass
class PipelineConfig:
    """How a ``LensPipeline`` loads its model and answers commands."""

    model: str = DEFAULT_MODEL
    """Model source: a Hugging Face id (``OuyBin/LENS``...), a checkpoint directory, or ``tiny``."""
    device: str = "cpu"
    """Torch device: ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "float32"
    """Weights and activations: ``float32``, ``bfloat16`` (LENS's own choice on GPUs) or ``float16``."""
    allow_download: bool = False
    """Fetch the model from the Hugging Face hub when it is not in the local cache."""
    cot: bool = False
    """Use the chain-of-thought prompt (for the ``_CoT`` checkpoint)."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens (LENS's demo uses 256)."""
    max_command_chars: int = DEFAULT_MAX_COMMAND_CHARS
    """Longer commands are refused."""
    backend: str = "torch"
    """What runs the stages (SAM2's image encoder and mask decoder, the vision tower, the mask pass):
    ``torch`` (the reference), ``onnxruntime`` (ONNX graphs exported on first use per image size) or
    ``tensorrt`` (engines built from those graphs; CUDA only). See ``lens_ros.accel``."""
    stage_backends: str = ""
    """Per-stage overrides of ``backend``, ``"<stage>=<backend>,..."`` with the stages
    ``sam_image_encoder``, ``vision_tower``, ``mask_pass``, ``sam_mask_decoder`` (e.g.
    ``"mask_pass=torch"``); ``""`` = every stage on ``backend``."""
    export_dir: str = ""
    """Where the onnxruntime and tensorrt backends keep graphs and engines (default ~/.cache/lens_ros/onnx)."""
    compile: bool = False
    """Generate with the compiled decode loop: a static KV cache and torch.compile (CUDA graphs on a GPU;
    ``lens_ros.accel.decode``). The same tokens as eager decoding; the first command compiles it."""
    compile_backend: str = "auto"
    """torch.compile backend of the decode loop: ``auto`` (torch_tensorrt where installed on a GPU, else
    ``inductor``), ``inductor``, ``tensorrt`` (torch_tensorrt) or ``eager`` (no code generation: debugging)."""
    overlap_sam_encoder: bool = True
    """Run SAM2's image encoder beside the vision tower and generation (a worker thread; its own CUDA
    stream on a GPU) instead of before them: it needs only the image. Results are identical."""

    def __post_init__(self) -> None:
        from lens_ros.accel import BACKENDS, parse_stage_backends
        from lens_ros.accel.decode import COMPILE_BACKENDS
        from lens_ros.model.checkpoint import DTYPES

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        parse_stage_backends(self.stage_backends)
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, got {self.compile_backend!r}")

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.max_command_chars, int) and self.max_command_chars >= 1):
            raise ValueError(f"max_command_chars must be a positive integer, got {self.max_command_chars!r}")


@dataclass
class StageTimings:
    """Milliseconds spent per stage of one request (0 for a stage that was skipped or reused)."""

    preprocess_ms: float = 0.0
    image_encoder_ms: float = 0.0  # SAM2 image embedding
    vision_ms: float = 0.0  # VLM vision tower
    reasoning_ms: float = 0.0  # generation
    mask_ms: float = 0.0  # mask pass + SAM2 decoder + upsampling
    grasp_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class SegmentationResult:
    """The answer to one command. The one result type for the node, CLI, episode log and evaluator."""

    command: str
    image_size: tuple[int, int] = (0, 0)  # (height, width) of the source image
    reasoning: str = ""
    found: bool = False
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in source pixels
    score: float = 0.0  # SAM2's predicted IoU of the mask, 0 when not found
    mask: np.ndarray | None = None  # bool (H, W); all False when not found
    grasps: list = field(default_factory=list)
    timings: StageTimings = field(default_factory=StageTimings)
    generated_tokens: int = 0
    model: str = ""
    error: str = ""  # empty when all went well

    @classmethod
    def failure(cls, command: str, error: str, image_size: tuple[int, int] = (0, 0), model: str = "") -> "SegmentationResult":
        """A result for a request that could not be served (bad input, cancelled, ...)."""
        height, width = image_size
        return cls(command=command, image_size=image_size, error=error, model=model,
                   mask=np.zeros((height, width), dtype=bool))

    def to_dict(self) -> dict:
        """JSON-ready summary (the mask is left out: it is written as an image)."""
        data = asdict(self)
        data.pop("mask")
        data["box"] = list(self.box) if self.box is not None else None
        data["image_size"] = list(self.image_size)
        data["mask_pixels"] = int(self.mask.sum()) if self.mask is not None else 0
        return data


class ImageSizes:
    """(height, width) of an image held as ``rgb`` and of its VLM-resized copy ``vlm_image``."""

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def vlm_size(self) -> tuple[int, int]:
        return self.vlm_image.height, self.vlm_image.width


@dataclass
class PreparedImage(ImageSizes):
    """An image made ready for any number of commands (sam2's "set_image" step)."""

    rgb: np.ndarray
    fingerprint: str
    vlm_image: Image.Image
    sam_embedding: SamImageEmbedding | None  # None while ``pending`` computes it
    preprocess_ms: float
    image_encoder_ms: float
    vision_features: object = None  # the vision tower output, computed with the first command
    pending: Future | None = None  # the SAM2 embedding being computed beside generation (accel.overlap)

    def embedding(self) -> SamImageEmbedding:
        """The SAM2 embedding, waiting for it when it is still being computed."""
        if self.pending is not None:
            self.sam_embedding, self.image_encoder_ms = self.pending.result()
            self.pending = None
        return self.sam_embedding


def vlm_resize_shape(height: int, width: int, max_pixels: int = VLM_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image the VLM sees: Qwen's ``smart_resize`` as LENS calls it."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=VLM_RESIZE_FACTOR, min_pixels=VLM_MIN_PIXELS, max_pixels=max_pixels)


def sam_pixels(rgb: np.ndarray, size: int) -> torch.Tensor:
    """SAM2's input: the original image resized to size x size ignoring aspect (bilinear, as
    torchvision does on PIL images in LENS), normalised on the 0-255 scale; (1, 3, S, S)."""
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.float32)
    pixels = torch.from_numpy(resized).permute(2, 0, 1)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def image_fingerprint(rgb: np.ndarray) -> str:
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    digest.update(repr(rgb.shape).encode())
    return digest.hexdigest()


class _ReasoningStream:
    """A transformers streamer that reports the reasoning generated so far."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        pass


class Cancelled(RuntimeError):
    """The request was cancelled while it ran."""


class LensPipeline:
    """LENS inference on one model. Not thread-safe: call it from one worker thread."""

    def __init__(self, model, processor, config: PipelineConfig | None = None, stages=None) -> None:
        from lens_ros.accel import make_stages, parse_stage_backends

        self.model = model
        self.processor = processor
        self.config = config or PipelineConfig()
        # The heavy stages, through the backend's interface (lens_ros.accel); torch is the reference.
        self.stages = stages or make_stages(model, self.config.backend, cache_dir=self.config.export_dir or None,
                                            source=getattr(model, "source", None) or self.config.model,
                                            stage_backends=parse_stage_backends(self.config.stage_backends))
        self._encoder = BackgroundEncoder() if self.config.overlap_sam_encoder else None
        self._prepared: PreparedImage | None = None
        self._pad_id = processor.tokenizer.pad_token_id

    @classmethod
    def from_config(cls, config: PipelineConfig) -> "LensPipeline":
        model, processor = load_lens_model(config.model, device=config.device, dtype=config.dtype,
                                           allow_download=config.allow_download)
        return cls(model, processor, config)

    def close(self) -> None:
        """Stop the background SAM2 encoder (after its encoding in flight) and drop the prepared image."""
        if self._encoder is not None:
            self._encoder.close()
        self._prepared = None

    @property
    def device(self) -> torch.device:
        return self.model.learnable_query.device

    # -- image ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare_image(self, image, bgr: bool = False) -> PreparedImage:
        """Convert, resize and embed ``image`` once; reused while the same image comes back."""
        rgb = to_rgb8(image, bgr=bgr)
        fingerprint = image_fingerprint(rgb)
        if self._prepared is not None and self._prepared.fingerprint == fingerprint:
            return self._prepared
        self._prepared = None  # drop the old embedding before computing the next
        start = time.perf_counter()
        height, width = rgb.shape[:2]
        vlm_h, vlm_w = vlm_resize_shape(height, width)
        vlm_image = Image.fromarray(rgb).resize((vlm_w, vlm_h), Image.BICUBIC)  # PIL's default, as in LENS
        pixels = sam_pixels(rgb, sam_input_size(self.model.sam)).to(self.device)
        prepared_ms = (time.perf_counter() - start) * 1000
        if self._encoder is not None:  # beside what follows; awaited at the mask pass
            self._prepared = PreparedImage(rgb=rgb, fingerprint=fingerprint, vlm_image=vlm_image, sam_embedding=None,
                                           preprocess_ms=prepared_ms, image_encoder_ms=0.0,
                                           pending=self._encoder.submit(self.stages, pixels))
            return self._prepared
        start = time.perf_counter()
        embedding = self.stages.encode_sam_image(pixels)
        encoder_ms = (time.perf_counter() - start) * 1000
        self._prepared = PreparedImage(rgb=rgb, fingerprint=fingerprint, vlm_image=vlm_image,
                                       sam_embedding=embedding, preprocess_ms=prepared_ms,
                                       image_encoder_ms=encoder_ms)
        return self._prepared

    # -- command -------------------------------------------------------------------------------
    @torch.inference_mode()
    def segment(self, image, command: str, bgr: bool = False,
                progress: Callable[[str, str], None] | None = None,
                cancel: threading.Event | None = None, grasp=None, depth: np.ndarray | None = None,
                intrinsics=None) -> SegmentationResult:
        """Answer ``command`` on ``image`` (a numpy array or a ``PreparedImage``).

        With ``grasp`` (a ``lens_ros.grasp.GraspConfig``) the result also holds grasp regions of
        the mask, in 3-D when ``depth`` (aligned to the image) and ``intrinsics`` are given.
        Raises ``InvalidInputError`` (a ``ValueError``) for an unusable image, depth or command and
        ``Cancelled`` when ``cancel`` is set while it runs. ``progress(stage, reasoning)`` is
        called as the stages start and as reasoning tokens arrive.
        """
        total_start = time.perf_counter()
        text = self.checked_command(command)
        report = progress or (lambda stage, reasoning: None)
        report(STAGE_PREPARING, "")
        cached = self._prepared
        prepared = image if isinstance(image, PreparedImage) else self.prepare_image(image, bgr=bgr)
        if depth is not None and tuple(np.shape(depth)[:2]) != prepared.size:
            raise InvalidInputError(f"depth is {np.shape(depth)[1]}x{np.shape(depth)[0]} but the image is "
                                    f"{prepared.size[1]}x{prepared.size[0]}; depth must be aligned to the image")
        timings = StageTimings()
        paid = not isinstance(image, PreparedImage) and prepared is not cached  # the image is this request's
        if paid:
            timings.preprocess_ms = prepared.preprocess_ms

        # Pass 1: reasoning and box.
        report(STAGE_REASONING, "")
        start = time.perf_counter()
        inputs = self.prompt_inputs(prepared, text)
        timings.preprocess_ms += (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        if self.ensure_vision_features(prepared, inputs):
            timings.vision_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        sequence = self._generate(inputs, prepared, progress and (lambda partial: progress(STAGE_REASONING, partial)),
                                  cancel)
        prompt_len = inputs["input_ids"].shape[1]
        answer_ids = sequence[0, prompt_len:]
        answer = self.processor.tokenizer.decode(answer_ids, skip_special_tokens=True)
        timings.reasoning_ms = (time.perf_counter() - start) * 1000
        parsed = prompts.parse_answer(answer, vlm_size=prepared.vlm_size, image_size=prepared.size)

        result = SegmentationResult(command=text, image_size=prepared.size, reasoning=parsed.reasoning,
                                    generated_tokens=int(answer_ids.numel()), model=self.model_name,
                                    mask=np.zeros(prepared.size, dtype=bool), timings=timings)
        if parsed.found:
            report(STAGE_MASK, parsed.reasoning)
            start = time.perf_counter()
            logits, score = self.mask_logits(prepared, sequence)
            result.mask = (logits[0, 0] > 0).cpu().numpy()
            result.found, result.box, result.score = True, parsed.box, score
            timings.mask_ms = (time.perf_counter() - start) * 1000
            if grasp is not None:
                report(STAGE_GRASP, parsed.reasoning)
                start = time.perf_counter()
                result.grasps = self._grasps(result, grasp, depth, intrinsics)
                timings.grasp_ms = (time.perf_counter() - start) * 1000
        pending = prepared.pending
        if paid and (pending is None or (pending.done() and pending.exception() is None)):
            prepared.embedding()  # a finished encoding: its time is known (beside generation, not part of total)
            timings.image_encoder_ms = prepared.image_encoder_ms
        timings.total_ms = (time.perf_counter() - total_start) * 1000
        return result

    @staticmethod
    def _grasps(result: SegmentationResult, config, depth, intrinsics) -> list:
        from lens_ros.grasp import grasp_regions

        if not result.mask.any():  # SAM2 may return an empty mask even with a box: nothing to grasp
            return []
        try:
            return grasp_regions(result.mask, depth=depth, intrinsics=intrinsics, config=config, box=result.box)
        except ValueError as exc:  # bad depth or intrinsics: the caller's input, reported as such
            raise InvalidInputError(f"grasp: {exc}") from exc

    @property
    def model_name(self) -> str:
        return getattr(self.model, "source", None) or self.config.model

    # -- prompt --------------------------------------------------------------------------------
    # The command is data: a control token of the model in it (``<|im_end|><|im_start|>assistant``,
    # ``<|image_pad|>``) would be tokenized as that token and rewrite the chat. Such commands are
    # refused before anything runs (``check_plain_text``, with the checkpoint tokenizer's own added
    # tokens); escaping them instead is not possible without changing LENS's exact prompt, because
    # the processor tokenizes the whole templated chat at once. A second, cheap guard after
    # tokenization counts the control tokens of the prompt against the template's.
    @functools.cached_property
    def _control_tokens(self) -> ControlTokens:
        return control_tokens(self.processor.tokenizer)

    @functools.cached_property
    def _control_token_ids(self) -> dict[int, str]:
        tokenizer = self.processor.tokenizer
        return {tokenizer.convert_tokens_to_ids(token): token
                for token in self._control_tokens.raw + self._control_tokens.normalized}

    def checked_command(self, command) -> str:
        """``command`` as the pipeline uses it: ``check_command``'s checks, and refused
        (``InvalidInputError``) when it holds a control token of the model (``check_plain_text``).
        ``segment`` and ``answer_mask_logits`` call it; a caller may call it first to refuse early."""
        return check_plain_text(check_command(command, self.config.max_command_chars), self._control_tokens)

    def prompt_inputs(self, prepared: PreparedImage, command: str):
        """The model inputs of ``command`` about ``prepared``: the chat-templated prompt and the image,
        through the checkpoint's own processor (as ``segment`` builds them; the trainer and the
        accelerated-path checks build theirs here too). Raises ``InvalidInputError`` when the prompt's
        control tokens are not exactly the template's (``command`` holding one)."""
        chat = self.processor.apply_chat_template(prompts.build_messages(command, cot=self.config.cot),
                                                  tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[chat], images=[prepared.vlm_image], return_tensors="pt")
        self._check_prompt_control_tokens(inputs)
        return inputs.to(self.device)

    def _count_control_tokens(self, ids) -> Counter:
        return Counter(i for i in ids if i in self._control_token_ids)

    def _template_control_tokens(self) -> Counter:
        """The control tokens the chat template alone puts into a prompt (one image placeholder).
        Not cached: rendering and tokenizing a one-word prompt takes well under a millisecond."""
        chat = self.processor.apply_chat_template(prompts.build_messages("x", cot=self.config.cot), tokenize=False,
                                                  add_generation_prompt=True)
        return self._count_control_tokens(self.processor.tokenizer(chat)["input_ids"])

    def _check_prompt_control_tokens(self, inputs) -> None:
        """Refuse a prompt whose control tokens are not exactly the template's, the image placeholder
        expanded to one token per image feature, as the processor does."""
        found = self._count_control_tokens(inputs["input_ids"][0].tolist())
        expected = self._template_control_tokens()
        image_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        merge = self.processor.image_processor.merge_size
        expected[image_id] = int(inputs["image_grid_thw"].prod(-1).sum()) // (merge * merge)
        for token_id in sorted(set(found) | set(expected)):
            if found[token_id] != expected[token_id]:
                raise InvalidInputError(
                    f"command puts control tokens of the model into the prompt ({self._control_token_ids[token_id]} "
                    f"{found[token_id]} times, the template {expected[token_id]}); commands must be plain text")

    def ensure_vision_features(self, prepared: PreparedImage, inputs) -> bool:
        """Run the vision tower on ``inputs``' image unless ``prepared`` already holds its output (kept
        there for the next command about the same image); True when it ran."""
        if prepared.vision_features is not None:
            return False
        prepared.vision_features = self.stages.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return True

    def _generate(self, inputs, prepared: PreparedImage, on_text, cancel) -> torch.Tensor:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _CancelCriterion(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool(cancel is not None and cancel.is_set()),
                                  dtype=torch.bool, device=input_ids.device)

        streamer = _ReasoningStream(self.processor.tokenizer, on_text) if on_text else None  # decoding costs
        kwargs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        if self.config.compile:
            from lens_ros.accel.decode import decode_options

            kwargs.update(decode_options(self.config.compile_backend, self.device, inputs["input_ids"].shape[1],
                                         self.config.max_new_tokens))
        sequence = self.model.vlm.generate(
            **kwargs, mm_encoder_outputs={"image": prepared.vision_features}, do_sample=False,
            max_new_tokens=self.config.max_new_tokens, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_CancelCriterion()]))
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled during reasoning")
        return sequence

    @torch.inference_mode()
    def answer_mask_logits(self, image, command: str, answer: str, bgr: bool = False) -> tuple[torch.Tensor, float]:
        """Mask logits (1, 1, H, W) and score for a GIVEN answer instead of a generated one (the
        answer is teacher-forced, as LENS's stage 1 does with the ground-truth box)."""
        text = self.checked_command(command)
        prepared = image if isinstance(image, PreparedImage) else self.prepare_image(image, bgr=bgr)
        inputs = self.prompt_inputs(prepared, text)
        self.ensure_vision_features(prepared, inputs)
        eos = self.processor.tokenizer.eos_token or ""
        answer_ids = self.processor.tokenizer(answer + eos, add_special_tokens=False, return_tensors="pt")["input_ids"]
        sequence = torch.cat([inputs["input_ids"], answer_ids.to(self.device)], dim=1)
        return self.mask_logits(prepared, sequence)

    def mask_logits(self, prepared: PreparedImage, sequence: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Pass 2 on prompt + answer ids: mask logits at the source size (1, 1, H, W) and SAM2's
        predicted IoU. Padding tokens (LENS: ids equal to the pad id) get attention 0."""
        attention = (sequence != self._pad_id).long()
        token = self.stages.mask_pass(sequence, attention, prepared.vision_features)  # while SAM2 may still encode
        try:
            embedding = prepared.embedding()
        except Exception:
            if self._prepared is prepared:  # a failed embedding is not kept for the next command
                self._prepared = None
            raise
        low_res, iou = self.stages.decode_mask(embedding, token)
        return upsample_logits(low_res, prepared.size), float(iou.reshape(-1)[0])
