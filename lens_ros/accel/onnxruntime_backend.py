"""The onnxruntime backend: every stage (SAM2's image encoder and mask decoder, the vision tower,
the mask pass) runs as an ONNX graph.

Graphs are exported on first use for each input shape (a camera has one; the mask pass's sequence
length is a dynamic axis) into a cache directory named by ``export_key`` (weights hash, shapes,
dtype, opset, library versions), or read from ``lens-export``'s output, and reused by every later
process. Inputs and outputs are bound to torch tensors in place (onnxruntime's IO binding over
the tensors' memory), so nothing is copied on the way in or out, on the CPU as with the CUDA
execution provider. The mask pass's graph starts after the token embedding (a gather, kept in
torch with the image features' scatter) and holds the whole language model: 12 GB of float32
weights at real size, beside the graph in one ``.onnx.data`` file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from lens_ros.accel import export
from lens_ros.accel.stages import Stages, features_output
from lens_ros.model.sam import SamImageEmbedding

log = logging.getLogger(__name__)

_ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}  # onnx TensorProto


def default_cache_dir() -> Path:
    root = os.environ.get("LENS_ROS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lens_ros")
    return Path(root).expanduser() / "onnx"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("the onnxruntime backend needs the onnxruntime package (pip install onnxruntime, or "
                           "onnxruntime-gpu on a CUDA machine); backend 'torch' needs nothing more") from exc
    return onnxruntime


def default_providers(device: torch.device) -> list[str]:
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def bound_tensors(spec: dict, inputs: dict[str, torch.Tensor], device: torch.device, what: str = "graph"):
    """The inputs as the exported graph takes them (its shapes refused otherwise, a dynamic axis, named
    in the spec, of any size; its dtype, contiguous on ``device``), and empty contiguous outputs: tensors
    whose memory a runtime reads and writes in place."""
    bound = {}
    for name, tensor in inputs.items():
        expected = spec["inputs"][name]
        if len(tensor.shape) != len(expected["shape"]) or any(
                isinstance(want, int) and got != want for got, want in zip(tensor.shape, expected["shape"])):
            raise ValueError(f"{name}: shape {list(tensor.shape)}, the {what} takes {expected['shape']}")
        bound[name] = tensor.to(device, getattr(torch, expected["dtype"])).contiguous()
    # torch.empty, not empty_like of torch's own outputs: those may be strided views, the runtime writes row-major.
    outputs = {name: torch.empty(out["shape"], dtype=getattr(torch, out["dtype"]), device=device)
               for name, out in spec["outputs"].items()}
    return bound, outputs


class Graph:
    """One onnxruntime session whose inputs and outputs are torch tensors on ``device``."""

    def __init__(self, path: Path, spec: dict, device: torch.device, providers: list[str]) -> None:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device.type == "cuda":
            providers = [(p, {"device_id": device.index or 0}) if p == "CUDAExecutionProvider" else p
                         for p in providers]
        options.log_severity_level = 3  # errors only: shape-inference notes on folded constants are noise
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.directory = path.parent
        self.spec = spec
        self.device = device

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0
        bound, outputs = bound_tensors(self.spec, inputs, self.device)
        for name, tensor in [*bound.items(), *outputs.items()]:
            bind = binding.bind_input if name in bound else binding.bind_output
            bind(name, device_type, device_id, _ONNX_DTYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        if self.device.type == "cuda":  # onnxruntime runs on its own stream: torch's writes to the inputs first
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)  # returns when the outputs are written
        return list(outputs.values())


class OnnxRuntimeStages(Stages):
    """Every stage in onnxruntime (several images at once, which one command never sends, in torch)."""

    name = "onnxruntime"

    def __init__(self, model, cache_dir: str | os.PathLike | None = None, providers: list[str] | None = None,
                 source: str = "") -> None:
        super().__init__(model)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device = model.learnable_query.device
        self.providers = providers or default_providers(self.device)  # imports onnxruntime: a clear error first
        self.source = source
        self._graphs: dict[tuple, Graph] = {}
        self._weights: dict[str, str] = {}
        self.used: dict[str, str] = {}  # stage -> the cache directory of the graph it ran last

    def weights(self, stage: str) -> str:
        if stage not in self._weights:  # hashed once per backend (a second or two at real size)
            self._weights[stage] = export.weights_sha256(export.stage_tensors(self.model, stage))
        return self._weights[stage]

    def graph(self, stage: str, module_and_example, input_names, output_names, constants: dict | None = None,
              dynamic_axes: dict[str, dict[int, str]] | None = None) -> Graph:
        """The session for ``stage`` at these inputs (and ``constants`` folded into the graph, such as
        the vision tower's patch grid; ``dynamic_axes`` of any size), exported first when the cache lacks it."""
        module, example = module_and_example
        dynamic_axes = dynamic_axes or {}
        inputs = {name: export.tensor_spec(t, dynamic_axes.get(name)) for name, t in zip(input_names, example)}
        key = (stage, json.dumps([inputs, constants], sort_keys=True))
        if key in self._graphs:
            self.used[stage] = self._graphs[key].directory.name
            return self._graphs[key]
        dtype = str(example[0].dtype).removeprefix("torch.")
        name = export.export_key(stage, self.weights(stage), inputs, dtype, constants)
        directory = self.cache_dir / f"{stage}-{name}"
        if not (directory / f"{stage}.json").is_file():
            log.info("onnxruntime backend: exporting %s for inputs %s to %s (once per shape)", stage, inputs, directory)
            with export.atomic_directory(directory) as tmp:
                export.export_stage(stage, module, example, input_names, output_names, tmp, source=self.source,
                                    constants=constants, dynamic_axes=dynamic_axes)
        spec = json.loads((directory / f"{stage}.json").read_text())
        self._graphs[key] = self.make_graph(directory, spec)
        self.used[stage] = directory.name
        return self._graphs[key]

    def make_graph(self, directory: Path, spec: dict):
        """What runs an exported graph (a subclass runs it otherwise: TensorRT)."""
        return Graph(directory / spec["file"], spec, self.device, self.providers)

    def encode_sam_image(self, pixels: torch.Tensor) -> SamImageEmbedding:
        graph = self.graph(export.SAM_IMAGE_ENCODER, export.sam_image_encoder_example(self.model, pixels), ["pixels"],
                           list(export.SAM_OUTPUTS))
        image_embed, *high_res = graph(pixels=pixels)
        return SamImageEmbedding(image_embed=image_embed, high_res_feats=high_res)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        if image_grid_thw.shape[0] != 1:  # the graphs are per image; several images stay in torch
            return super().image_features(pixel_values, image_grid_thw)
        module_and_example = export.vision_tower_example(self.model, pixel_values, image_grid_thw)
        graph = self.graph(export.VISION_TOWER, module_and_example, ["pixel_values"], ["features"],
                           constants={"image_grid_thw": image_grid_thw[0].tolist()})
        (features,) = graph(pixel_values=pixel_values)
        return features_output(features)

    def mask_pass(self, sequence: torch.Tensor, attention: torch.Tensor, image_features) -> torch.Tensor:
        if sequence.shape[0] != 1 or not bool(attention.all()):  # the graph is one unpadded request; a padded
            return super().mask_pass(sequence, attention, image_features)  # batch (evaluation) stays in torch
        inputs_embeds = self.model.sequence_embeds(sequence, image_features)
        graph = self.graph(export.MASK_PASS, export.mask_pass_example(self.model, inputs_embeds, attention),
                           ["inputs_embeds", "attention_mask"], ["token"], dynamic_axes=export.MASK_PASS_DYNAMIC_AXES)
        (token,) = graph(inputs_embeds=inputs_embeds, attention_mask=attention)
        return token

    def decode_mask(self, embedding: SamImageEmbedding, token: torch.Tensor):
        graph = self.graph(export.SAM_MASK_DECODER, export.sam_mask_decoder_example(self.model, embedding, token),
                           list(export.SAM_MASK_DECODER_INPUTS), ["low_res", "iou"])
        low_res, iou = graph(image_embed=embedding.image_embed, high_res_0=embedding.high_res_feats[0],
                             high_res_1=embedding.high_res_feats[1], token=token)
        return low_res, iou
