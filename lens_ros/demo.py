"""``make demo``: segment the shipped photo with LENS, or with the tiny model when LENS cannot be had.

    python -m lens_ros.demo [--model M] [--command TEXT] [--out DIR] [--device D]

Without ``--model`` (or ``MODEL=...`` in make) it tries ``OuyBin/LENS`` (the local Hugging Face
cache, then a download unless ``HF_HUB_OFFLINE=1``); when that fails it says why and runs the
tiny random model instead, whose masks are meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lens_ros.cli import read_image, summary_line, write_outputs
from lens_ros.images import to_rgb8

PHOTO = Path(__file__).resolve().parent / "data" / "coffee.jpg"
DEFAULT_COMMAND = "the coffee cup"


def load_pipeline(model: str | None, device: str, dtype: str, offline: bool):
    from lens_ros.model.checkpoint import DEFAULT_MODEL, TINY_MODEL, ModelUnavailableError
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    if model:
        return LensPipeline.from_config(PipelineConfig(model=model, device=device, dtype=dtype,
                                                       allow_download=not offline)), model
    try:
        config = PipelineConfig(model=DEFAULT_MODEL, device=device, dtype=dtype, allow_download=not offline)
        return LensPipeline.from_config(config), DEFAULT_MODEL
    except ModelUnavailableError as exc:
        print(f"LENS weights unavailable: {exc}")
        print("Running the TINY RANDOM model instead: the pipeline is real, its masks and boxes are meaningless.")
        return LensPipeline.from_config(PipelineConfig(model=TINY_MODEL, device="cpu", dtype="float32")), TINY_MODEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL") or None)
    parser.add_argument("--command", default=DEFAULT_COMMAND)
    parser.add_argument("--image", default=str(PHOTO))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)

    from lens_ros.model.checkpoint import CheckpointError, ModelUnavailableError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        pipeline, model = load_pipeline(args.model, args.device, dtype, offline)
    except (ModelUnavailableError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    image = read_image(args.image)
    rgb = to_rgb8(image, bgr=image.ndim == 3)
    print(f"model {model} on {args.device}; image {args.image} ({rgb.shape[1]}x{rgb.shape[0]}); "
          f"command {args.command!r}")
    result = pipeline.segment(rgb, args.command)
    out = Path(args.out)
    write_outputs(out, rgb, result)
    print(summary_line(result, out))
    print(f"latency {result.timings.total_ms:.0f} ms; outputs: {out / 'overlay.png'}, {out / 'mask.png'}, "
          f"{out / 'result.json'}")
    if model == "tiny":
        print("(tiny random model: the result above only shows that the pipeline runs end to end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
