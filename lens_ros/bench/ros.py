"""ROS overhead of lens_node: per-frame conversions and publishing, and command latency through
the node against calling LensPipeline directly (tiny model by default).

    python -m lens_ros.bench.ros [--runs 20] [--model tiny]

Goals (issue 3): under 2 ms of ROS work per 640x480 frame; under 5 % added to command latency.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from lens_ros.bench import median_ms


def frame_overhead(runs: int) -> None:
    import rclpy
    from rclpy.context import Context
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from lens_ros.ros.conversions import array_to_image, color_image_to_rgb, mask_to_image

    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("lens_bench_frames", context=context)
    publisher = node.create_publisher(Image, "bench_image", qos_profile_sensor_data)
    print("per-frame ROS work (median ms)")
    print(f"  {'size':<10}{'msg->array':>12}{'array->msg':>12}{'mask->msg':>11}{'publish':>10}{'total':>9}")
    for width, height in ((640, 480), (1280, 720)):
        rgb = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
        msg = array_to_image(rgb, "bgr8")
        mask = np.zeros((height, width), bool)
        to_array = median_ms(lambda: color_image_to_rgb(msg), runs)
        to_msg = median_ms(lambda: array_to_image(rgb, "rgb8"), runs)
        mask_msg = median_ms(lambda: mask_to_image(mask), runs)
        publish = median_ms(lambda: publisher.publish(msg), runs)
        total = to_array + to_msg + mask_msg + publish
        print(f"  {f'{width}x{height}':<10}{to_array:>12.2f}{to_msg:>12.2f}{mask_msg:>11.2f}{publish:>10.2f}{total:>9.2f}")
    node.destroy_node()
    rclpy.shutdown(context=context)


def command_latency(model: str, runs: int, max_new_tokens: int) -> None:
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from lens_ros.msg import Segmentation
    from lens_ros.pipeline import LensPipeline, PipelineConfig
    from lens_ros.ros.harness import NodeProcess, Peer, diagnostics_watch, image_msg

    rgb = (np.random.default_rng(1).random((480, 640, 3)) * 255).astype(np.uint8)
    pipeline = LensPipeline.from_config(PipelineConfig(model=model, max_new_tokens=max_new_tokens))
    pipeline.segment(rgb, "warm up")
    direct = [pipeline.segment(np.roll(rgb, i + 1, axis=1), "the cup").timings.total_ms for i in range(runs)]
    del pipeline

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    namespace = "/lens_bench"
    node = NodeProcess({"model": model, "device": "cpu", "max_new_tokens": max_new_tokens}, namespace=namespace)
    peer = Peer()
    try:
        image_pub = peer.node.create_publisher(Image, f"{namespace}/image", qos_profile_sensor_data)
        command_pub = peer.node.create_publisher(String, f"{namespace}/command", 10)
        answers = peer.subscribe(Segmentation, f"{namespace}/segmentation")
        state = diagnostics_watch(peer, f"{namespace}/lens_node")
        if not peer.wait_for(lambda: (state() or {}).get("state") == "active", 600):
            raise RuntimeError(node.output()[-2000:])
        peer.wait_matched(command_pub)
        peer.wait_matched(image_pub)
        through_node, in_node = [], []
        for i in range(runs + 1):
            for _ in range(3):  # best effort: make sure a fresh frame is there
                image_pub.publish(image_msg(np.roll(rgb, i + 1, axis=1), peer.now().to_msg()))
                time.sleep(0.02)
            count = len(answers)
            start = time.perf_counter()
            command_pub.publish(String(data="the cup"))
            peer.wait_for(lambda: len(answers) > count, 120)
            if i:  # the first one warms up
                through_node.append((time.perf_counter() - start) * 1000)
                in_node.append(answers[count].latency_total_ms)
    finally:
        peer.close()
        node.stop()
    d, n, m = statistics.median(direct), statistics.median(through_node), statistics.median(in_node)
    print(f"\ncommand -> result, 640x480, {model} model, max_new_tokens {max_new_tokens} (median of {runs})")
    print(f"  LensPipeline.segment directly:      {d:8.1f} ms")
    print(f"  pipeline time inside the node:      {m:8.1f} ms")
    print(f"  command topic -> Segmentation:      {n:8.1f} ms  (ROS adds {n - m:.1f} ms, "
          f"{100 * (n - m) / m:.1f} % of the pipeline time)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    frame_overhead(max(args.runs, 50))
    command_latency(args.model, args.runs, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
