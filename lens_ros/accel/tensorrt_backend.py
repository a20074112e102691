"""The TensorRT backend: engines built from the onnxruntime backend's ONNX graphs, cached on disk.

TensorRT's own Python API (``tensorrt``), not onnxruntime's TensorRT execution provider: the
engine, its timing cache and its cache key stay in our hands (a robot must know when an engine is
stale), the same API runs on x86 + CUDA and on Jetson (JetPack ships it as python3-libnvinfer),
and no second runtime sits between the pipeline and the GPU.

Engines are not portable: one built by another TensorRT version, on another GPU or compute
capability, from another graph, for other shapes or at another precision is rebuilt
(``EngineKey``). The first build per graph takes minutes on a Jetson; ``lens-export --engines``
does it ahead of time, otherwise the first frame of a size builds it, with a warning in the log.
NOT RUN where this package is developed: TensorRT cannot be installed there; the
key, the profile shapes and the missing-package error are tested, the build and execution are
standard TensorRT 10 calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages, bound_tensors

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "bfloat16")
WORKSPACE_BYTES = 4 << 30
# The mask pass's sequence length (min, opt, max) in its engine's optimisation profile: a 640x480
# camera gives 391 image tokens, the template and a command ~40 more, a box-only answer ~25 and a
# CoT answer 150-250 (opt ~ box-only at 640x480). 4096 covers VLM_MAX_PIXELS' 1280 image tokens
# with any answer; longer sequences are refused by TensorRT at set_input_shape.
SEQUENCE_PROFILE = (1, 512, 4096)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError("the tensorrt backend needs TensorRT's Python package (pip install tensorrt on x86 + "
                           "CUDA; JetPack's python3-libnvinfer on a Jetson); backend 'onnxruntime' or 'torch' runs "
                           "without it") from exc
    return tensorrt


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for part in sorted([path, *path.parent.glob(path.name + ".data")]):  # the graph and its external weights
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any difference means another engine."""

    tensorrt: str
    gpu: str
    compute_capability: str
    onnx_sha256: str
    shapes: str  # the inputs' shapes (the optimisation profile for dynamic ones), as JSON
    precision: str

    def name(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(name, compute capability) of a CUDA device, as engines are keyed by them."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def engine_key(onnx_path: Path, spec: dict, precision: str, gpu: tuple[str, str], tensorrt_version: str,
               profile: dict | None = None) -> EngineKey:
    """The key of the engine for an exported graph (``spec``: its inputs), on ``gpu`` (gpu_identity)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    shapes = {name: tensor["shape"] for name, tensor in spec["inputs"].items()} | (profile or {})
    return EngineKey(tensorrt=tensorrt_version, gpu=gpu[0], compute_capability=gpu[1],
                     onnx_sha256=file_sha256(onnx_path), shapes=json.dumps(shapes, sort_keys=True),
                     precision=precision)


def profile_shapes(spec: dict, dynamic: dict[str, dict[int, tuple[int, int, int]]]) -> dict[str, tuple]:
    """(min, opt, max) shape per input for a TensorRT optimisation profile: the graph's fixed shape,
    with each dynamic axis (e.g. the mask pass's sequence length) given as (min, opt, max)."""
    profile = {}
    for name, tensor in spec["inputs"].items():
        low, best, high = list(tensor["shape"]), list(tensor["shape"]), list(tensor["shape"])
        for axis, (a, b, c) in dynamic.get(name, {}).items():
            if not 1 <= a <= b <= c:
                raise ValueError(f"{name} axis {axis}: need 1 <= min <= opt <= max, got {(a, b, c)}")
            low[axis], best[axis], high[axis] = a, b, c
        if any(not isinstance(size, int) for size in low):
            raise ValueError(f"{name}: dynamic axis without a (min, opt, max) in the profile: {tensor['shape']}")
        profile[name] = (tuple(low), tuple(best), tuple(high))
    return profile


def graph_profile(spec: dict) -> dict[str, tuple] | None:
    """The optimisation profile of an exported graph: SEQUENCE_PROFILE on each of its dynamic axes
    (the mask pass's), None for a graph with fixed shapes."""
    dynamic = {name: {int(axis): SEQUENCE_PROFILE for axis in axes} for name, axes in spec.get("dynamic_axes", {}).items()}
    return profile_shapes(spec, dynamic) if dynamic else None


def build_engine(onnx_path: Path, engine_path: Path, precision: str, timing_cache: Path,
                 profile: dict[str, tuple] | None = None) -> None:
    """Parse the ONNX graph, build a serialized engine (reusing and updating the timing cache) and
    write it atomically."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bfloat16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if profile:
        optimisation = builder.create_optimization_profile()
        for name, (low, best, high) in profile.items():
            optimisation.set_shape(name, low, best, high)
        config.add_optimization_profile(optimisation)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    for path, payload in ((engine_path, bytes(serialized)), (timing_cache, bytes(config.get_timing_cache().serialize()))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(payload)
        os.replace(tmp, path)


class TensorRTGraph:
    """One engine whose inputs and outputs are CUDA torch tensors (addresses bound in place)."""

    def __init__(self, engine_path: Path, spec: dict, device: torch.device) -> None:
        trt = import_tensorrt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path}")
        self.context = self.engine.create_execution_context()
        self.spec, self.device, self.directory = spec, device, engine_path.parent

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        bound, outputs = bound_tensors(self.spec, inputs, self.device, "engine")
        for name, tensor in bound.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
        for name, tensor in [*bound.items(), *outputs.items()]:
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return list(outputs.values())  # ordered on the stream: later torch work on it sees the results


class TensorRTStages(OnnxRuntimeStages):
    """The onnxruntime backend's graphs, run as TensorRT engines (built once per EngineKey)."""

    name = "tensorrt"

    def __init__(self, model, cache_dir=None, source: str = "", precision: str | None = None) -> None:
        self.trt = import_tensorrt()
        require_cuda(model.learnable_query.device)
        # Export needs onnx, not onnxruntime: no providers are asked for.
        super().__init__(model, cache_dir=cache_dir, source=source, providers=["unused"])
        self.precision = precision or str(model.learnable_query.dtype).removeprefix("torch.")

    def make_graph(self, directory: Path, spec: dict):
        engine = engine_for(directory / spec["file"], spec, self.cache_dir, self.precision, self.device,
                            self.trt.__version__)
        return TensorRTGraph(engine, spec, self.device)


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise RuntimeError(f"the tensorrt backend needs a CUDA device, the model is on {device}; "
                           "backend 'onnxruntime' or 'torch' runs on the CPU")


def engine_for(onnx_path: Path, spec: dict, cache_dir: Path, precision: str, device: torch.device,
               tensorrt_version: str) -> Path:
    """The engine file for an exported graph under ``cache_dir/engines``, built first when missing."""
    profile = graph_profile(spec)
    key = engine_key(onnx_path, spec, precision, gpu_identity(device), tensorrt_version, profile)
    engine = cache_dir / "engines" / f"{onnx_path.stem}-{key.name()}.engine"
    if not engine.is_file():
        log.warning("tensorrt backend: building the %s engine (%s); minutes on a Jetson, once per %s",
                    onnx_path.stem, precision, engine.name)
        build_engine(onnx_path, engine, precision, cache_dir / "engines" / "timing.cache", profile)
        engine.with_suffix(".json").write_text(json.dumps(asdict(key), indent=2) + "\n")
    return engine


def build_engines(out: Path, manifest: dict, device: torch.device) -> list[Path]:
    """``lens-export --engines``: an engine for every graph of a manifest, at the manifest's dtype."""
    trt = import_tensorrt()
    require_cuda(device)
    return [engine_for(out / graph["directory"] / graph["file"], graph, out, manifest["dtype"], device, trt.__version__)
            for graph in manifest["graphs"].values()]
