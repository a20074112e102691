"""Stage backends below the pipeline: the torch reference, onnxruntime, TensorRT, and ONNX export.

``make_stages(model, backend, ...)`` is the one place a backend name becomes a ``Stages`` object;
``stage_backends`` overrides the backend of single stages (``parse_stage_backends``).
"""

from __future__ import annotations

# Names only here (no torch import): node parameters and launch-time validation read them.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
SAM_IMAGE_ENCODER = "sam_image_encoder"
VISION_TOWER = "vision_tower"
MASK_PASS = "mask_pass"
SAM_MASK_DECODER = "sam_mask_decoder"
STAGES = (SAM_IMAGE_ENCODER, VISION_TOWER, MASK_PASS, SAM_MASK_DECODER)  # lens_ros.accel.stages says what each is


def parse_stage_backends(text: str, what: str = "stage_backends") -> dict[str, str]:
    """``"mask_pass=torch, sam_image_encoder=onnxruntime"`` -> {stage: backend} ('' -> {}); a
    ValueError (starting with ``what``) names the part that is not ``<stage>=<backend>``."""
    routes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, backend = (s.strip() for s in part.partition("="))
        if stage not in STAGES or backend not in BACKENDS:
            raise ValueError(f"{what}: {part!r} is not <stage>=<backend> (stages: {', '.join(STAGES)}; "
                             f"backends: {', '.join(BACKENDS)})")
        if stage in routes:
            raise ValueError(f"{what}: {stage} is given twice")
        routes[stage] = backend
    return routes


def _backend(model, backend: str, cache_dir, source: str):
    if backend == "torch":
        from lens_ros.accel.stages import Stages

        return Stages(model)
    if backend == "onnxruntime":
        from lens_ros.accel.onnxruntime_backend import OnnxRuntimeStages

        return OnnxRuntimeStages(model, cache_dir=cache_dir, source=source)
    if backend == "tensorrt":
        from lens_ros.accel.tensorrt_backend import TensorRTStages

        return TensorRTStages(model, cache_dir=cache_dir, source=source)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def make_stages(model, backend: str = "torch", cache_dir=None, source: str = "",
                stage_backends: dict[str, str] | None = None):
    """The ``Stages`` that run ``model`` with ``backend`` (one of ``BACKENDS``), each stage named in
    ``stage_backends`` with its own backend instead."""
    from lens_ros.accel.stages import RoutedStages

    routes = {stage: (stage_backends or {}).get(stage, backend) for stage in STAGES}
    instances = {name: _backend(model, name, cache_dir, source) for name in dict.fromkeys(routes.values())}
    if len(instances) == 1:
        return next(iter(instances.values()))
    return RoutedStages(model, {stage: instances[name] for stage, name in routes.items()})
