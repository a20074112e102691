"""LensModel (Qwen2.5-VL + LENS context head + SAM2), checkpoint I/O and tiny models.

torch is imported with this package; transformers and sam2 only when a model is built or loaded.
"""

from lens_ros.model.checkpoint import (  # noqa: F401
    DEFAULT_MODEL,
    RELEASED_MODELS,
    TINY_MODEL,
    CheckpointError,
    ModelUnavailableError,
    load_lens_model,
    save_lens_checkpoint,
)
