"""``make demo``: the whole ROS path on a real photo.

Starts ``lens-node``, publishes the shipped photo as a 10 Hz camera stream with camera_info,
sends a language goal on ``command``, waits for the ``Segmentation``, writes ``overlay.png``,
``mask.png`` and ``result.json``, prints the latency and stops everything. Then it tracks the
cup through a clip panned across the photo (``lens-track`` from the hand-traced cup mask, SAM2's
memory carrying it: ``track/overlay.gif``, ``track/summary.json``).

    python -m lens_ros.demo [--model M] [--command TEXT] [--image PATH] [--device D] [--out DIR]

Without ``--model`` (``MODEL=...`` in make) it uses ``OuyBin/LENS`` when it can be loaded (the local
Hugging Face cache, or a download unless ``HF_HUB_OFFLINE=1``); otherwise it says why and runs
the tiny random model, whose masks are meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PHOTO = Path(__file__).resolve().parent / "data" / "coffee.jpg"
DEFAULT_COMMAND = "the coffee cup"
NAMESPACE = "/lens_demo"


def choose_model(model: str | None, offline: bool) -> str:
    from lens_ros.model.checkpoint import DEFAULT_MODEL, TINY_MODEL, ModelUnavailableError, resolve_model_source

    if model:
        return model
    try:
        resolve_model_source(DEFAULT_MODEL, allow_download=not offline)
        return DEFAULT_MODEL
    except ModelUnavailableError as exc:
        print(f"LENS weights unavailable: {exc}")
        print("Running the TINY RANDOM model instead: the pipeline is real, its masks and boxes are meaningless.")
        resolve_model_source(TINY_MODEL)  # build the cached tiny checkpoint here, not inside the node
        return TINY_MODEL


def segmentation_to_dict(msg) -> dict:
    return {
        "request_id": msg.request_id, "command": msg.command, "reasoning": msg.reasoning, "found": msg.found,
        "box": [float(v) for v in msg.box] if msg.found else None, "score": msg.score,
        "stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec},
        "frame_id": msg.header.frame_id, "mask_size": [msg.mask.height, msg.mask.width],
        "grasps": len(msg.grasps), "generated_tokens": msg.generated_tokens, "model": msg.model, "error": msg.error,
        "latency_ms": {name[len("latency_"):]: getattr(msg, name)
                       for name in msg.get_fields_and_field_types() if name.startswith("latency_")},
    }


def camera_info_for(width: int, height: int, header):
    """A plausible pinhole camera_info for the photo (about 60 degrees horizontal field of view)."""
    from sensor_msgs.msg import CameraInfo

    f = width / (2 * 0.577)
    info = CameraInfo(header=header, width=width, height=height, distortion_model="plumb_bob")
    info.k = [f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, width / 2, 0.0, 0.0, f, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.d = [0.0] * 5
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL") or None)
    parser.add_argument("--command", default=DEFAULT_COMMAND)
    parser.add_argument("--image", default=str(PHOTO))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the model and the answer")
    args = parser.parse_args(argv)

    import cv2

    from lens_ros.cli import read_image
    from lens_ros.images import to_rgb8

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    image = read_image(args.image)
    rgb = to_rgb8(image, bgr=image.ndim == 3)
    model = choose_model(args.model, offline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_LOG_DIR", str((out / "ros_log").resolve()))
    print(f"model {model}; image {args.image} ({rgb.shape[1]}x{rgb.shape[0]}); command {args.command!r}")
    code = run_demo(model, args, rgb, out, cv2)
    if code or args.image != str(PHOTO):  # the cup's traced mask belongs to the shipped photo
        return code
    return track_demo(model, args, rgb, out / "track", cv2, offline)


CLIP_FRAMES, CLIP_STEP = 24, 8  # the clip: a 400x300 window panning right 8 px a frame


def track_demo(model: str, args, rgb, out: Path, cv2, offline: bool) -> int:
    """lens-track on a clip panned across the photo, started from the cup's hand-traced mask."""
    from lens_ros.figures import CUP_MASK
    from lens_ros.tracking import cli as track_cli

    frames = out / "clip"
    frames.mkdir(parents=True, exist_ok=True)
    height, width = 300, 400
    y = (rgb.shape[0] - height) // 2
    for index in range(CLIP_FRAMES):
        x = min(index * CLIP_STEP, rgb.shape[1] - width)
        cv2.imwrite(str(frames / f"{index:05d}.png"), cv2.cvtColor(rgb[y:y + height, x:x + width], cv2.COLOR_RGB2BGR))
    cup = cv2.imread(str(CUP_MASK), cv2.IMREAD_GRAYSCALE)[y:y + height, :width]
    cv2.imwrite(str(out / "first_mask.png"), cup)
    tracker = "tiny" if model == "tiny" else "facebook/sam2-hiera-large"
    print(f"tracking {args.command!r} through {CLIP_FRAMES} frames panned across the photo (tracker {tracker}) ...")
    argv = ["--frames", str(frames), "--command", args.command, "--model", model, "--mask", str(out / "first_mask.png"),
            "--out", str(out), "--device", "cpu" if args.device == "auto" else args.device]
    code = track_cli.main([*argv, "--tracker-model", tracker] + (["--offline"] if offline else []))
    if code and tracker != "tiny":
        print("SAM2 Hiera-L is unavailable: tracking with the TINY RANDOM tracker instead (its masks are meaningless)")
        code = track_cli.main([*argv, "--tracker-model", "tiny"])
    return code


def run_demo(model: str, args, rgb, out: Path, cv2) -> int:
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import String

    from lens_ros.msg import Segmentation
    from lens_ros.ros.conversions import image_to_array
    from lens_ros.ros.harness import NodeProcess, Peer, diagnostics_watch, image_msg

    # A reliable stream: on one busy machine best-effort 700 KB frames get dropped (their UDP
    # fragments are), and the newest frame the node has can be too old to answer with.
    node = NodeProcess({"model": model, "device": args.device, "publish_overlay": True,
                        "allow_download": False, "image_qos": "reliable"}, namespace=NAMESPACE)
    stream_qos = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)
    print(f"started lens-node (log: {node.log_path})")
    peer = Peer()
    try:
        image_pub = peer.node.create_publisher(Image, f"{NAMESPACE}/image", stream_qos)
        info_pub = peer.node.create_publisher(CameraInfo, f"{NAMESPACE}/camera_info", stream_qos)
        command_pub = peer.node.create_publisher(String, f"{NAMESPACE}/command", 10)
        answers = peer.subscribe(Segmentation, f"{NAMESPACE}/segmentation")
        overlays = peer.subscribe(Image, f"{NAMESPACE}/overlay")
        state = diagnostics_watch(peer, f"{NAMESPACE}/lens_node")

        def publish_frame():
            frame = image_msg(rgb, peer.now().to_msg(), frame_id="camera_color_optical_frame")
            image_pub.publish(frame)
            info_pub.publish(camera_info_for(rgb.shape[1], rgb.shape[0], frame.header))

        camera = peer.node.create_timer(0.1, publish_frame)  # the camera stream, 10 Hz
        print("waiting for the node to load the model ...")
        if not peer.wait_for(lambda: (state() or {}).get("state") == "active" or not node.alive(), args.timeout) \
                or not node.alive():
            print(f"error: lens-node did not become active; its log:\n{node.output()[-3000:]}", file=sys.stderr)
            return 1
        # The stream reaches the node before the goal is sent (the first frames of a fresh DDS
        # connection can take seconds to arrive on a busy machine).
        peer.wait_for(lambda: int((state() or {}).get("frames_received", 0)) > 0, args.timeout)
        peer.wait_matched(command_pub)
        sent = time.monotonic()
        command_pub.publish(String(data=args.command))
        if not peer.wait_for(lambda: len(answers) > 0, args.timeout):
            print("error: no Segmentation within the timeout", file=sys.stderr)
            return 1
        round_trip_ms = (time.monotonic() - sent) * 1000
        answer = answers[0]
        peer.wait_for(lambda: any(o.header.stamp == answer.header.stamp for o in overlays), 10)
        camera.cancel()
        overlay = next((o for o in overlays if o.header.stamp == answer.header.stamp), None)
        if overlay is not None:
            cv2.imwrite(str(out / "overlay.png"), cv2.cvtColor(image_to_array(overlay), cv2.COLOR_RGB2BGR))
        if answer.mask.width:
            cv2.imwrite(str(out / "mask.png"), image_to_array(answer.mask))
        result = segmentation_to_dict(answer)
        result["round_trip_ms"] = round_trip_ms
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        what = f"error: {answer.error}" if answer.error else (
            f"found box=[{', '.join(f'{v:.0f}' for v in answer.box)}] score={answer.score:.2f}" if answer.found
            else "not found")
        print(f"Segmentation #{answer.request_id} for {answer.command!r}: {what}")
        print(f"latency: {round_trip_ms:.0f} ms command -> Segmentation "
              f"(model {answer.latency_total_ms:.0f} ms: reasoning {answer.latency_reasoning_ms:.0f} ms, "
              f"mask {answer.latency_mask_ms:.0f} ms)")
        print(f"outputs: {out / 'overlay.png'}, {out / 'mask.png'}, {out / 'result.json'}")
        if model == "tiny":
            print("(tiny random model: the result only shows the ROS path working end to end)")
        return 1 if answer.error else 0
    finally:
        peer.close()
        code = node.stop()
        print(f"lens-node stopped (exit {code})")


if __name__ == "__main__":
    sys.exit(main())
