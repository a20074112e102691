"""Per-stage latency and peak memory of ``LensPipeline``.

    python -m lens_ros.bench.pipeline --model tiny --runs 10
    python -m lens_ros.bench.pipeline --model OuyBin/LENS --device cuda --dtype bfloat16
    python -m lens_ros.bench.pipeline --model tiny --backend torch,onnxruntime --compile --force-tokens 25
    python -m lens_ros.bench.pipeline --model real-size --force-tokens 25 --lens-two-pass --runs 3

Two series: "new image" (each run on a different frame: everything is computed) and "same
image" (commands repeated on one frame: SAM2 embedding and vision tower reused). Prints the
median and the 10th-90th percentile spread per stage. With several backends (and --compile),
one table puts the "new image" medians of every variant side by side. --force-tokens N makes
every answer exactly N tokens (min = max new tokens), so that random weights cost what trained
ones do (25 for a box-only answer, about 200 with chain of thought). ``--model real-size`` is
Qwen2.5-VL-3B and SAM2 Hiera-L with random weights (lens_ros.model.real_size; 16 GB in float32).
--lens-two-pass also times LENS's own path on the same frames (lens_ros.bench.lens_two_pass:
everything in sequence, the vision tower again and a full forward in pass 2) and prints each
variant's speed-up over it.
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
    parser.add_argument("--lens-two-pass", action="store_true", help="also time LENS's own two-pass path")
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
    from lens_ros.model.checkpoint import DTYPES, load_lens_model
    from lens_ros.model.real_size import REAL_SIZE, build_real_size_model

    if args.model == REAL_SIZE:
        model, processor = build_real_size_model(dtype=DTYPES[dtype], language_model=True)
        model.to(args.device)
    else:
        model, processor = load_lens_model(args.model, device=args.device, dtype=dtype,
                                           allow_download=args.allow_download)
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
        from lens_ros.bench.lens_two_pass import pass_two_ms

        for i in range(args.warmup):  # exports graphs / compiles here, not in the timed runs
            pipeline.segment(frame(-i - 10), args.command)
            pass_two_ms(pipeline, frame(-i - 20), args.command, max_new_tokens)
        new_image = [pipeline.segment(frame(i), args.command).timings for i in range(args.runs)]
        same_image = [pipeline.segment(rgb, args.command).timings for _ in range(args.runs + 1)][1:]
        # Random weights rarely write a box (no mask pass then): time the mask pass after an answer of
        # max_new_tokens tokens as well, and count it in "command -> mask".
        mask_pass = [pass_two_ms(pipeline, frame(i), args.command, max_new_tokens) for i in range(args.runs)]
        print(f"\n=== {name} (stages: {pipeline.stages.describe()})")
        _report("new image each run", new_image)
        _report("same image (embeddings reused)", same_image)
        median = statistics.median(mask_pass)
        print(f"\nmask pass after a {max_new_tokens}-token answer (prompt + answer + queries -> SAM2 -> H x W): median "
              f"{median:.1f} ms, p10 {_percentile(mask_pass, 10):.1f}, p90 {_percentile(mask_pass, 90):.1f}")
        medians[name] = {f.name: statistics.median(getattr(t, f.name) for t in new_image) for f in fields(StageTimings)}
        medians[name]["mask pass (forced answer)"] = median
        answered = sum(t.mask_ms > 0 for t in new_image) > len(new_image) / 2
        medians[name]["command -> mask"] = medians[name]["total_ms"] + (0.0 if answered else median)
        pipeline.close()
    if args.lens_two_pass:
        from lens_ros.bench.lens_two_pass import lens_two_pass_ms

        config = PipelineConfig(model=args.model, device=args.device, dtype=dtype, max_new_tokens=max_new_tokens,
                                overlap_sam_encoder=False)
        pipeline = LensPipeline(model, processor, config)
        lens = [lens_two_pass_ms(pipeline, frame(i), args.command, max_new_tokens) for i in range(args.runs)]
        pipeline.close()
        total, pass_two = statistics.median(r[0] for r in lens), statistics.median(r[1] for r in lens)
        print(f"\nLENS's two-pass path (in sequence; pass 2 = vision tower again + full forward with hidden states): "
              f"median {total:.1f} ms, of which pass 2 {pass_two:.1f} ms; its prompt token differs from this "
              f"pipeline's mask pass by at most {max(r[2] for r in lens):.1e}")
        for name, stage in medians.items():
            print(f"  {name}: command -> mask {stage['command -> mask']:.1f} ms, "
                  f"speed-up over LENS's path {total / stage['command -> mask']:.2f}x")
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
