"""Command-line entry points: ``lens-segment`` and ``lens-make-tiny``.

Errors a user can fix (a model that is not available, an unreadable image, a bad command)
are printed as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def read_image(path: str):
    """Read an image file as a numpy array in its own depth and channels (BGR order for colour)."""
    import cv2

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path!r} does not exist")
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode image {path!r} (not an image file or corrupt)")
    return image


def read_depth(path: str):
    """A depth image: a 16-bit PNG in millimetres or a .npy of float metres (0/NaN = invalid)."""
    import cv2
    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"depth {path!r} does not exist")
    if path.endswith(".npy"):
        try:
            depth = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"cannot read depth {path!r}: {exc}") from exc
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
            raise ValueError(f"depth {path!r} must be a 2-D float array in metres, got {depth.dtype} {depth.shape}")
        return depth.astype(np.float32)
    depth = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if depth is None or depth.ndim != 2 or depth.dtype != np.uint16:
        raise ValueError(f"depth {path!r} must be a single-channel 16-bit PNG in millimetres (or a .npy in metres)")
    return depth


def parse_intrinsics(text: str):
    from lens_ros.grasp import Intrinsics

    try:
        fx, fy, cx, cy = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--intrinsics must be fx,fy,cx,cy (four numbers), got {text!r}") from None
    return Intrinsics(fx, fy, cx, cy)


def write_outputs(out_dir: Path, rgb, result) -> None:
    """mask.png (mono8 255/0, source size), overlay.png and result.json."""
    import cv2

    from lens_ros.visualize import draw_overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_dir / "mask.png"), result.mask.astype("uint8") * 255)
    cv2.imwrite(str(out_dir / "overlay.png"), cv2.cvtColor(draw_overlay(rgb, result), cv2.COLOR_RGB2BGR))
    # numpy scalars/arrays (e.g. in grasps) as plain JSON numbers and lists
    as_json = json.dumps(result.to_dict(), indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    (out_dir / "result.json").write_text(as_json + "\n")


def summary_line(result, out_dir: Path) -> str:
    t = result.timings
    if result.found:
        box = "[" + ", ".join(f"{v:.0f}" for v in result.box) + "]"
        what = f"found box={box} score={result.score:.2f} mask={int(result.mask.sum())}px grasps={len(result.grasps)}"
    else:
        what = "not found"
    return (f"{what} tokens={result.generated_tokens} total={t.total_ms:.0f}ms "
            f"(reasoning {t.reasoning_ms:.0f}ms, mask {t.mask_ms:.0f}ms) -> {out_dir}")


def segment_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-segment", description="Segment the object a command names in an image.")
    parser.add_argument("--model", default=None, help="Hugging Face id, checkpoint directory or 'tiny' "
                        "(default: OuyBin/LENS)")
    parser.add_argument("--image", required=True, help="image file (PNG/JPEG; 8 or 16 bit; gray, colour or with alpha)")
    parser.add_argument("--command", required=True, help="the language goal, e.g. 'the mug with the chipped handle'")
    parser.add_argument("--cot", action="store_true", help="chain-of-thought prompt (for OuyBin/LENS_ReasonSeg_CoT)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation limit (default 256)")
    parser.add_argument("--offline", action="store_true", help="never download; use the local Hugging Face cache only")
    parser.add_argument("--out", default="lens_segment_out", help="output directory (default ./lens_segment_out)")
    parser.add_argument("--depth", default=None, help="depth aligned to the image: 16-bit PNG (mm) or .npy (m)")
    parser.add_argument("--intrinsics", default=None, help="fx,fy,cx,cy of the image (pixels), for 3-D grasps")
    parser.add_argument("--grasp-approach", choices=("top_down", "camera"), default="top_down",
                        help="3-D grasps approach against the table normal (default) or along the camera ray")
    parser.add_argument("--no-grasps", action="store_true", help="do not compute grasp regions")
    args = parser.parse_args(argv)

    from lens_ros.images import InvalidInputError, check_command, to_rgb8
    from lens_ros.model.checkpoint import DEFAULT_MODEL, CheckpointError, ModelUnavailableError
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    try:
        image = read_image(args.image)
        rgb = to_rgb8(image, bgr=image.ndim == 3 and image.shape[2] in (3, 4))
        command = check_command(args.command)
        depth = read_depth(args.depth) if args.depth else None
        intrinsics = parse_intrinsics(args.intrinsics) if args.intrinsics else None
        if (depth is None) != (intrinsics is None):
            raise ValueError("--depth and --intrinsics go together (3-D grasps need both)")
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    options = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    try:
        config = PipelineConfig(model=args.model or DEFAULT_MODEL, device=args.device, dtype=dtype,
                                allow_download=not args.offline, cot=args.cot, **options)
        pipeline = LensPipeline.from_config(config)
        grasp = None
        if not args.no_grasps:
            from lens_ros.grasp import GraspConfig

            grasp = GraspConfig(approach=args.grasp_approach, component="box")  # the part LENS's box names
        result = pipeline.segment(rgb, command, grasp=grasp, depth=depth, intrinsics=intrinsics)
    except (ModelUnavailableError, CheckpointError, InvalidInputError) as exc:
        return _fail(str(exc))
    except ValueError as exc:  # configuration values
        return _fail(str(exc))
    out_dir = Path(args.out)
    write_outputs(out_dir, rgb, result)
    print(summary_line(result, out_dir))
    return 0


def make_tiny_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-make-tiny",
                                     description="Write a tiny random LENS checkpoint in the released layout.")
    parser.add_argument("directory", help="where to write the checkpoint")
    parser.add_argument("--queries", type=int, default=64, help="number of context queries (LENS: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args(argv)
    if args.queries < 1:
        return _fail("--queries must be at least 1")

    from lens_ros.model.tiny import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(args.directory, TinySpec(num_queries=args.queries, seed=args.seed))
    print(f"tiny LENS checkpoint written to {path} (random weights: its outputs are meaningless)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(segment_main())
