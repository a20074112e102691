"""A small Python client for lens_node's ``segment`` action, with deadlines on every wait.

A node that is killed (SIGKILL, a power cut, the OOM killer) answers nothing, and the process
that replaces it cannot know the old goals: an action client that waits without a timeout then
waits forever. ``SegmentClient.segment`` waits at most ``timeout_s`` in all; when that passes it
cancels the goal (harmless when nobody is there any more) and raises ``TimeoutError``.

    client = SegmentClient(node, "/wrist/segment")
    segmentation = client.segment("the red cup", timeout_s=30.0)   # lens_ros/Segmentation

    goal = client.send("the red cup")            # or in two steps: accepted ...
    segmentation = client.result(goal, 30.0)     # ... then its result

Works with a node that an executor spins in another thread (it then polls the futures) and
with one that nothing spins (it spins the node itself while it waits).
"""

from __future__ import annotations

import time
from typing import Callable

import rclpy
from rclpy.action import ActionClient
from sensor_msgs.msg import Image

from lens_ros.action import Segment


class GoalRejectedError(RuntimeError):
    """lens_node refused the goal (it is not active)."""


class SegmentClient:
    """Sends language goals to one lens_node and waits for their results with a deadline.

    Make it before ``node`` spins in another thread (or while that thread is paused): rclpy adds
    an ActionClient to its node before the constructor has finished, and an executor spinning
    meanwhile fails on the half-made client and stops."""

    def __init__(self, node, action_name: str = "segment") -> None:
        self.node = node
        self.action_name = action_name
        self._client = ActionClient(node, Segment, action_name)

    def segment(self, command: str, image: Image | None = None, timeout_s: float = 30.0,
                feedback: Callable[[str, str], None] | None = None):
        """The Segmentation answering ``command`` (on ``image``, or the camera's newest frame).

        ``feedback(stage, reasoning)`` is called as the node reports progress. Raises
        ``TimeoutError`` when no server, goal response or result arrives within ``timeout_s`` in
        all (the goal is then cancelled) and ``GoalRejectedError`` when the node refuses the goal.
        A result with ``error`` set (bad input, superseded, shutting down) is returned as it is.
        """
        deadline = time.monotonic() + timeout_s
        goal = self.send(command, image, timeout_s, feedback)
        return self.result(goal, max(0.0, deadline - time.monotonic()))

    def send(self, command: str, image: Image | None = None, timeout_s: float = 30.0,
             feedback: Callable[[str, str], None] | None = None):
        """Send the goal and wait until lens_node has accepted it; the goal handle, for ``result``.

        Raises ``TimeoutError`` (no server or no goal response within ``timeout_s``) or
        ``GoalRejectedError``.
        """
        deadline = time.monotonic() + timeout_s
        if not self._client.wait_for_server(timeout_sec=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no lens_node answers on action '{self.action_name}' within {timeout_s:g} s")
        on_feedback = (lambda msg: feedback(msg.feedback.stage, msg.feedback.reasoning)) if feedback else None
        sent = self._client.send_goal_async(Segment.Goal(command=command, image=image or Image()),
                                            feedback_callback=on_feedback)
        if not self._wait(sent, deadline):
            raise TimeoutError(f"lens_node did not respond to the goal within {timeout_s:g} s")
        goal = sent.result()
        if not goal.accepted:
            raise GoalRejectedError(f"lens_node rejected the goal {command[:60]!r}: it is not active")
        return goal

    def result(self, goal, timeout_s: float = 30.0):
        """The Segmentation of an accepted ``goal`` (from ``send``), waiting at most ``timeout_s``;
        when none comes the goal is cancelled and ``TimeoutError`` raised."""
        result = goal.get_result_async()
        if not self._wait(result, time.monotonic() + timeout_s):
            goal.cancel_goal_async()  # a killed node never answers; a slow one stops working on it
            raise TimeoutError(f"no result from lens_node within {timeout_s:g} s (goal cancelled)")
        return result.result().result.segmentation

    def _wait(self, future, deadline: float) -> bool:
        while not future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.node.executor is None:  # nobody spins this node: spin it here
                rclpy.spin_until_future_complete(self.node, future, timeout_sec=min(left, 0.1))
            else:
                time.sleep(min(left, 0.01))
        return True

    def destroy(self) -> None:
        self._client.destroy()
