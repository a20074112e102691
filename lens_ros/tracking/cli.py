"""``lens-track``: one language goal tracked through a video or a folder of frames, without a robot.

    lens-track --command "the red mug" --video clip.mp4 --out track_out/
    lens-track --model tiny --tracker-model tiny --frames frames/ --command "the box" --out track_out/

LENS answers the command on the first frame (and on later ones until it finds the object); SAM2's
memory then tracks the object on every frame (lens_ros.tracking.session: lost, re-acquired,
re-grounded). Writes ``masks/NNNNN.png`` (one mono mask per frame, 255 = object), ``tracks.jsonl``
(per frame: state, SAM2's object score, box, area, events), ``overlay.gif`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TRACK_ID = 1
GIF_WIDTH = 320  # the overlay GIF is small: it is for a quick look


def read_frames(video: str | None, frames: str | None, max_frames: int):
    """RGB uint8 frames of a video file or of a folder's images (sorted by name), lazily."""
    import cv2

    from lens_ros.images import to_rgb8

    if video:
        capture = cv2.VideoCapture(video)
        if not capture.isOpened():
            raise OSError(f"cannot open video {video!r}")
        count = 0
        while count < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            count += 1
            yield to_rgb8(bgr, bgr=True)
        capture.release()
        return
    folder = Path(frames)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise OSError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {frames!r}")
    from lens_ros.cli import read_image

    for path in files[:max_frames]:
        raw = read_image(str(path))
        yield to_rgb8(raw, bgr=raw.ndim == 3)


def overlay(rgb: np.ndarray, mask: np.ndarray, state: str) -> np.ndarray:
    import cv2

    shown = rgb.copy()
    shown[mask] = (0.5 * shown[mask] + (0, 127, 0)).astype(np.uint8)
    cv2.putText(shown, state, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 0), 2)
    scale = GIF_WIDTH / shown.shape[1]
    return cv2.resize(shown, (GIF_WIDTH, max(1, round(shown.shape[0] * scale))), interpolation=cv2.INTER_AREA)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-track", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video file (anything OpenCV reads)")
    source.add_argument("--frames", help="a folder of images, taken in name order")
    parser.add_argument("--command", required=True, help="the language goal")
    parser.add_argument("--model", default=None, help="LENS model (default OuyBin/LENS; 'tiny' for a random one)")
    parser.add_argument("--tracker-model", default="facebook/sam2-hiera-large",
                        help="SAM2 with memory: facebook/sam2-hiera-large (default), facebook/sam2.1-hiera-large, "
                             "a .pt/.safetensors file, or 'tiny'")
    parser.add_argument("--propagation-decoder", choices=("stock", "lens"), default="stock",
                        help="the mask decoder that propagates: the tracker model's (stock, default: trained for "
                             "tracking and presence) or LENS's (lens_ros.tracking.models.PROPAGATION_DECODERS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-frames", type=int, default=10_000)
    parser.add_argument("--lost-frames", type=int, default=15)
    parser.add_argument("--no-reacquire", action="store_true", help="keep a lost track lost")
    parser.add_argument("--reground-s", type=float, default=0.0, help="answer the command again every N s (0: off)")
    parser.add_argument("--mask", help="start the track from this mask of the first frame (a PNG, nonzero = the "
                                       "object) instead of LENS's answer; LENS still re-acquires a lost track")
    parser.add_argument("--offline", action="store_true", help="never download models")
    parser.add_argument("--out", default="lens_track_out")
    args = parser.parse_args(argv)

    import cv2
    from PIL import Image

    from lens_ros.model.checkpoint import (
        DEFAULT_MODEL,
        CheckpointError,
        ModelUnavailableError,
    )
    from lens_ros.pipeline import LensPipeline, PipelineConfig, SegmentationResult
    from lens_ros.tracking.models import (
        TrackerModelError,
        load_tracker_model,
        use_lens_mask_decoder,
    )
    from lens_ros.tracking.session import TrackingConfig, TrackingSession
    from lens_ros.tracking.tracker import StreamingTracker

    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    try:
        config = TrackingConfig(lost_frames=args.lost_frames, reacquire=not args.no_reacquire,
                                reground_s=args.reground_s)
        pipeline = LensPipeline.from_config(PipelineConfig(
            model=args.model or DEFAULT_MODEL, device=args.device, allow_download=not args.offline,
            max_new_tokens=args.max_new_tokens))
        tracker_model = load_tracker_model(args.tracker_model, device=args.device, allow_download=not args.offline)
        if args.propagation_decoder == "lens":
            use_lens_mask_decoder(tracker_model, pipeline.model.sam)
        tracker = StreamingTracker(tracker_model)
        session = TrackingSession(pipeline, tracker, config)
        frames = read_frames(args.video, args.frames, args.max_frames)
        given = None
        if args.mask:
            given = cv2.imread(args.mask, cv2.IMREAD_GRAYSCALE)
            if given is None:
                raise ValueError(f"--mask {args.mask}: not an image OpenCV can read")
        gif, rows, found_at = [], [], None
        with open(out / "tracks.jsonl", "w") as log:
            for index, rgb in enumerate(frames):
                if found_at is None:  # LENS looks for the object until it finds it
                    if given is not None and index == 0:
                        if given.shape != rgb.shape[:2]:
                            raise ValueError(f"--mask is {given.shape[1]}x{given.shape[0]}, the first frame "
                                             f"{rgb.shape[1]}x{rgb.shape[0]}")
                        result = SegmentationResult(command=args.command, image_size=rgb.shape[:2], found=True,
                                                    mask=given > 0, reasoning="(the given --mask)")
                    else:
                        result = None
                    result = session.start(TRACK_ID, args.command, rgb, result=result)
                    found_at = index if TRACK_ID in session.tracks else None
                    row = {"frame": index, "state": "tracking" if found_at is not None else "searching",
                           "reasoning": result.reasoning, "box": result.box if result.found else None}
                    mask = tracker.last_logits[TRACK_ID].cpu().numpy() > 0 if found_at is not None else \
                        np.zeros(rgb.shape[:2], bool)
                else:
                    (update,) = session.update(rgb)
                    mask = update.mask
                    row = {"frame": index, "state": update.state, "score": update.score, "box": update.box,
                           "area": update.area, "events": [{"kind": e.kind, "iou": e.iou} for e in update.events]}
                cv2.imwrite(str(out / "masks" / f"{index:05d}.png"), mask.astype(np.uint8) * 255)
                log.write(json.dumps(row) + "\n")
                rows.append(row)
                gif.append(Image.fromarray(overlay(rgb, mask, row["state"])))
    except (OSError, ValueError, ModelUnavailableError, CheckpointError, TrackerModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if gif:
        gif[0].save(out / "overlay.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    states = [row["state"] for row in rows]
    summary = {"command": args.command, "frames": len(rows), "found_at_frame": found_at,
               "states": {state: states.count(state) for state in dict.fromkeys(states)},
               "lens_calls_after_start": session.lens_calls, "model": pipeline.model_name,
               "tracker_model": args.tracker_model}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows)} frames; object found on frame {found_at}; states {summary['states']}; wrote {out}/")
    if args.model == "tiny" or args.tracker_model == "tiny":
        print("(tiny random models: the pipeline is real, its masks are meaningless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
