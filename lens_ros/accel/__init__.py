"""Stage backends below the pipeline: the torch reference, onnxruntime, TensorRT, and ONNX export.

``make_stages(model, backend, ...)`` is the one place a backend name becomes a ``Stages`` object.
"""

from __future__ import annotations

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def make_stages(model, backend: str = "torch", cache_dir=None, source: str = ""):
    """The ``Stages`` that run ``model`` with ``backend`` (one of ``BACKENDS``)."""
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
