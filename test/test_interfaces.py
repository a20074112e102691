"""The generated ROS interfaces (msg/, action/ -> lens_ros.msg, lens_ros.action).

Checks the package layout (sources and generated modules form one package), that every field
of the .msg/.action files is generated with its type, and a real rclpy publish/subscribe round
trip of a Segmentation over DDS.
"""

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import lens_ros
from lens_ros.action import Segment
from lens_ros.msg import Feedback, GraspRegion, Segmentation

REPO = Path(__file__).resolve().parents[1]

# .msg primitive type -> the type name rosidl reports in get_fields_and_field_types()
_PRIMITIVES = {
    "bool": "boolean", "byte": "octet", "char": "uint8", "float32": "float", "float64": "double",
    "int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
    "uint32": "uint32", "int64": "int64", "uint64": "uint64", "string": "string",
}


def _expected_fields(lines):
    """[(name, rosidl type string)] for the field lines of one .msg (or .action section)."""
    fields = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or "=" in line:  # blank, comment or constant
            continue
        type_, name = line.split()[:2]
        match = re.fullmatch(r"([\w/]+)(?:\[(\d*)\])?", type_)
        assert match, f"cannot parse field type {type_!r}"
        base, size = match.group(1), match.group(2)
        if base in _PRIMITIVES:
            base = _PRIMITIVES[base]
        elif base == "Header":
            base = "std_msgs/Header"
        elif "/" not in base:
            base = f"lens_ros/{base}"
        if size is None:
            fields.append((name, base))
        elif size == "":
            fields.append((name, f"sequence<{base}>"))
        else:
            fields.append((name, f"{base}[{size}]"))
    return fields


def _generated_fields(msg_type):
    return list(msg_type.get_fields_and_field_types().items())


def test_lens_ros_is_one_package_of_sources_and_generated_interfaces():
    # The sources come from the repository, the generated modules from wherever they were built.
    assert Path(lens_ros.__file__).resolve() == REPO / "lens_ros" / "__init__.py"
    assert lens_ros.__version__ == "0.1.0"
    for sub in (lens_ros.msg, lens_ros.action):
        assert Path(sub.__file__).parent.parent.name == "lens_ros"
        assert str(Path(sub.__file__).parent.parent) in lens_ros.__path__


def test_import_from_outside_the_repo_needs_no_environment(tmp_path):
    """As a user runs it: the venv's python, any directory, no PYTHONPATH/LD_LIBRARY_PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "_ROS_WHEELS_BOOTSTRAP_COMPLETE")}
    code = (
        "import sys, lens_ros\n"
        "heavy = sorted(m for m in ('torch', 'rclpy', 'transformers', 'cv2') if m in sys.modules)\n"
        "import lens_ros.msg, lens_ros.action\n"
        "from lens_ros.msg import Segmentation, GraspRegion, Feedback\n"
        "from lens_ros.action import Segment\n"
        "from rclpy.type_support import check_for_type_support\n"
        "for t in (Segmentation, GraspRegion, Feedback, Segment):\n"
        "    check_for_type_support(t)\n"  # loads the compiled typesupport libraries
        "print('FILE=' + lens_ros.__file__)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert Path(lines["FILE"]).resolve() == REPO / "lens_ros" / "__init__.py"
    assert lines["HEAVY"] == "", f"`import lens_ros` imported {lines['HEAVY']}"


@pytest.mark.parametrize("msg_type", [Segmentation, GraspRegion, Feedback])
def test_message_fields_match_the_msg_file(msg_type):
    text = (REPO / "msg" / f"{msg_type.__name__}.msg").read_text()
    assert _generated_fields(msg_type) == _expected_fields(text.splitlines())


def test_action_fields_match_the_action_file():
    sections = (REPO / "action" / "Segment.action").read_text().split("\n---")
    assert len(sections) == 3
    for section, part in zip(sections, (Segment.Goal, Segment.Result, Segment.Feedback)):
        assert _generated_fields(part) == _expected_fields(section.splitlines())


def test_segmentation_field_types():
    seg = Segmentation()
    assert isinstance(seg.box, np.ndarray) and seg.box.dtype == np.float32 and seg.box.shape == (4,)
    assert not seg.box.any()
    assert seg.found is False and seg.request_id == 0 and seg.command == "" and seg.error == ""
    assert type(seg.mask).__name__ == "Image" and type(seg.mask).__module__.startswith("sensor_msgs")
    assert list(seg.grasps) == []
    seg.generated_tokens = 2**32 - 1  # uint32
    seg.request_id = 2**64 - 1  # uint64
    seg.box = [1.5, 2.5, 3.5, 4.5]
    assert seg.box.dtype == np.float32 and seg.box.tolist() == [1.5, 2.5, 3.5, 4.5]


def test_grasp_region_and_feedback_fields():
    grasp = GraspRegion()
    assert grasp.has_3d is False and grasp.width_m == 0.0 and grasp.reason == ""
    assert type(grasp.pose).__name__ == "Pose" and grasp.pose.orientation.w == 1.0
    feedback = Feedback()
    assert feedback.box.shape == (4,) and feedback.box.dtype == np.float32
    assert feedback.has_box is False and feedback.mask.width == 0


def test_segment_action_parts():
    goal = Segment.Goal(command="grab the mug")
    assert goal.command == "grab the mug" and goal.image.width == 0
    result = Segment.Result()
    assert isinstance(result.segmentation, Segmentation)
    feedback = Segment.Feedback(stage="reasoning", reasoning="the mug on the left")
    assert (feedback.stage, feedback.reasoning) == ("reasoning", "the mug on the left")
    # rclpy's ActionClient/ActionServer need the generated service and message types.
    for name in ("SendGoalService", "GetResultService", "FeedbackMessage"):
        assert hasattr(Segment.Impl, name)


def _sample_segmentation():
    mask = np.zeros((5, 7), np.uint8)
    mask[1:4, 2:6] = 255
    seg = Segmentation()
    seg.header.frame_id = "camera_color_optical_frame"
    seg.header.stamp.sec, seg.header.stamp.nanosec = 1_700_000_000, 123_456_789
    seg.request_id = 42
    seg.command = "grab the mug with the chipped handle (ü, 杯子)"
    seg.reasoning = "<think>two mugs; the left one has a chip</think>"
    seg.found = True
    seg.box = [10.25, 20.5, 110.75, 220.0]
    seg.score = 0.875
    seg.mask.height, seg.mask.width = mask.shape
    seg.mask.encoding = "mono8"
    seg.mask.step = mask.shape[1]
    seg.mask.data = mask.tobytes()
    grasp = GraspRegion(center_u=60.5, center_v=120.25, angle=0.5, width_px=30.0, length_px=12.0,
                        quality=0.75, has_3d=True, width_m=0.046875, reason="")
    grasp.pose.position.x, grasp.pose.position.y, grasp.pose.position.z = 0.1, -0.05, 0.62
    grasp.pose.orientation.x, grasp.pose.orientation.w = 0.6, 0.8
    seg.grasps = [grasp]
    seg.latency_total_ms, seg.latency_reasoning_ms = 812.5, 640.25
    seg.generated_tokens = 37
    seg.model = "tiny"
    # (float32 fields hold values exact in float32, so that whole messages compare equal.)
    return seg, mask


def _assert_same_segmentation(got, sent, mask):
    assert got.header.frame_id == sent.header.frame_id
    assert (got.header.stamp.sec, got.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert (got.request_id, got.command, got.reasoning, got.found) == (
        sent.request_id, sent.command, sent.reasoning, True)
    np.testing.assert_array_equal(got.box, np.array([10.25, 20.5, 110.75, 220.0], np.float32))
    assert got.score == pytest.approx(0.875)
    assert (got.mask.height, got.mask.width, got.mask.encoding, got.mask.step) == (5, 7, "mono8", 7)
    received_mask = np.frombuffer(bytes(got.mask.data), np.uint8).reshape(got.mask.height, got.mask.width)
    np.testing.assert_array_equal(received_mask, mask)
    assert len(got.grasps) == 1
    g, s = got.grasps[0], sent.grasps[0]
    for field in ("center_u", "center_v", "angle", "width_px", "length_px", "quality", "width_m"):
        assert getattr(g, field) == pytest.approx(getattr(s, field)), field
    assert g.has_3d is True and g.reason == ""
    assert (g.pose.position.x, g.pose.position.y, g.pose.position.z) == (0.1, -0.05, 0.62)
    assert (g.pose.orientation.x, g.pose.orientation.w) == (0.6, 0.8)
    assert got.latency_total_ms == pytest.approx(812.5)
    assert got.latency_reasoning_ms == pytest.approx(640.25)
    assert (got.generated_tokens, got.model, got.error) == (37, "tiny", "")


def test_segmentation_serialization_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message

    sent, mask = _sample_segmentation()
    got = deserialize_message(serialize_message(sent), Segmentation)
    _assert_same_segmentation(got, sent, mask)
    assert got == sent


@pytest.mark.timeout(60)
def test_segmentation_published_by_one_node_is_received_by_another(ros_context, spin_until):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    topic = f"/lens_ros_test/segmentation_{uuid.uuid4().hex[:8]}"
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub_node = rclpy.create_node("lens_test_publisher", context=ros_context)
    sub_node = rclpy.create_node("lens_test_subscriber", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    received = []
    try:
        publisher = pub_node.create_publisher(Segmentation, topic, qos)
        sub_node.create_subscription(Segmentation, topic, received.append, qos)
        executor.add_node(pub_node)
        executor.add_node(sub_node)

        assert spin_until(executor, lambda: publisher.get_subscription_count() >= 1, timeout=20.0), \
            "the subscription never matched the publisher"
        sent, mask = _sample_segmentation()
        publisher.publish(sent)
        # Reliable and matched: one message should arrive; republish now and then in case the
        # subscriber's side of discovery completed later than the publisher's.
        for _ in range(20):
            if spin_until(executor, lambda: received, timeout=1.0):
                break
            publisher.publish(sent)
        assert received, "no Segmentation received within 20 s of the match"
        _assert_same_segmentation(received[0], sent, mask)
        assert received[0] == sent
    finally:
        executor.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()


def test_segmentation_latencies_mirror_stage_timings():
    """Every pipeline stage has its latency field in the message, and nothing else does."""
    from dataclasses import fields

    from lens_ros.msg import Segmentation
    from lens_ros.pipeline import StageTimings

    message_fields = {name for name in Segmentation.get_fields_and_field_types() if name.startswith("latency_")}
    assert message_fields == {f"latency_{f.name}" for f in fields(StageTimings)}
    assert all(Segmentation.get_fields_and_field_types()[name] == "float" for name in message_fields)
