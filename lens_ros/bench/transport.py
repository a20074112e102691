"""Large camera images on one host: what lens_node receives of a 10 Hz stream, per transport setting.

    python -m lens_ros.bench.transport [--width 1280 --height 720 --rate 10 --seconds 20 --model tiny]
                                       [--configs defaults,reliable,profile,both] [--runs 1]

Issue 11: a best-effort 1280x720 rgb8 stream (2.76 MB a frame) crossed between processes with
gaps over a second, and commands were refused with `the newest image is 1.4-2.5 s old`. Each
configuration runs in a fresh process (Fast DDS reads its XML profile once per process): lens_node
in its own process (NodeProcess), a camera-like publisher in that one, and a separate best-effort
listener process that records when each frame arrives. Reported: frames published; frames the
node received (its diagnostics' frames_received) and its longest stretch without a new frame
(diagnostics every 0.1 s); the same for the listener (by frame stamp); for a command sent every
2 s, the age of the frame that answered it (command time minus the Segmentation's header stamp)
or the error it got; the node's CPU time meanwhile (the model runs too).

Configurations:
  defaults     image_qos sensor_data, publisher qos_profile_sensor_data (best effort), no XML profile
  reliable     image_qos reliable, publisher reliable (depth 10), no XML profile
  profile      as defaults, config/fastdds_large_images.xml in every process (FASTDDS_DEFAULT_PROFILES_FILE)
  both         as reliable, with the profile
  camera_only  as profile, but only the camera's process loads it (run with --configs)
  node_only    as profile, but only the node's process loads it (run with --configs)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROFILE_NAME = "fastdds_large_images.xml"
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"  # Fast DDS 3.x (FASTRTPS_DEFAULT_PROFILES_FILE: 2.x, deprecated in 3.x)
NAMESPACE = "/lens_transport"
COMMAND_PERIOD_S = 2.0


@dataclass(frozen=True)
class Config:
    image_qos: str  # the node's image_qos parameter
    reliable_publisher: bool
    profile: str = ""  # where the Fast DDS XML profile is loaded: "" nowhere, "all", "camera", "node"


CONFIGS = {
    "defaults": Config("sensor_data", False),
    "reliable": Config("reliable", True),
    "profile": Config("sensor_data", False, "all"),
    "both": Config("reliable", True, "all"),
    # Not run unless asked for: which process needs the profile.
    "camera_only": Config("sensor_data", False, "camera"),
    "node_only": Config("sensor_data", False, "node"),
}
DEFAULT_CONFIGS = ("defaults", "reliable", "profile", "both")


def default_profile() -> Path:
    """config/fastdds_large_images.xml of this checkout, else of the installed ROS package."""
    here = Path(__file__).resolve().parents[2] / "config" / PROFILE_NAME
    if here.is_file():
        return here
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("lens_ros")) / "config" / PROFILE_NAME


def listen(topic: str) -> int:
    """Child process: a best-effort subscriber (like any camera consumer) that records, until its
    stdin closes, each frame's header stamp and arrival time (both system time, seconds); prints JSON."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from lens_ros.ros.conversions import stamp_to_seconds

    context = Context()
    rclpy.init(context=context, signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    node = rclpy.create_node("lens_transport_listener", context=context)
    frames: list[tuple[float, float]] = []
    node.create_subscription(Image, topic, lambda m: frames.append((stamp_to_seconds(m.header.stamp), time.time())),
                             qos_profile_sensor_data)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.is_set():
        executor.spin_once(timeout_sec=0.05)
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)
    print(json.dumps({"frames": frames}))
    return 0


def camera(topic: str, width: int, height: int, rate: float) -> int:
    """Child process: a camera driver stand-in (qos_profile_sensor_data, like camera drivers).
    Prints 'ready' once a subscriber has matched, then, for each number N read from stdin,
    publishes N rgb8 frames at ``rate`` and prints 'sent N'; exits at the end of stdin."""
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from lens_ros.ros.harness import Peer, image_msg

    peer = Peer()
    try:
        publisher = peer.node.create_publisher(Image, topic, qos_profile_sensor_data)
        peer.wait_matched(publisher, timeout=60)
        rgb = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
        msg = image_msg(rgb, peer.now().to_msg())
        print("ready", flush=True)
        for line in sys.stdin:
            count = int(line)
            start = time.monotonic()
            for i in range(count):
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
                msg.header.stamp = peer.now().to_msg()
                publisher.publish(msg)
            print(f"sent {count}", flush=True)
    finally:
        peer.close()
    return 0


def longest_gap_s(times: list[float], start: float, end: float) -> float:
    """Longest stretch of the stream [start, end] (system time, s) without one of ``times``."""
    points = [start, *sorted(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in zip(points, points[1:]))


def _profile_env(profile: str | None, load: bool) -> None:
    """Name the profile in this process's environment (for what it starts next), or not."""
    os.environ.pop(PROFILE_ENV, None)
    if profile and load:
        os.environ[PROFILE_ENV] = profile


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _node_arrivals(arrays: list, node_name: str) -> list[float]:
    """When the node's frames_received went up, by the stamps of its /diagnostics (every 0.1 s)."""
    from lens_ros.ros.conversions import stamp_to_seconds

    times, last = [], 0
    for array in arrays:
        for status in array.status:
            if status.name.startswith(node_name + ":"):
                count = int({kv.key: kv.value for kv in status.values}.get("frames_received", 0))
                if count > last:
                    times.append(stamp_to_seconds(array.header.stamp))
                last = max(last, count)
    return times


def run_one(cfg: Config, width: int, height: int, rate: float, seconds: float, model: str) -> dict:
    """One configuration, in this process (which must not have created a DDS participant yet: Fast DDS
    reads the profile named by FASTDDS_DEFAULT_PROFILES_FILE at the first one)."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from lens_ros.msg import Segmentation
    from lens_ros.ros.conversions import stamp_to_seconds
    from lens_ros.ros.harness import NodeProcess, Peer, diagnostics_watch, image_msg

    deep = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    image_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE) if cfg.reliable_publisher \
        else qos_profile_sensor_data
    profile = os.environ.get(PROFILE_ENV)
    _profile_env(profile, cfg.profile in ("all", "camera"))
    peer = Peer()  # the camera: this process
    _profile_env(profile, cfg.profile in ("all", "node"))
    node = NodeProcess({"model": model, "device": "cpu", "max_new_tokens": 8, "image_qos": cfg.image_qos,
                        "diagnostics_period_s": 0.1}, namespace=NAMESPACE)
    _profile_env(profile, cfg.profile == "all")
    listener = subprocess.Popen([sys.executable, "-m", "lens_ros.bench.transport", "--listen", f"{NAMESPACE}/image"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    node_name = f"{NAMESPACE}/lens_node"
    try:
        image_pub = peer.node.create_publisher(Image, f"{NAMESPACE}/image", image_qos)
        command_pub = peer.node.create_publisher(String, f"{NAMESPACE}/command", deep)
        answers = peer.subscribe(Segmentation, f"{NAMESPACE}/segmentation", deep)
        state = diagnostics_watch(peer, node_name)
        if not peer.wait_for(lambda: (state() or {}).get("state") == "active", 600):
            raise RuntimeError(f"the node did not become active:\n{node.output()[-3000:]}")
        deadline = time.monotonic() + 60
        while image_pub.get_subscription_count() < 2 or command_pub.get_subscription_count() < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the node and the listener did not both subscribe to the image within 60 s")
            time.sleep(0.05)
        rng = np.random.default_rng(0)
        messages = [image_msg((rng.random((height, width, 3)) * 255).astype(np.uint8), peer.now().to_msg())
                    for _ in range(4)]
        count, every = int(round(seconds * rate)), max(1, int(round(COMMAND_PERIOD_S * rate)))
        sent: dict[str, float] = {}  # command text -> system time it was published
        cpu_before = _cpu_s(node.proc.pid)
        start = time.monotonic()
        first = last = 0.0
        for i in range(count):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            msg = messages[i % len(messages)]
            msg.header.stamp = peer.now().to_msg()
            image_pub.publish(msg)
            last = stamp_to_seconds(msg.header.stamp)
            first = first or last
            if i % every == every // 2:  # the first one 1 s in, then every 2 s
                text = f"the cup {len(sent)}"
                sent[text] = time.time()
                command_pub.publish(String(data=text))
        peer.wait_for(lambda: len(answers) >= len(sent), 60)
        time.sleep(1.0)  # the node's diagnostics catch up with the last frames
        node_cpu = _cpu_s(node.proc.pid) - cpu_before
        received = int((state() or {}).get("frames_received", -1))
        arrivals = _node_arrivals(list(peer.received["/diagnostics"]), node_name)
    finally:
        peer.close()
        listener.stdin.close()
        heard = json.loads(listener.stdout.read() or '{"frames": []}')["frames"]
        listener.wait()
        node.stop()
    ages, errors = [], []
    for answer in list(answers):
        if answer.error:
            errors.append(answer.error)
        elif answer.command in sent:
            ages.append(sent[answer.command] - stamp_to_seconds(answer.header.stamp))
    log = node.output()
    return {"published": count, "node_received": received, "node_gap_s": longest_gap_s(arrivals, first, last),
            "listener_received": len(heard), "listener_gap_s": longest_gap_s([s for s, _ in heard], first, last),
            "node_cpu_s": node_cpu, "commands": len(sent), "answers": len(answers), "ages_s": ages,
            "errors": errors, "fastdds_errors": [line for line in log.splitlines()
                                                 if "error" in line.lower() and ("xml" in line.lower() or "rtps" in line.lower())]}


def run_in_child(name: str, profile: Path, args) -> dict:
    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    env[PROFILE_ENV] = str(profile)  # the child places it in the processes its configuration names
    command = [sys.executable, "-m", "lens_ros.bench.transport", "--run", name, "--width", str(args.width),
               "--height", str(args.height), "--rate", str(args.rate), "--seconds", str(args.seconds),
               "--model", args.model]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _error_kinds(errors: list[str]) -> str:
    """'3x the newest image is N s old; 1x no image received ...' (numbers replaced by N)."""
    kinds = collections.Counter(re.sub(r"\d+(\.\d+)?", "N", e.split(" (")[0]) for e in errors)
    return "; ".join(f"{n}x {kind}" for kind, n in kinds.most_common()) or "-"


def print_table(rows: list[tuple[str, dict]], width: int, height: int, rate: float, seconds: float) -> None:
    print(f"\n{width}x{height} rgb8 ({width * height * 3 / 1e6:.2f} MB a frame) at {rate:g} Hz for {seconds:g} s, "
          f"a command every {COMMAND_PERIOD_S:g} s; ROS_AUTOMATIC_DISCOVERY_RANGE="
          f"{os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')}")
    print("  node: lens_node's frames_received, and the longest stretch with no new frame (0.1 s resolution);")
    print("  listener: a separate best-effort subscriber; age: command time - stamp of the frame that answered it")
    print(f"  {'configuration':<13}{'published':>10}{'node':>6}{'gap s':>7}{'listener':>10}{'gap s':>7}"
          f"{'answered':>10}{'max age s':>10}{'node CPU s':>11}  errors")
    for name, r in rows:
        answered = f"{len(r['ages_s'])}/{r['commands']}"
        age = f"{max(r['ages_s']):.2f}" if r["ages_s"] else "-"
        print(f"  {name:<13}{r['published']:>10}{r['node_received']:>6}{r['node_gap_s']:>7.1f}"
              f"{r['listener_received']:>10}{r['listener_gap_s']:>7.1f}{answered:>10}{age:>10}{r['node_cpu_s']:>11.1f}"
              f"  {_error_kinds(r['errors'])}")
        for line in r["fastdds_errors"][:3]:
            print(f"      node log: {line.strip()[:150]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    parser.add_argument("--runs", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--profile", type=Path, default=None, help=f"the XML profile (default: config/{PROFILE_NAME})")
    parser.add_argument("--run", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    parser.add_argument("--listen", metavar="TOPIC", help=argparse.SUPPRESS)  # internal: the listener process
    parser.add_argument("--camera", metavar="TOPIC", help=argparse.SUPPRESS)  # internal: a camera (test_transport)
    args = parser.parse_args(argv)
    if args.listen:
        return listen(args.listen)
    if args.camera:
        return camera(args.camera, args.width, args.height, args.rate)
    if args.run:
        result = run_one(CONFIGS[args.run], args.width, args.height, args.rate, args.seconds, args.model)
        print(json.dumps(result))
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    profile = (args.profile or default_profile()).resolve()
    print(f"profile: {profile}")
    rows = []
    for _ in range(args.runs):
        for name in names:
            rows.append((name, run_in_child(name, profile, args)))
            r = rows[-1][1]
            print(f"  {name}: node {r['node_received']}/{r['published']}, listener {r['listener_received']}, "
                  f"answered {len(r['ages_s'])}/{r['commands']}", flush=True)
    print_table(rows, args.width, args.height, args.rate, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
