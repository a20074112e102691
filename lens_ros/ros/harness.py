"""Run lens_node in its own process and talk to it over real DDS (used by make demo, benchmarks, tests)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
_PEERS = itertools.count()


class NodeProcess:
    """``lens-node --ros-args ...`` as a child process; stopped with SIGINT like ``ros2 run``."""

    def __init__(self, params: dict, name: str = "lens_node", namespace: str = "/",
                 log_dir: Path | None = None) -> None:
        args = [str(BIN / "lens-node"), "--ros-args", "-r", f"__node:={name}", "-r", f"__ns:={namespace}"]
        for key, value in params.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args += ["-p", f"{key}:={text}"]
        self.log_path = (log_dir or Path(os.environ.get("ROS_LOG_DIR", "/tmp"))) / f"{name}{namespace.replace('/', '_')}-{time.time_ns()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Peer:
    """A test node in its own context, spun in a background thread, that records what it receives."""

    def __init__(self, namespace: str = "") -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"lens_test_peer_{next(_PEERS)}", namespace=namespace or None, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received: dict[str, list] = {}
        self.cond = threading.Condition()
        self._spin_lock = threading.Lock()  # held by each spin: see action_client
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._running = True
        self._thread.start()

    def _spin(self) -> None:
        while self._running and self.context.ok():
            with self._spin_lock:
                self.executor.spin_once(timeout_sec=0.02)

    @contextlib.contextmanager
    def paused(self):
        """No spin while inside: make action clients here. rclpy adds an ActionClient to its node
        before the constructor has finished, and an executor spinning meanwhile in another thread
        then fails on it ("'ActionClient' object has no attribute '_lock'") and stops for good."""
        with self._spin_lock:
            yield

    def action_client(self, action_type, name: str, **kwargs):
        """An ActionClient of this peer's node, made between two spins (see ``paused``)."""
        from rclpy.action import ActionClient

        with self.paused():
            return ActionClient(self.node, action_type, name, **kwargs)

    def subscribe(self, msg_type, topic: str, qos=10) -> list:
        messages = self.received.setdefault(topic, [])

        def store(msg):
            with self.cond:
                messages.append(msg)
                self.cond.notify_all()

        self.node.create_subscription(msg_type, topic, store, qos)
        return messages

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return bool(predicate())
                self.cond.wait(min(left, 0.1))
        return True

    def wait_matched(self, publisher, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while publisher.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nobody subscribed to {publisher.topic_name} within {timeout} s")
            time.sleep(0.05)

    def now(self):
        return self.node.get_clock().now()

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self.executor.shutdown()
        self.node.destroy_node()
        import rclpy

        rclpy.shutdown(context=self.context)


def image_msg(rgb: np.ndarray, stamp, encoding: str = "rgb8", frame_id: str = "camera_optical"):
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = rgb.shape[:2]
    msg.encoding = encoding
    msg.step = rgb.shape[1] * (rgb.shape[2] if rgb.ndim == 3 else 1) * rgb.dtype.itemsize
    msg.data = rgb.tobytes()
    return msg


def diagnostics_watch(peer: Peer, node_name: str):
    """Subscribe to /diagnostics; returns a function giving the newest key/values of ``node_name``
    (its fully qualified name), or None before the node has reported."""
    from diagnostic_msgs.msg import DiagnosticArray

    statuses = peer.received.get("/diagnostics") or peer.subscribe(DiagnosticArray, "/diagnostics")

    def latest():
        for array in reversed(statuses):
            for status in array.status:
                if status.name.startswith(node_name + ":"):
                    return {kv.key: kv.value for kv in status.values}
        return None

    return latest
