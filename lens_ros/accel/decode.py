"""The compiled decode loop: a static KV cache and ``torch.compile`` of the per-token step.

Eager ``generate`` spends most of a short answer (25 tokens box-only) in per-token Python and
kernel-launch overhead, not arithmetic. transformers' own static cache + compiled forward removes
it (CUDA graphs on a GPU through inductor's "reduce-overhead" mode); the tokens are exactly eager
greedy decoding's, under the checkpoint's generation_config (its repetition penalty included):
the test compares them. The prefill stays eager; the first compiled step compiles (tens of seconds),
and later calls reuse it while the cache is long enough: its length is rounded up to
``CACHE_ROUNDING`` tokens, and transformers keeps the longest one asked for, so a camera's
commands recompile rarely.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COMPILE_BACKENDS = ("auto", "inductor", "tensorrt", "eager")
CACHE_ROUNDING = 256


def resolve_compile_backend(backend: str, device: torch.device) -> str:
    """``auto``: torch_tensorrt's ``tensorrt`` backend on a GPU where it is installed, else inductor."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "tensorrt" if device.type == "cuda" and _has_torch_tensorrt() else "inductor"
    if backend == "tensorrt" and not _has_torch_tensorrt():
        raise RuntimeError("compile_backend 'tensorrt' needs torch_tensorrt (pip install torch-tensorrt, matching "
                           "the installed torch); 'inductor' needs nothing more")
    return backend


@functools.cache  # asked on every compiled command: a failed import is not cached by Python
def _has_torch_tensorrt() -> bool:
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" torch.compile backend)
    except ImportError:
        return False
    return True


def decode_options(backend: str, device: torch.device, prompt_tokens: int, max_new_tokens: int) -> dict:
    """Keyword arguments for ``generate`` that run the compiled decode loop."""
    from transformers import CompileConfig

    config = CompileConfig(backend=resolve_compile_backend(backend, device), fullgraph=False)
    # transformers compiles by itself on GPUs only; elsewhere (the CPU here) it must be asked to.
    config._compile_all_devices = device.type != "cuda"
    length = -(-(prompt_tokens + max_new_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING
    return {"cache_implementation": "static", "compile_config": config, "max_cache_len": length}
