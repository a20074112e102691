"""The README's ROS commands, run with the real ROS 2 command-line tools, as a robot user runs them.

Every `ros2 ...` line in the README's shell blocks is either run here verbatim (so the README
cannot drift from what works) or listed in NOT_RUN_VERBATIM with what runs in its place. The
tools come from ../shared/wheels/ros2-cli (installed by `make venv` when that folder exists);
without them these tests skip, saying so.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from ros2_tools import NO_ROS2, ROBOT_LAUNCH, ROS2, Camera, readme_ros2_lines, run, start, stop, wait_active, \
    wait_node_listed

pytestmark = pytest.mark.skipif(not ROS2.exists(), reason=NO_ROS2)

# The README lines the tests below run as they are written.
LAUNCH_IN_THE_VENV = (".venv/bin/ros2 launch lens_ros lens.launch.py namespace:=wrist image:=/camera/color/image_raw "
                      "model:=tiny")
COMMAND = "ros2 topic pub --once --keep-alive 1 /wrist/command std_msgs/msg/String \"{data: 'grab the mug with the chipped handle'}\""
ECHO_NO_ARR = "ros2 topic echo --once /wrist/segmentation lens_ros/msg/Segmentation --no-arr"
ECHO_FIELD = "ros2 topic echo --once /wrist/segmentation lens_ros/msg/Segmentation --field box"
ACTION = ("ros2 action send_goal --feedback /wrist/segment lens_ros/action/Segment "
          "\"{command: 'the red cup left of the laptop'}\" | grep -v '^ *- [0-9]*$'")
FEEDBACK = [
    "ros2 topic pub --once --keep-alive 1 /wrist/feedback lens_ros/msg/Feedback \"{request_id: 42, success: true}\"",
    "ros2 topic pub --once --keep-alive 1 /wrist/feedback lens_ros/msg/Feedback \"{request_id: 43, success: false, has_box: true, "
    "box: [120, 80, 260, 300], note: 'the other cup'}\"",
]
LIFECYCLE_AND_PARAMETERS = [
    "ros2 param set /wrist/lens_node max_new_tokens 64", "ros2 param describe /wrist/lens_node max_image_age_s",
    "ros2 lifecycle get /wrist/lens_node", "ros2 lifecycle set /wrist/lens_node deactivate",
    "ros2 lifecycle set /wrist/lens_node activate",
]
RUN_VERBATIM = [LAUNCH_IN_THE_VENV, COMMAND, ECHO_NO_ARR, ECHO_FIELD, ACTION, *FEEDBACK, *LIFECYCLE_AND_PARAMETERS]
TRACK_ACTION = ("ros2 action send_goal --feedback /wrist/track lens_ros/action/Track "
                "\"{command: 'the red mug', keep_when_lost: true}\"")
NOT_RUN_VERBATIM = {
    TRACK_ACTION: "needs a node with a tracker_model, which the launch line above does not start: "
                  "test_node_tracking sends the same Track goal (and cancels it) over DDS with rclpy",
    ROBOT_LAUNCH: "needs the released weights and a GPU: test_ros2_colcon runs it from a colcon workspace with "
                  "the tiny model on the CPU",
}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    env["LENS_ROS_CACHE"] = str(tmp_path_factory.mktemp("lens_ros_cache"))  # model:=tiny is built here
    env.pop("AMENT_PREFIX_PATH", None)  # nothing set by hand: the venv provides it
    yield env
    run("ros2 daemon stop", env)


@pytest.fixture(scope="module")
def launched(cli_env, tmp_path_factory):
    """The README's development-venv launch line, run as written, with a camera streaming."""
    log = tmp_path_factory.mktemp("launch") / "launch.log"
    camera = Camera()
    launch = start(LAUNCH_IN_THE_VENV, cli_env, log)
    try:
        wait_active(camera, launch, log)
        wait_node_listed(cli_env)
        yield camera
    finally:
        code = stop(launch)
        camera.close()
    assert code == 0, log.read_text()[-3000:]


def test_every_readme_ros2_line_is_run_or_accounted_for():
    lines = readme_ros2_lines()
    assert len(lines) >= 10 and ROBOT_LAUNCH in lines, lines
    assert [line for line in lines if line not in RUN_VERBATIM and line not in NOT_RUN_VERBATIM] == [], (
        "README ros2 lines that no test runs")
    assert [line for line in RUN_VERBATIM if line not in lines] == [], "tests of lines the README no longer has"


def test_the_live_parameter_and_lifecycle_lines(launched, cli_env):
    outputs = {line: run(line, cli_env) for line in LIFECYCLE_AND_PARAMETERS[:3]}
    assert "Set parameter successful" in outputs[LIFECYCLE_AND_PARAMETERS[0]].stdout, outputs
    assert "Additional constraints: between 0.001 and 86400" in outputs[LIFECYCLE_AND_PARAMETERS[1]].stdout, outputs
    assert "active [3]" in outputs[LIFECYCLE_AND_PARAMETERS[2]].stdout, outputs
    assert "Transitioning successful" in run(LIFECYCLE_AND_PARAMETERS[3], cli_env).stdout
    assert launched.peer.wait_for(lambda: (launched.state() or {}).get("model_loaded") == "False", 30)
    assert "Transitioning successful" in run(LIFECYCLE_AND_PARAMETERS[4], cli_env).stdout
    assert launched.peer.wait_for(lambda: (launched.state() or {}).get("state") == "active", 60)


@pytest.mark.parametrize("echo, expected", [
    (ECHO_NO_ARR, ["command: grab the mug with the chipped handle", "error: ''",
                   "data: '<sequence type: uint8, length: 19200>'"]),
    (ECHO_FIELD, ["[0. 0. 0. 0.]"]),  # the tiny model finds nothing: box zeros
])
def test_a_topic_goal_is_answered_and_echoed(launched, cli_env, tmp_path, echo, expected):
    log = tmp_path / "echo.log"
    listener = start(echo, cli_env, log)
    try:
        assert launched.peer.wait_for(lambda: _cli_subscribers(launched, "/wrist/segmentation"), 30), log.read_text()
        # The echo's subscription shows in the graph before the node's publisher has matched it, and
        # an answer sent before that is not delivered to it: send the goal again until one arrives,
        # as a user would (--once prints the first answer it gets).
        for _ in range(5):
            sent = run(COMMAND, cli_env)
            assert sent.returncode == 0, sent.stderr
            try:
                listener.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        output = log.read_text()
        assert listener.returncode == 0 and all(text in output for text in expected), output[-2000:]
    finally:
        stop(listener)


def _cli_subscribers(camera, topic: str) -> int:
    """Subscriptions of ros2 command-line processes (their nodes are named _ros2cli_*) on ``topic``."""
    return sum(info.node_name.startswith("_ros2cli") for info in camera.peer.node.get_subscriptions_info_by_topic(topic))


def test_the_action_line_succeeds_with_bounded_feedback(launched, cli_env):
    began = time.monotonic()
    done = run(ACTION, cli_env, timeout=120)
    elapsed = time.monotonic() - began
    assert "Goal finished with status: SUCCEEDED" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Result:" in done.stdout and not re.search(r"^ *- [0-9]+$", done.stdout, re.M)  # no mask bytes
    # At each stage change plus one reasoning update per feedback_period_s (0.1 s), not one per token.
    assert 2 <= done.stdout.count("Feedback:") <= 4 + 10 * elapsed, (done.stdout.count("Feedback:"), elapsed)


def test_the_feedback_lines_reach_the_node(launched, cli_env):
    before = int((launched.state() or {}).get("feedback_received", 0))
    for line in FEEDBACK:
        result = run(line, cli_env)
        assert result.returncode == 0, result.stderr
    assert launched.peer.wait_for(lambda: int((launched.state() or {}).get("feedback_received", 0)) == before + 2, 20)
