"""Run every stage once at the camera's resolution before the first command needs it.

The first frame of a size otherwise pays for everything done once per shape: the onnxruntime
backend exports its graphs, the tensorrt backend builds its engines (minutes on a Jetson), the
compiled decode loop compiles, CUDA loads its kernels. ``warm_up`` answers one command on a
synthetic frame of that size (and runs the mask pass on a given answer when the model wrote no
box), reporting each stage as it starts. lens_node runs it right after activation when the
``warm_up_size`` parameter is set, with the progress in /diagnostics and the log.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from lens_ros.accel.check import EXAMPLE_ANSWER

WARM_UP_COMMAND = "the object in the middle"


def synthetic_frame(width: int, height: int) -> np.ndarray:
    """A deterministic RGB frame with some structure (a bright square on a gradient)."""
    rows, cols = np.mgrid[0:height, 0:width]
    rgb = np.stack([cols * 255 // max(width - 1, 1), rows * 255 // max(height - 1, 1),
                    np.full_like(rows, 96)], axis=-1).astype(np.uint8)
    rgb[height // 3:2 * height // 3, width // 3:2 * width // 3] = (230, 40, 40)
    return rgb


def warm_up(pipeline, image_size: tuple[int, int], report: Callable[[str], None] = print,
            cancel: threading.Event | None = None) -> float:
    """Answer one command on a synthetic ``image_size`` frame, so that every stage has run at that
    size; ``report(text)`` is called as each stage starts. Returns the seconds it took; raises
    ``lens_ros.pipeline.Cancelled`` when ``cancel`` is set during generation."""
    width, height = image_size
    rgb = synthetic_frame(width, height)
    stages = ", ".join(f"{stage}={backend}" for stage, backend in pipeline.stages.describe().items())
    start = time.monotonic()
    report(f"warm-up at {width}x{height} ({stages}); graphs, engines and compiled code are made here once per size")
    seen = set()

    def progress(stage: str, reasoning: str) -> None:
        if stage not in seen:
            seen.add(stage)
            report(f"warm-up: {stage}")

    result = pipeline.segment(rgb, WARM_UP_COMMAND, progress=progress, cancel=cancel)
    if not result.found:  # no box in the answer, so no mask pass yet: run it on a given answer
        report("warm-up: mask (on a given answer)")
        pipeline.answer_mask_logits(rgb, WARM_UP_COMMAND, EXAMPLE_ANSWER)
    elapsed = time.monotonic() - start
    report(f"warm-up done in {elapsed:.1f} s")
    return elapsed
