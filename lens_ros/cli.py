"""Command-line entry points: ``lens-segment``, ``lens-grasp`` and ``lens-make-tiny``.

``lens-segment`` runs LENS on an image and a command; ``lens-grasp`` computes grasp regions on a
mask the user already has (drawn by hand, from another segmenter), with no model. Both read
images, depth and intrinsics, and draw their overlay, with the same functions below.

Errors a user can fix (a model that is not available, an unreadable image, a bad command)
are printed as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from lens_ros.accel import BACKENDS

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def read_image(path: str, what: str = "image"):
    """Read an image file as a numpy array in its own depth and channels (BGR order for colour).
    ``what`` names the file in errors ("mask", ...)."""
    import cv2

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode {what} {path!r} (not an image file or corrupt)")
    return image


def read_rgb(path: str):
    """An image file as uint8 RGB (8- or 16-bit, gray, colour or with alpha; see images.to_rgb8)."""
    from lens_ros.images import to_rgb8

    image = read_image(path)
    return to_rgb8(image, bgr=image.ndim == 3 and image.shape[2] in (3, 4))


def read_mask(path: str, image_shape):
    """A mask file as bool (H, W): non-zero pixels are the object. Single-channel (mono8 or
    16-bit), or colour with equal channels (a gray image saved as RGB); it must have the image's
    size, since it is drawn over it and its pixels meet the depth's."""
    import numpy as np

    mask = read_image(path, "mask")
    if mask.ndim == 3:
        channels = mask[:, :, :3]
        if not (channels == channels[:, :, :1]).all():
            raise ValueError(f"mask {path!r} is a colour image; it must be single-channel "
                             "(mono8: non-zero = object)")
        mask = channels[:, :, 0]
    height, width = image_shape[:2]
    if mask.shape != (height, width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}; "
                         "the mask must be aligned to the image")
    return np.ascontiguousarray(mask != 0)


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


def parse_box(text: str) -> tuple:
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box must be x1,y1,x2,y2 (four numbers, image pixels), got {text!r}") from None
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"--box must have x1 < x2 and y1 < y2, got {text!r}")
    return x1, y1, x2, y2


def add_grasp_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that computes grasps: depth, intrinsics, approach."""
    parser.add_argument("--depth", default=None, help="depth aligned to the image: 16-bit PNG (mm) or .npy (m)")
    parser.add_argument("--intrinsics", default=None, help="fx,fy,cx,cy of the image (pixels), for 3-D grasps")
    parser.add_argument("--grasp-approach", choices=("top_down", "camera"), default="top_down",
                        help="3-D grasps approach against the table normal (default) or along the camera ray")


def read_depth_and_intrinsics(args) -> tuple:
    """(depth, intrinsics) from ``add_grasp_arguments``' options, both None without depth."""
    depth = read_depth(args.depth) if args.depth else None
    intrinsics = parse_intrinsics(args.intrinsics) if args.intrinsics else None
    if (depth is None) != (intrinsics is None):
        raise ValueError("--depth and --intrinsics go together (3-D grasps need both)")
    return depth, intrinsics


def to_json(data) -> str:
    """Indented JSON; numpy scalars and arrays (e.g. in grasps) as plain numbers and lists."""
    return json.dumps(data, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n"


def write_rgb(path: Path, rgb) -> None:
    import cv2

    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_outputs(out_dir: Path, rgb, result) -> None:
    """mask.png (mono8 255/0, source size), overlay.png and result.json."""
    import cv2

    from lens_ros.visualize import draw_overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_dir / "mask.png"), result.mask.astype("uint8") * 255)
    write_rgb(out_dir / "overlay.png", draw_overlay(rgb, result))
    (out_dir / "result.json").write_text(to_json(result.to_dict()))


def mask_and_grasps(mask, grasps) -> str:
    """The summary lines' common part: "mask=48210px grasps=3"."""
    return f"mask={int(mask.sum())}px grasps={len(grasps)}"


def summary_line(result, out_dir: Path) -> str:
    t = result.timings
    if result.found:
        box = "[" + ", ".join(f"{v:.0f}" for v in result.box) + "]"
        what = f"found box={box} score={result.score:.2f} {mask_and_grasps(result.mask, result.grasps)}"
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
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="what runs the stages (default torch; see README, Acceleration)")
    parser.add_argument("--stage-backends", default="",
                        help="per-stage overrides of --backend, e.g. 'mask_pass=torch' (stages: sam_image_encoder, "
                             "vision_tower, mask_pass, sam_mask_decoder)")
    parser.add_argument("--export-dir", default="", help="the onnxruntime/tensorrt backends' graphs and engines (default ~/.cache/lens_ros/onnx)")
    parser.add_argument("--compile", action="store_true",
                        help="compiled decode loop (static KV cache + torch.compile): same tokens, faster after the first")
    parser.add_argument("--offline", action="store_true", help="never download; use the local Hugging Face cache only")
    parser.add_argument("--out", default="lens_segment_out", help="output directory (default ./lens_segment_out)")
    add_grasp_arguments(parser)
    parser.add_argument("--no-grasps", action="store_true", help="do not compute grasp regions")
    args = parser.parse_args(argv)

    from lens_ros.images import InvalidInputError, check_command
    from lens_ros.model.checkpoint import DEFAULT_MODEL, CheckpointError, ModelUnavailableError
    from lens_ros.pipeline import LensPipeline, PipelineConfig

    try:
        rgb = read_rgb(args.image)
        command = check_command(args.command)
        depth, intrinsics = read_depth_and_intrinsics(args)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    options = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    try:
        config = PipelineConfig(model=args.model or DEFAULT_MODEL, device=args.device, dtype=dtype,
                                allow_download=not args.offline, cot=args.cot, backend=args.backend,
                                stage_backends=args.stage_backends, export_dir=args.export_dir, compile=args.compile,
                                **options)
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


def grasps_on_mask(rgb, mask, box=None, depth=None, intrinsics=None, approach: str = "top_down",
                   label: str = "") -> tuple:
    """lens-grasp's work, for anyone with an image and a mask (the README figure too): grasp
    regions of the mask (of its part most inside ``box`` when given) and the overlay drawing them,
    labelled. Returns (grasps, overlay RGB, GraspConfig used, milliseconds the grasps took).
    Raises ValueError for an empty mask or depth not aligned to it."""
    from lens_ros.grasp import GraspConfig, grasp_regions
    from lens_ros.visualize import draw_regions

    config = GraspConfig(approach=approach, component="box" if box else "largest")
    start = time.perf_counter()
    grasps = grasp_regions(mask, depth=depth, intrinsics=intrinsics, config=config, box=box)
    grasp_ms = (time.perf_counter() - start) * 1000
    overlay = draw_regions(rgb, mask, box=box, grasps=grasps, caption=label, labels=True, intrinsics=intrinsics)
    return grasps, overlay, config, grasp_ms


def grasp_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lens-grasp", description="Grasp regions of the object in a given mask (no model): "
        "overlay.png and grasps.json, 3-D with depth and intrinsics.")
    parser.add_argument("--image", required=True, help="image file the mask belongs to (drawn under the grasps)")
    parser.add_argument("--mask", required=True, help="mask image of the image's size: non-zero = object (mono8 PNG)")
    parser.add_argument("--box", default=None, help="x1,y1,x2,y2: grasp the mask part most inside this box "
                        "(default: the largest part)")
    parser.add_argument("--label", default="", help="caption written on the overlay, e.g. the object's name")
    parser.add_argument("--out", default="lens_grasp_out", help="output directory (default ./lens_grasp_out)")
    add_grasp_arguments(parser)
    args = parser.parse_args(argv)
    try:
        rgb = read_rgb(args.image)
        mask = read_mask(args.mask, rgb.shape)
        box = parse_box(args.box) if args.box else None
        depth, intrinsics = read_depth_and_intrinsics(args)
        grasps, overlay, config, grasp_ms = grasps_on_mask(rgb, mask, box, depth, intrinsics, args.grasp_approach,
                                                           args.label)
    except (OSError, ValueError) as exc:  # files, formats, an empty mask, depth not aligned
        return _fail(str(exc))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rgb(out_dir / "overlay.png", overlay)
    (out_dir / "grasps.json").write_text(to_json(grasp_record(args, mask, box, intrinsics, config, grasps, grasp_ms)))
    print(grasp_summary_line(mask, grasps, grasp_ms, out_dir))
    return 0


def grasp_record(args, mask, box, intrinsics, config, grasps, grasp_ms: float) -> dict:
    """grasps.json: the inputs, the settings and the grasps (best first, each as in
    lens-segment's result.json)."""
    return {"image": args.image, "mask": args.mask, "label": args.label, "image_size": list(mask.shape),
            "mask_pixels": int(mask.sum()), "box": list(box) if box else None, "depth": args.depth,
            "intrinsics": [intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy] if intrinsics else None,
            "grasp_config": dataclasses.asdict(config), "grasp_ms": grasp_ms,
            "grasps": [dataclasses.asdict(g) for g in grasps]}


def grasp_summary_line(mask, grasps, grasp_ms: float, out_dir: Path) -> str:
    from lens_ros.visualize import describe_grasp

    if not grasps:
        best = "no grasp"
    else:
        best = f"({'3-D' if grasps[0].has_3d else '2-D'}) best: {describe_grasp(grasps[0])}"
    return f"{mask_and_grasps(mask, grasps)} {best} grasp={grasp_ms:.1f}ms -> {out_dir}"


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
