"""The node's sensor inputs, shared by executor callbacks and the worker thread.

Callbacks add colour frames, depth images and camera_info at camera rate on executor threads
while the worker waits for a frame and looks up the depth and camera_info that match it. Every
access goes through one lock: iterating a deque while a callback appends to it raises
("deque mutated during iteration"), which at 400 Hz of depth happened within seconds.

Freshness is judged by the stamp and by the arrival time (steady clock) together: a stamp
alone says nothing about a camera that went silent after a frame stamped in the future, nor
about a simulated clock that jumped back.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable

from lens_ros.ros.conversions import stamp_to_seconds

SYNC_BUFFER = 30  # depth / camera_info messages kept for matching by stamp


@dataclass
class Frame:
    """A colour image as it arrived."""

    msg: object  # sensor_msgs/Image
    received: float  # time.monotonic() at arrival
    used: bool = False  # a command or a track has taken it (a frame replaced unused counts as dropped)
    seq: int = 0  # 1 for the first frame received, +1 per frame


class SensorBuffers:
    """The newest colour frame and the recent depth and camera_info messages."""

    def __init__(self, sync_size: int = SYNC_BUFFER) -> None:
        self._cond = threading.Condition()
        self._newest: Frame | None = None
        self._depth: collections.deque = collections.deque(maxlen=sync_size)
        self._camera_info: collections.deque = collections.deque(maxlen=sync_size)
        self.frames_received = 0
        self.frames_dropped = 0  # overwritten before any command used them
        self.depth_received = 0
        self.camera_info_received = 0

    def add_frame(self, msg) -> None:
        with self._cond:
            if self._newest is not None and not self._newest.used:
                self.frames_dropped += 1
            self.frames_received += 1
            self._newest = Frame(msg, time.monotonic(), seq=self.frames_received)
            self._cond.notify_all()

    def add_depth(self, msg) -> None:
        with self._cond:
            self._depth.append(msg)
            self.depth_received += 1

    def add_camera_info(self, msg) -> None:
        with self._cond:
            self._camera_info.append(msg)
            self.camera_info_received += 1

    def wait_for_frame(self, usable: Callable[[Frame], bool], timeout_s: float,
                       cancelled: Callable[[], bool]) -> Frame | None:
        """The newest frame once ``usable(frame)`` holds, marked used; None when ``timeout_s``
        passes first or ``cancelled()`` turns true."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            def ready() -> bool:
                return self._newest is not None and usable(self._newest)

            while not ready() and not cancelled():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))  # short slices: a cancel notifies nobody
            if cancelled() or not ready():
                return None
            self._newest.used = True
            return self._newest

    def newest_after(self, seq: int) -> Frame | None:
        """The newest frame if it came after frame number ``seq`` (marked used), else None; never waits."""
        with self._cond:
            if self._newest is None or self._newest.seq <= seq:
                return None
            self._newest.used = True
            return self._newest

    @property
    def has_frame(self) -> bool:
        return self._newest is not None

    def matching_depth(self, stamp_s: float, tolerance_s: float):
        return self._matching(self._depth, stamp_s, tolerance_s)

    def matching_camera_info(self, stamp_s: float, tolerance_s: float):
        return self._matching(self._camera_info, stamp_s, tolerance_s)

    def _matching(self, buffer: collections.deque, stamp_s: float, tolerance_s: float):
        with self._cond:
            best = min(buffer, key=lambda m: abs(stamp_to_seconds(m.header.stamp) - stamp_s), default=None)
        if best is None or abs(stamp_to_seconds(best.header.stamp) - stamp_s) > tolerance_s:
            return None
        return best


def staleness(frame: Frame, now_s: float, max_age_s: float, now_monotonic: float | None = None) -> str:
    """Why ``frame`` is too old to answer a command now, or "" when it is fresh.

    ``now_s`` is the node's clock (ROS time, simulated under use_sim_time), which the stamp is
    compared with. A stamp more than ``max_age_s`` ahead of that clock is reported rather than
    taken as fresh: the camera's and the node's clocks disagree (no time sync across machines,
    a simulated clock that jumped back). Whatever the stamp says, a frame that arrived more than
    ``max_age_s`` ago is old too (a camera that went silent). Unstamped frames (stamp 0) are
    judged by arrival only.
    """
    now_monotonic = time.monotonic() if now_monotonic is None else now_monotonic
    stamp = stamp_to_seconds(frame.msg.header.stamp)
    if stamp > 0:
        if stamp - now_s > max_age_s:
            return (f"the newest image is stamped {stamp - now_s:.2f} s in the future of this node's clock "
                    f"(max_image_age_s {max_age_s:g}): the camera's clock and the node's disagree")
        if now_s - stamp > max_age_s:
            return f"the newest image is {now_s - stamp:.2f} s old (max_image_age_s {max_age_s:g})"
    waited = now_monotonic - frame.received
    if waited > max_age_s:
        return f"the newest image was received {waited:.2f} s ago (max_image_age_s {max_age_s:g})"
    return ""
