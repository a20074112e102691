"""ONNX graphs of the pipeline's stages, and the manifest that says what they were made from.

A robot's camera has one resolution, so the SAM2 image encoder (an S x S input) and the
Qwen2.5-VL vision tower (its patch grid follows from the image size through ``smart_resize``)
each have one input shape per camera: they are exported with fixed shapes, their grid-dependent
constants (rotary positions, attention windows) folded in. SAM2's mask decoder has fixed shapes
for any camera. The mask pass (the language model over prompt + answer + queries, then the
context head) has one dynamic axis, the sequence length: answers differ in length.
onnxruntime runs the graphs here; TensorRT builds its engines from the same files on a robot.

``manifest.json`` beside the graphs records the model source and a hash of the exported weights,
every input and output shape, the opset, the dtype and the torch / transformers / sam2 / onnx
versions: a graph is reused only when all of them match (``export_key``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from lens_ros.accel import MASK_PASS, SAM_IMAGE_ENCODER, SAM_MASK_DECODER, VISION_TOWER
from lens_ros.model.sam import SamImageEmbedding, decode_mask, encode_image

OPSET = 18
# torch.onnx.export keeps global state: one export at a time (the SAM2 encoder's may run on the
# background encoder thread while the vision tower's runs on the caller's).
_EXPORTING = threading.Lock()
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: the mask pass and SAM2's mask decoder are graphs too; symbolic (dynamic) axes
SAM_OUTPUTS = ("image_embed", "high_res_0", "high_res_1")
SEQUENCE = "sequence"  # the mask pass's dynamic axis (axis 1 of both inputs)


class SamImageEncoderGraph(nn.Module):
    """pixels (1, 3, S, S) -> the ``SamImageEmbedding`` tensors, exactly ``encode_image``'s."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, pixels: torch.Tensor):
        embedding = encode_image(self.sam, pixels)
        return (embedding.image_embed, *embedding.high_res_feats)


class VisionTowerGraph(nn.Module):
    """pixel patches of one image at a fixed grid -> its merged features (N, D): what
    ``get_image_features`` returns as ``pooler_output`` for a single image."""

    def __init__(self, visual: nn.Module, image_grid_thw: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("image_grid_thw", image_grid_thw.clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values, grid_thw=self.image_grid_thw, return_dict=True).pooler_output


class MaskPassGraph(nn.Module):
    """The mask pass of one request after its token embedding: inputs_embeds (1, L, D) of prompt +
    answer with the image features scattered in, and its attention mask (1, L) -> the SAM2 prompt
    token (1, 1, C). The learnable queries are appended and the explicit positions computed inside
    (``LensModel.with_queries``); the embedding lookup and the scatter stay in torch (a gather, and
    the vision tower's output is already there)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.context_token(self.model.query_states(*self.model.with_queries(inputs_embeds, attention_mask)))


class SamMaskDecoderGraph(nn.Module):
    """One image embedding and one prompt token -> low-resolution mask logits (1, 1, h, w) and
    SAM2's IoU (1, 1): ``decode_mask``'s, the prompt encoder's constant embeddings folded in."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embed, high_res_0, high_res_1, token):
        embedding = SamImageEmbedding(image_embed=image_embed, high_res_feats=[high_res_0, high_res_1])
        return decode_mask(self.sam, embedding, token)


def stage_tensors(model, stage: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers a stage's graph is made of (what its export depends on)."""
    extra = {}
    if stage == SAM_IMAGE_ENCODER:  # the encoder, no_mem_embed and the decoder's two feature projections
        modules = {"image_encoder": model.sam.image_encoder, "conv_s0": model.sam.sam_mask_decoder.conv_s0,
                   "conv_s1": model.sam.sam_mask_decoder.conv_s1}
        extra = {"no_mem_embed": model.sam.no_mem_embed}
    elif stage == VISION_TOWER:
        modules = {"visual": model.vlm.model.visual}
    elif stage == MASK_PASS:  # the language model (its embedding table is not in the graph) and the context head
        modules = {"language_model": model.vlm.model.language_model, "conv_1d": model.conv_1d,
                   "proj_to_sam": model.proj_to_sam}
        modules.update({"connector": model.connector} if model.use_connector else {})
        extra = {"learnable_query": model.learnable_query}
    elif stage == SAM_MASK_DECODER:
        modules = {"sam_prompt_encoder": model.sam.sam_prompt_encoder, "sam_mask_decoder": model.sam.sam_mask_decoder}
    else:
        raise ValueError(f"unknown stage {stage!r}")
    tensors = dict(extra)
    for prefix, module in modules.items():  # (the mask decoder's conv_s0/s1 count for both SAM2 graphs: harmless)
        tensors.update({f"{prefix}.{name}": t for name, t in module.state_dict(keep_vars=True).items()})
    return tensors


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of named tensors (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "transformers", "sam2", "onnx", "onnxscript"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


@dataclass
class GraphSpec:
    """One exported graph: its file, and the names, shapes and dtypes of its inputs and outputs."""

    file: str
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    dynamic_axes: dict[str, dict] = field(default_factory=dict)  # input -> {axis: name}; such an axis's shape is its name
    constants: dict = field(default_factory=dict)  # folded into the graph (the vision tower's patch grid)


def tensor_spec(tensor: torch.Tensor, dynamic: dict[int, str] | None = None) -> dict:
    """Shape and dtype; a dynamic axis's size is its name (so a spec, and a cache key, hold for every length)."""
    shape = [(dynamic or {}).get(axis, size) for axis, size in enumerate(tensor.shape)]
    return {"shape": shape, "dtype": str(tensor.dtype).removeprefix("torch.")}


def export_key(stage: str, weights: str, inputs: dict[str, dict], dtype: str, constants: dict | None = None) -> str:
    """What a graph depends on, hashed: stage, weights, input shapes, the constants folded into it
    (the vision tower's grid), dtype, opset and library versions. The onnxruntime backend's cache
    directory is named by it."""
    payload = json.dumps({"stage": stage, "weights": weights, "inputs": inputs, "constants": constants or {},
                          "dtype": dtype, "opset": OPSET, "versions": library_versions(), "format": MANIFEST_FORMAT},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
            path: Path, dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """``torch.onnx.export`` with the TorchScript exporter. torch.export (``dynamo=True``) fails on
    the vision tower (its window split sizes come from ``tensor.tolist()``, a data-dependent guard)
    and its SAM2 graph ran 1.2-1.4x slower in onnxruntime on the CPU; the traced graph matches
    torch to ~1e-6 on both stages. The result is one ``.onnx`` file, or, over protobuf's 2 GB (the
    real-size vision tower in float32, 2.7 GB), the graph plus one ``.onnx.data`` beside it."""
    import onnx

    raw = path.parent / f".{path.stem}-raw"  # over 2 GB the exporter writes one file per tensor here
    raw.mkdir(parents=True, exist_ok=True)
    # The tracer warns for every Python value it folds into a constant (the vision tower's grid,
    # window indices and cu_seqlens; Hiera's window sizes): folding them is the point of a
    # fixed-shape graph, and the export is checked against torch, so those warnings are dropped.
    with _EXPORTING, torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export": see above
        # SAM2's fallback to its best multi-mask output indexes by argmax and arange, never negative.
        warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
        torch.onnx.export(module, example, str(raw / path.name), input_names=input_names,
                          output_names=output_names, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          dynamic_axes=dynamic_axes or None)
    files = list(raw.iterdir())
    if len(files) == 1:
        os.replace(files[0], path)
    else:
        onnx.save_model(onnx.load(str(raw / path.name)), str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    shutil.rmtree(raw)
    onnx.checker.check_model(str(path))  # by path: the checker reads external data beside it


def export_stage(stage: str, module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                 output_names: list[str], out_dir: Path, source: str = "", constants: dict | None = None,
                 dynamic_axes: dict[str, dict[int, str]] | None = None) -> GraphSpec:
    """Export one stage to ``out_dir/<stage>.onnx`` and return its spec (with its outputs' shapes;
    outputs have fixed shapes in every graph here)."""
    dynamic_axes = dynamic_axes or {}
    with torch.no_grad():
        reference = module(*example)
    reference = reference if isinstance(reference, tuple) else (reference,)
    start = time.perf_counter()
    _export(module, example, input_names, output_names, out_dir / f"{stage}.onnx", dynamic_axes)
    spec = GraphSpec(file=f"{stage}.onnx",
                     inputs={name: tensor_spec(t, dynamic_axes.get(name)) for name, t in zip(input_names, example)},
                     outputs={name: tensor_spec(t) for name, t in zip(output_names, reference)},
                     dynamic_axes={name: {str(axis): label for axis, label in axes.items()}
                                   for name, axes in dynamic_axes.items()},
                     constants=constants or {})
    spec_dict = asdict(spec) | {"export_s": round(time.perf_counter() - start, 2), "source": source}
    (out_dir / f"{stage}.json").write_text(json.dumps(spec_dict, indent=2) + "\n")
    return spec


def sam_image_encoder_example(model, pixels: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return SamImageEncoderGraph(model.sam).eval(), (pixels.to(model.sam.no_mem_embed.dtype),)


def vision_tower_example(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    visual = model.vlm.model.visual
    if image_grid_thw.shape[0] != 1:
        raise ValueError("the vision tower graph is exported for one image")
    return VisionTowerGraph(visual, image_grid_thw).eval(), (pixel_values.to(visual.dtype),)


def mask_pass_example(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    if inputs_embeds.shape[0] != 1:
        raise ValueError("the mask pass graph is exported for one request")
    return MaskPassGraph(model).eval(), (inputs_embeds, attention_mask.to(torch.int64))


MASK_PASS_DYNAMIC_AXES = {"inputs_embeds": {1: SEQUENCE}, "attention_mask": {1: SEQUENCE}}


def sam_mask_decoder_example(model, embedding: SamImageEmbedding, token: torch.Tensor):
    dtype = embedding.image_embed.dtype
    return SamMaskDecoderGraph(model.sam).eval(), (embedding.image_embed, *embedding.high_res_feats, token.to(dtype))


SAM_MASK_DECODER_INPUTS = ("image_embed", "high_res_0", "high_res_1", "token")


def atomic_directory(target: Path):
    """A context: a temporary sibling of ``target`` that becomes ``target`` on success (another
    process exporting the same key at the same time loses the race harmlessly)."""

    class _Atomic:
        def __enter__(self) -> Path:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            return self.tmp

        def __exit__(self, kind, value, traceback) -> None:
            if kind is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            # mkdtemp makes the directory private (0700); graphs are read by other users too (a node
            # running as another user than lens-export), so give it and its files the umask's modes.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)
            for path in self.tmp.rglob("*"):
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            try:
                os.rename(self.tmp, target)
            except OSError:  # already there (made meanwhile by another process)
                shutil.rmtree(self.tmp, ignore_errors=True)

    return _Atomic()

