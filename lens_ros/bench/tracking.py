"""Per-frame time of the streaming tracker (lens_ros.tracking), by image size and object count.

    python -m lens_ros.bench.tracking                          # tiny tracker model, CPU
    python -m lens_ros.bench.tracking --model real-size --frames 6   # SAM2 Hiera-L, random weights
    python -m lens_ros.bench.tracking --device cuda --dtype bfloat16 --model real-size

Each object starts from a box mask on frame 0; then every frame is a new camera image (the
shapes move), and ``update`` is timed from the RGB frame in to the masks at the frame's size out.
The first frames fill SAM2's memory window (7 frames) and are reported apart from the rest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def _frames(width: int, height: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = (rng.random((height, width, 3)) * 60 + 80).astype(np.uint8)
    frames = []
    for t in range(count):
        frame = base.copy()
        x, y = (40 + 9 * t) % max(width - 160, 1), height // 3
        frame[y:y + 120, x:x + 160] = (220, 40, 40)
        frames.append(frame)
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, real-size (Hiera-L, random) or a tracker model source")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (autocast on CUDA)")
    parser.add_argument("--sizes", default="640x480,1280x720")
    parser.add_argument("--objects", default="1,4")
    parser.add_argument("--frames", type=int, default=20, help="frames per series (the first 7 fill the memory)")
    args = parser.parse_args(argv)

    import torch

    from lens_ros.images import parse_image_size
    from lens_ros.model.sam import Sam2Spec
    from lens_ros.tracking.models import build_tracker_architecture, load_tracker_model
    from lens_ros.tracking.tracker import StreamingTracker

    model = (build_tracker_architecture(Sam2Spec(), args.device) if args.model == "real-size"
             else load_tracker_model(args.model, device=args.device))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bfloat16" and args.device != "cpu"
                else torch.autocast("cpu", enabled=False))
    print(f"tracker model {args.model} (SAM2 input {model.image_size}x{model.image_size}) on {args.device} "
          f"({args.dtype}), {torch.get_num_threads()} threads")
    print(f"  {'image':<10}{'objects':>8}{'median ms':>11}{'p10':>8}{'p90':>8}{'first 7 median':>16}")
    for size in args.sizes.split(","):
        width, height = parse_image_size(size)
        frames = _frames(width, height, args.frames + 1)
        for count in (int(n) for n in args.objects.split(",")):
            tracker = StreamingTracker(model)
            with autocast:
                for obj_id in range(1, count + 1):
                    mask = np.zeros((height, width), bool)
                    top = (obj_id - 1) * height // (count + 1)
                    mask[top:top + height // (count + 1), 10 * obj_id:10 * obj_id + width // 4] = True
                    tracker.add_object(obj_id, frames[0], mask)
                times = []
                for frame in frames[1:]:
                    start = time.perf_counter()
                    tracker.update(frame)
                    if args.device != "cpu":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) * 1000)
            warm, filling = times[7:] or times, times[:7]
            print(f"  {size:<10}{count:>8}{statistics.median(warm):>11.1f}{np.percentile(warm, 10):>8.1f}"
                  f"{np.percentile(warm, 90):>8.1f}{statistics.median(filling):>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
