"""Running the README's ROS commands with the real ROS 2 command-line tools (shared by the CLI tests)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROS2 = BIN / "ros2"
NO_ROS2 = ("the ROS 2 command-line tools are not in this venv (make venv installs them from "
           "../shared/wheels/ros2-cli when that folder exists)")
ROBOT_LAUNCH = ("ros2 launch lens_ros lens.launch.py namespace:=wrist image:=/camera/color/image_raw "
                "depth:=/camera/aligned_depth_to_color/image_raw camera_info:=/camera/color/camera_info "
                "model:=OuyBin/LENS device:=cuda")


def readme_ros2_lines() -> list[str]:
    """Every command in the README's bash blocks that starts with ros2 (or .venv/bin/ros2), with
    continuation lines joined and trailing comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            command = re.sub(r"\s+#(?![^'\"]*['\"]).*$", "", line).strip()  # a comment outside quotes
            if re.match(r"(\.venv/bin/)?ros2 ", command):
                lines.append(command)
    return lines


def run(command: str, env: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """A README line through bash (pipes included), with ros2 taken from this venv."""
    line = re.sub(r"^(\.venv/bin/)?ros2 ", f"{ROS2} ", command)
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def start(command: str, env: dict, log: Path) -> subprocess.Popen:
    line = re.sub(r"^(\.venv/bin/)?ros2 ", f"{ROS2} ", command)
    handle = open(log, "w")
    return subprocess.Popen(shlex.split(line), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """Stop a `ros2 launch` like Ctrl-C does (SIGINT to its process group)."""
    if process.poll() is None:
        os.killpg(process.pid, 2)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
    return process.returncode


class Camera:
    """A test node publishing a colour stream on the README's camera topic."""

    def __init__(self, topic: str = "/camera/color/image_raw") -> None:
        import threading

        import numpy as np
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from lens_ros.ros.harness import Peer, diagnostics_watch, image_msg

        self.peer = Peer()
        self.publisher = self.peer.node.create_publisher(Image, topic, qos_profile_sensor_data)
        self.state = diagnostics_watch(self.peer, "/wrist/lens_node")
        rgb = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
        self.running = True

        def stream():
            while self.running:
                self.publisher.publish(image_msg(rgb, self.peer.now().to_msg()))
                time.sleep(0.1)

        self.thread = threading.Thread(target=stream, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.peer.close()


def wait_active(camera: Camera, launch: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (camera.state() or {}).get("state") != "active":
        assert launch.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"lens_node never became active:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def wait_node_listed(env: dict, timeout: float = 60.0) -> None:
    """Start the ROS daemon and wait until it sees the node: the first `ros2` call after the daemon
    starts answers from a discovery of its own, and the verbs after it ("param set") ask the daemon,
    which may not have found the node yet ("Node not found")."""
    run("ros2 daemon start", env)
    deadline = time.monotonic() + timeout
    while "/wrist/lens_node" not in run("ros2 node list", env).stdout:
        assert time.monotonic() < deadline, "ros2 node list never showed /wrist/lens_node"
        time.sleep(0.5)
