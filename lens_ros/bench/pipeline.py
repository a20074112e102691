"""Per-stage latency and peak memory of ``LensPipeline``.

    python -m lens_ros.bench.pipeline --model tiny --runs 10
    python -m lens_ros.bench.pipeline --model OuyBin/LENS --device cuda --dtype bfloat16
    python -m lens_ros.bench.pipeline --model tiny --backend torch,onnxruntime --compile --force-tokens 25

Two series: "new image" (each run on a different frame: everything is computed) and "same
image" (commands repeated on one frame: SAM2 embedding and vision tower reused). Prints the
median and the 10th-90th percentile spread per stage. With several backends (and --compile),
one table puts the "new image" medians of every variant side by side. --force-tokens N makes
every answer exactly N tokens (min = max new tokens), so that random weights cost what trained
ones do (25 for a box-only answer, about 200 with chain of thought).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from dataclasses import fields

import numpy as np

from lens_ros.pipeline import LensPipeline, PipelineConfig, StageTimings


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _report(title: str, runs: list[StageTimings]) -> None:
    print(f"\n{title} ({len(runs)} runs)")
    print(f"  {'stage':<18}{'median ms':>12}{'p10 ms':>10}{'p90 ms':>10}")
    for f in fields(StageTimings):
        values = [getattr(r, f.name) for r in runs]
        print(f"  {f.name:<18}{statistics.median(values):>12.1f}{_percentile(values, 10):>10.1f}"
              f"{_percentile(values, 90):>10.1f}")


def _peak_memory(device: str) -> str:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"peak process RSS {rss_mb:.0f} MB"
    if device.startswith("cuda"):
        import torch

        text += f", peak CUDA allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image", default=None, help="image file (default: the shipped demo photo at 640x480)")
    parser.add_argument("--command", default="the coffee cup")
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument("--backend", default="torch", help="comma-separated: torch,onnxruntime,tensorrt")
    parser.add_argument("--compile", action="store_true", help="also time each backend with the compiled decode loop")
    parser.add_argument("--force-tokens", type=int, default=None, help="every answer exactly N tokens")
    parser.add_argument("--export-dir", default="", help="where the onnxruntime/tensorrt graphs live")
    args = parser.parse_args(argv)

    import cv2

    from lens_ros.cli import read_image
    from lens_ros.images import to_rgb8

    if args.image:
        raw = read_image(args.image)
        rgb = to_rgb8(raw, bgr=raw.ndim == 3)
    else:
        from pathlib import Path

        photo = Path(__file__).resolve().parents[1] / "data" / "coffee.jpg"
        rgb = cv2.resize(cv2.imread(str(photo)), (640, 480), interpolation=cv2.INTER_AREA)[:, :, ::-1].copy()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    from lens_ros.model.checkpoint import load_lens_model

    model, processor = load_lens_model(args.model, device=args.device, dtype=dtype, allow_download=args.allow_download)
    max_new_tokens = args.force_tokens or args.max_new_tokens
    if args.force_tokens:
        model.vlm.generation_config.min_new_tokens = args.force_tokens
    variants = [(backend, compiled) for backend in args.backend.split(",") for compiled in
                ((False, True) if args.compile else (False,))]
    print(f"model {args.model} on {args.device} ({dtype}), image {rgb.shape[1]}x{rgb.shape[0]}, "
          f"max_new_tokens {max_new_tokens}{' (forced)' if args.force_tokens else ''}")

    def frame(i: int) -> np.ndarray:  # a different image each run, same content statistics
        return np.ascontiguousarray(np.roll(rgb, shift=i + 1, axis=1))

    medians = {}
    for backend, compiled in variants:
        name = backend + (" + compiled decode" if compiled else "")
        config = PipelineConfig(model=args.model, device=args.device, dtype=dtype, max_new_tokens=max_new_tokens,
                                backend=backend, export_dir=args.export_dir, compile=compiled)
        pipeline = LensPipeline(model, processor, config)
        for i in range(args.warmup):  # exports graphs / compiles here, not in the timed runs
            pipeline.segment(frame(-i - 10), args.command)
        new_image = [pipeline.segment(frame(i), args.command).timings for i in range(args.runs)]
        same_image = [pipeline.segment(rgb, args.command).timings for _ in range(args.runs + 1)][1:]
        # A random tiny model rarely writes a box, so time the mask pass on a given answer as well.
        import time

        mask_pass = []
        for i in range(args.runs):
            prepared = pipeline.prepare_image(frame(i))
            start = time.perf_counter()
            pipeline.answer_mask_logits(prepared, args.command, "[64, 48, 320, 240]")
            mask_pass.append(StageTimings(mask_ms=(time.perf_counter() - start) * 1000))
        print(f"\n=== {name} (stages: {pipeline.stages.describe()})")
        _report("new image each run", new_image)
        _report("same image (embeddings reused)", same_image)
        median = statistics.median(t.mask_ms for t in mask_pass)
        print(f"\nmask pass on a given answer (prompt + answer + queries -> SAM2 -> H x W): median {median:.1f} ms, "
              f"p10 {_percentile([t.mask_ms for t in mask_pass], 10):.1f}, "
              f"p90 {_percentile([t.mask_ms for t in mask_pass], 90):.1f}")
        medians[name] = {f.name: statistics.median(getattr(t, f.name) for t in new_image) for f in fields(StageTimings)}
        medians[name]["mask pass (given answer)"] = median
        pipeline.close()
    if len(medians) > 1:
        print("\nmedian ms per stage, new image each run")
        names = list(medians)
        width = max(map(len, names)) + 3
        print(f"  {'stage':<26}" + "".join(f"{n:>{width}}" for n in names))
        for stage in medians[names[0]]:
            print(f"  {stage:<26}" + "".join(f"{medians[n][stage]:>{width}.1f}" for n in names))
    print(f"\n{_peak_memory(args.device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
