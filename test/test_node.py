"""lens_node in its own process, over real DDS, against a test node on the other side.

The node runs the tiny random model: found is usually false, but every code path of the node
(frames, scheduling, errors, actions, lifecycle) is the real one.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fixtures_lens import part_under_box
from node_clients import Harness, camera_info_msg

from lens_ros.ros.harness import NodeProcess, image_msg

rclpy = pytest.importorskip("rclpy")
from rclpy.duration import Duration  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402

from lens_ros.action import Segment  # noqa: E402


@pytest.fixture(scope="module")
def lens(tiny_checkpoint):
    harness = Harness(tiny_checkpoint, "/cam_a")
    harness.wait_state("active")
    yield harness
    harness.close()


def test_a_command_before_any_image_is_answered_with_an_error(lens):
    answer = lens.command("the cup")
    assert answer.error == "no image received on '/cam_a/image' within 1 s"
    assert not answer.found and answer.request_id >= 1


def test_command_with_images_streaming_gives_one_segmentation(lens):
    lens.peer.wait_matched(lens.image_pub)
    answers_before = len(lens.segmentations)
    stamps = set()
    for _ in range(5):
        msg = lens.send_image()
        stamps.add((msg.header.stamp.sec, msg.header.stamp.nanosec))
        time.sleep(0.02)
    answer = lens.command("the red mug")
    assert answer.error == "", answer.error
    assert (answer.header.stamp.sec, answer.header.stamp.nanosec) in stamps
    assert answer.header.frame_id == "camera_optical"
    assert (answer.mask.height, answer.mask.width, answer.mask.encoding) == (120, 160, "mono8")
    mask = np.frombuffer(bytes(answer.mask.data), np.uint8).reshape(120, 160)
    assert set(np.unique(mask)) <= {0, 255}
    if answer.found:
        x1, y1, x2, y2 = answer.box
        assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
    else:
        assert list(answer.box) == [0, 0, 0, 0] and not mask.any()
    assert answer.latency_total_ms > 0 and answer.latency_reasoning_ms > 0 and answer.model
    # The mask topic carries the same mask with the same header.
    assert lens.peer.wait_for(lambda: any(m.header.stamp == answer.header.stamp for m in lens.masks), 10)
    published = next(m for m in lens.masks if m.header.stamp == answer.header.stamp)
    assert bytes(published.data) == bytes(answer.mask.data)
    lens.fresh_frame()
    again = lens.command("the red mug")
    assert again.request_id > answer.request_id
    assert len(lens.segmentations) == answers_before + 2  # exactly one answer per command


@pytest.mark.parametrize("bad, error", [
    (dict(encoding="yuv422"), "unsupported encoding 'yuv422'"),
    (dict(step=100), "step 100"),
    (dict(data=b"\x00" * 1000), "data has 1000 bytes"),
    (dict(width=0, height=0, step=0, data=b""), "empty"),
    (dict(width=10, height=10, step=30, data=b"\x00" * 300), "both sides must be at least 28 px"),
])
def test_bad_images_are_answered_with_an_error_and_the_node_keeps_serving(lens, bad, error):
    lens.peer.wait_matched(lens.image_pub)
    for _ in range(3):
        lens.send_image(**bad)
        time.sleep(0.05)
    answer = lens.command("the cup")
    assert error in answer.error
    lens.fresh_frame()
    assert lens.command("the cup").error == ""


@pytest.mark.parametrize("command, error", [
    ("", "command is empty"), ("   ", "command is only whitespace"),
    ("x" * 10_000, "command is 10000 characters long; the limit is 512"),
])
def test_bad_commands_are_answered_with_an_error(lens, command, error):
    lens.fresh_frame()
    assert lens.command(command).error == error
    assert lens.command("the cup").error == ""


def test_a_stale_image_is_refused(lens):
    lens.peer.wait_matched(lens.image_pub)
    for _ in range(3):
        lens.send_image(stamp=lens.peer.now() - Duration(seconds=10))
        time.sleep(0.05)
    answer = lens.command("the cup")
    assert "s old (max_image_age_s 2)" in answer.error
    lens.fresh_frame()
    assert lens.command("the cup").error == ""


def test_depth_of_the_wrong_size_is_refused(lens):
    lens.peer.wait_matched(lens.image_pub)
    lens.peer.wait_matched(lens.depth_pub)
    for _ in range(3):
        stamp = lens.peer.now()
        depth = np.full((60, 80), 1000, np.uint16)
        lens.depth_pub.publish(image_msg(depth, stamp.to_msg(), "16UC1"))
        lens.send_image(stamp=stamp)
        time.sleep(0.05)
    answer = lens.command("the cup")
    assert "depth image is 80x60 but the colour image is 160x120" in answer.error
    time.sleep(0.2)  # let the buffered depth fall out of the sync window
    lens.fresh_frame()
    assert lens.command("the cup").error == ""


def test_100_images_at_100_hz_while_commands_run(lens):
    from std_msgs.msg import String

    lens.peer.wait_matched(lens.image_pub)
    lens.fresh_frame()
    lens.command("warm up")
    rss_before = lens.node.rss_mb()
    count = len(lens.segmentations)
    published = {}
    start = time.monotonic()
    for i in range(100):
        msg = lens.send_image()
        published[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = time.monotonic()
        if i in (10, 50):
            lens.command_pub.publish(String(data="the cup"))
        time.sleep(max(0.0, start + (i + 1) * 0.01 - time.monotonic()))
    assert lens.peer.wait_for(lambda: len(lens.segmentations) >= count + 2, 60)
    time.sleep(0.5)
    answers = lens.segmentations[count:]
    assert len(answers) == 2  # no backlog: one answer per command, nothing queued per frame
    for answer in answers:
        assert answer.error == "", answer.error
        key = (answer.header.stamp.sec, answer.header.stamp.nanosec)
        assert key in published
    # The answer right after the stream uses a frame from the end of it, not a backlog.
    late = lens.command("the cup")
    assert late.error == ""
    assert (late.header.stamp.sec, late.header.stamp.nanosec) == max(published)
    assert lens.node.rss_mb() - rss_before < 100


def test_the_action_with_and_without_an_image(lens):
    client = lens.peer.action_client(Segment, "/cam_a/segment")
    assert client.wait_for_server(timeout_sec=30)
    lens.fresh_frame()
    feedback = []
    future = client.send_goal_async(Segment.Goal(command="the cup"), feedback_callback=lambda f: feedback.append(
        f.feedback.stage))
    assert lens.peer.wait_for(future.done, 30) and future.result().accepted
    result_future = future.result().get_result_async()
    assert lens.peer.wait_for(result_future.done, 60)
    result = result_future.result().result.segmentation
    assert result.error == "" and (result.mask.height, result.mask.width) == (120, 160)
    assert "reasoning" in feedback

    own = np.zeros((64, 96, 3), np.uint8)
    goal = Segment.Goal(command="the cup", image=image_msg(own, lens.peer.now().to_msg()))
    future = client.send_goal_async(goal)
    assert lens.peer.wait_for(future.done, 30)
    result_future = future.result().get_result_async()
    assert lens.peer.wait_for(result_future.done, 60)
    result = result_future.result().result.segmentation
    assert result.error == "" and (result.mask.height, result.mask.width) == (64, 96)
    client.destroy()


def test_a_cancelled_goal_ends_cancelled(tiny_checkpoint):
    from action_msgs.msg import GoalStatus

    # frame_policy 'next' with no camera: the goal waits for a frame until it is cancelled.
    harness = Harness(tiny_checkpoint, "/cam_c", frame_policy="next", image_wait_s=60.0)
    try:
        harness.wait_state("active")
        client = harness.peer.action_client(Segment, "/cam_c/segment")
        assert client.wait_for_server(timeout_sec=30)
        future = client.send_goal_async(Segment.Goal(command="the cup"))
        assert harness.peer.wait_for(future.done, 30) and future.result().accepted
        handle = future.result()
        time.sleep(0.3)
        cancel = handle.cancel_goal_async()
        assert harness.peer.wait_for(cancel.done, 30)
        result_future = handle.get_result_async()
        assert harness.peer.wait_for(result_future.done, 30)
        assert result_future.result().status == GoalStatus.STATUS_CANCELED
        assert result_future.result().result.segmentation.error == "cancelled"
        client.destroy()
    finally:
        harness.close()


def test_lifecycle_autostart_false_then_configure_activate_deactivate(tiny_checkpoint):
    from lifecycle_msgs.msg import Transition
    from std_msgs.msg import String

    harness = Harness(tiny_checkpoint, "/cam_l", autostart=False)
    try:
        def transition(transition_id):
            assert harness.transition(transition_id), harness.node.output()[-2000:]

        # Unconfigured: no subscriptions yet, nothing published.
        harness.send_image()
        harness.command_pub.publish(String(data="the cup"))
        time.sleep(1.0)
        assert harness.segmentations == []
        transition(Transition.TRANSITION_CONFIGURE)
        harness.wait_state("inactive")
        assert harness.state()["model_loaded"] == "False"
        harness.peer.wait_matched(harness.command_pub)
        harness.command_pub.publish(String(data="the cup"))
        time.sleep(1.0)
        assert harness.segmentations == []  # inactive: nothing is published
        transition(Transition.TRANSITION_ACTIVATE)
        harness.wait_state("active")
        assert harness.state()["model_loaded"] == "True"
        harness.fresh_frame()
        assert harness.command("the cup").error == ""
        transition(Transition.TRANSITION_DEACTIVATE)
        harness.wait_state("inactive")
        assert harness.state()["model_loaded"] == "False"  # deactivate frees the model
        transition(Transition.TRANSITION_ACTIVATE)
        harness.wait_state("active")
        harness.fresh_frame()
        assert harness.command("the cup").error == ""
    finally:
        harness.close()


def test_an_invalid_parameter_fails_configure_with_its_name(tiny_checkpoint):
    node = NodeProcess({"model": str(tiny_checkpoint), "busy_policy": "drop_everything"}, namespace="/cam_p")
    try:
        deadline = time.monotonic() + 60
        while "configure failed" not in node.output() and time.monotonic() < deadline and node.alive():
            time.sleep(0.1)
        assert "configure failed: parameter 'busy_policy' must be one of queue_latest, reject" in node.output()
        assert node.alive()  # stays up, unconfigured, ready for a corrected configure
    finally:
        assert node.stop() == 0, node.output()


def test_safe_parameters_change_live_and_the_others_are_refused(lens):
    assert lens.set_parameter("max_new_tokens", 2).successful
    lens.fresh_frame()
    answer = lens.command("the cup")
    assert answer.error == "" and 1 <= answer.generated_tokens <= 2
    refused = lens.set_parameter("model", "OuyBin/LENS")
    assert not refused.successful and "cannot change while active" in refused.reason
    invalid = lens.set_parameter("busy_policy", "drop")
    assert not invalid.successful and "parameter 'busy_policy' must be one of" in invalid.reason
    assert lens.set_parameter("max_new_tokens", 8).successful


def test_grasps_are_published_in_2d_and_with_depth_in_3d(scripted_checkpoint):
    """A checkpoint scripted to answer with a box (the tiny model never finds anything by
    itself): the node publishes 2-D grasp regions without depth; with depth and camera_info of
    the same stamp, 3-D ones and the best on grasp_pose; with depth but no camera_info, 2-D ones
    that say why."""
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import CameraInfo

    harness = Harness(scripted_checkpoint, "/cam_g", max_new_tokens=64, grasp_min_valid_points=5)
    try:
        info_pub = harness.peer.node.create_publisher(CameraInfo, "/cam_g/camera_info", qos_profile_sensor_data)
        poses = harness.peer.subscribe(PoseStamped, "/cam_g/grasp_pose")
        harness.wait_state("active")
        harness.fresh_frame()
        planar = harness.command("the cup")
        assert planar.error == "" and planar.found, planar.error
        assert planar.grasps and not any(g.has_3d for g in planar.grasps)
        assert all(g.width_px > 0 and 0 < g.quality <= 1 for g in planar.grasps)
        # The object: the mask part under the box stands 5 cm proud of a table 0.6 m away.
        mask = np.frombuffer(bytes(planar.mask.data), np.uint8).reshape(planar.mask.height, planar.mask.width)
        depth = np.where(part_under_box(mask > 0, planar.box), 0.55, 0.6).astype(np.float32)
        harness.peer.wait_matched(harness.depth_pub)
        harness.peer.wait_matched(info_pub)
        stamp = harness.peer.now().to_msg()
        for _ in range(3):
            harness.depth_pub.publish(image_msg(depth, stamp, "32FC1"))
            info_pub.publish(camera_info_msg(stamp, fx=2000.0))
            time.sleep(0.05)
        harness.send_image(stamp=rclpy.time.Time.from_msg(stamp))
        spatial = harness.command("the cup")
        assert spatial.error == "" and spatial.header.stamp == stamp
        best = spatial.grasps[0]
        assert best.has_3d, best.reason
        assert 0.55 < best.pose.position.z < 0.6 and 0 < best.width_m <= 0.08
        assert harness.peer.wait_for(lambda: any(p.header.stamp == stamp for p in poses), 10)
        pose = next(p for p in poses if p.header.stamp == stamp)
        assert pose.pose == best.pose and pose.header.frame_id == "camera_optical"
        # Depth without a matching camera_info: 2-D regions with the reason.
        stamp = harness.peer.now().to_msg()
        for _ in range(3):
            harness.depth_pub.publish(image_msg(depth, stamp, "32FC1"))
            time.sleep(0.05)
        harness.send_image(stamp=rclpy.time.Time.from_msg(stamp))
        no_info = harness.command("the cup")
        assert no_info.error == "" and no_info.grasps and not any(g.has_3d for g in no_info.grasps)
        assert "no camera_info on '/cam_g/camera_info' matches the image" in no_info.grasps[0].reason
    finally:
        harness.close()


def test_record_dir_records_episodes_with_their_feedback(scripted_checkpoint, tmp_path):
    """Every served command becomes an episode in a rosbag2/MCAP bag that rosbags reads back
    (image, depth, camera_info, command, Segmentation), with the operator's Feedback attached;
    the episodes become labelled training samples."""
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import CameraInfo

    from lens_ros.episodes import TOPIC_TYPES, read_episodes
    from lens_ros.msg import Feedback
    from lens_ros.training.data import EpisodeDataset

    record_dir = tmp_path / "episodes"
    harness = Harness(scripted_checkpoint, "/cam_r", max_new_tokens=64, record_dir=str(record_dir))
    try:
        info_pub = harness.peer.node.create_publisher(CameraInfo, "/cam_r/camera_info", qos_profile_sensor_data)
        feedback_pub = harness.peer.node.create_publisher(Feedback, "/cam_r/feedback", 10)
        harness.wait_state("active")
        harness.fresh_frame()
        first = harness.command("the red cup")
        harness.peer.wait_matched(harness.depth_pub)
        harness.peer.wait_matched(info_pub)
        stamp = harness.peer.now().to_msg()
        for _ in range(3):
            harness.depth_pub.publish(image_msg(np.full((120, 160), 600, np.uint16), stamp, "16UC1"))
            info_pub.publish(camera_info_msg(stamp, fx=2000.0))
            time.sleep(0.05)
        harness.send_image(stamp=rclpy.time.Time.from_msg(stamp))
        second = harness.command("the blue cup")
        assert first.error == second.error == "" and first.found and second.found
        assert harness.command("").error == "command is empty"  # refused before any frame: no episode
        harness.peer.wait_matched(feedback_pub)
        feedback_pub.publish(Feedback(request_id=first.request_id, success=True, note="right one"))
        feedback_pub.publish(Feedback(request_id=second.request_id, success=False, has_box=True,
                                      box=[10.0, 20.0, 60.0, 80.0]))
        assert harness.peer.wait_for(lambda: int((harness.state() or {}).get("feedback_recorded", 0)) == 2, 20)
        assert (harness.state() or {}).get("episodes_recorded") == "2"
    finally:
        harness.close()  # a clean shutdown also writes metadata.yaml

    (bag,) = [p for p in record_dir.iterdir() if p.is_dir()]
    with Reader(bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        types = {c.topic: c.msgtype for c in reader.connections}
    assert counts == {"/lens/image": 2, "/lens/command": 2, "/lens/segmentation": 2, "/lens/depth": 1,
                      "/lens/camera_info": 1, "/lens/feedback": 2, "/lens/track": 0}
    assert all(types[topic] == msgtype for topic, msgtype in TOPIC_TYPES.items())
    episodes = list(read_episodes(record_dir))
    assert [e.command for e in episodes] == ["the red cup", "the blue cup"]
    assert [e.segmentation.request_id for e in episodes] == [first.request_id, second.request_id]
    assert episodes[0].depth is None and episodes[1].depth is not None and episodes[1].camera_info.k[0] == 2000
    assert bytes(episodes[1].segmentation.mask.data) == bytes(second.mask.data)
    assert [f.success for f in episodes[0].feedback] == [True] and episodes[1].feedback[0].has_box
    samples = EpisodeDataset(record_dir)
    assert [s.success for s in samples] == [True, False]
    confirmed, corrected = samples
    # confirmed: the robot's own answer is the label; corrected: the operator's box only
    assert confirmed.box == pytest.approx(tuple(first.box)) and confirmed.mask.shape == (120, 160)
    assert np.array_equal(confirmed.mask, np.frombuffer(bytes(first.mask.data), np.uint8).reshape(120, 160) > 0)
    assert corrected.box == (10.0, 20.0, 60.0, 80.0) and corrected.mask is None
    assert corrected.image.shape == (120, 160, 3) and corrected.expression == "the blue cup"


def test_an_unwritable_record_dir_shows_in_diagnostics_and_the_node_keeps_serving(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the record directory should be")
    harness = Harness(tiny_checkpoint, "/cam_u", record_dir=str(blocker / "episodes"))
    try:
        harness.wait_state("active")
        harness.fresh_frame()
        assert harness.command("the cup").error == ""
        assert harness.peer.wait_for(lambda: (harness.state() or {}).get("episodes_dropped") == "1", 20)
        state = harness.state()
        assert str(blocker) in state["record_error"] and state["episodes_recorded"] == "0"
        harness.fresh_frame()
        assert harness.command("the cup").error == ""  # still serving
    finally:
        harness.close()


def test_a_missing_model_fails_activate_and_says_how_in_the_nodes_own_syntax():
    node = NodeProcess({"model": "lens-ros-tests/not-a-model", "device": "cpu"}, namespace="/cam_m")
    try:
        deadline = time.monotonic() + 60
        while "tiny model" not in node.output() and time.monotonic() < deadline and node.alive():
            time.sleep(0.1)
        output = node.output()
        assert "'lens-ros-tests/not-a-model' is not in the local Hugging Face cache" in output
        assert "-p model:=tiny; model:=tiny with lens.launch.py" in output and "--model tiny" not in output
        assert node.alive()  # inactive, ready for a corrected model
    finally:
        assert node.stop() == 0, node.output()


def test_compressed_images_in_and_vision_msgs_detections_out(scripted_checkpoint):
    """image_transport:=compressed takes JPEG frames on image/compressed (a corrupt one is answered
    with an error); publish_detections:=true puts every answer on detections as well."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    vision_msgs = pytest.importorskip("vision_msgs.msg")
    harness = Harness(scripted_checkpoint, "/cam_j", max_new_tokens=64, image_transport="compressed",
                      publish_detections=True)
    try:
        compressed_pub = harness.peer.node.create_publisher(CompressedImage, "/cam_j/image/compressed",
                                                            qos_profile_sensor_data)
        detections = harness.peer.subscribe(vision_msgs.Detection2DArray, "/cam_j/detections")
        harness.wait_state("active")
        harness.peer.wait_matched(compressed_pub)

        def send(data: bytes):
            for _ in range(3):
                msg = CompressedImage(format="bgr8; jpeg compressed bgr8", data=data)
                msg.header.stamp, msg.header.frame_id = harness.peer.now().to_msg(), "camera_optical"
                compressed_pub.publish(msg)
                time.sleep(0.05)

        ok, jpeg = cv2.imencode(".jpg", harness.rgb[:, :, ::-1].copy())
        send(jpeg.tobytes())
        answer = harness.command("the cup")
        assert answer.error == "" and answer.found and (answer.mask.height, answer.mask.width) == (120, 160)
        assert harness.peer.wait_for(lambda: detections, 10)
        (detection,) = detections[0].detections
        x1, y1, x2, y2 = answer.box
        assert detection.results[0].hypothesis.class_id == "the cup" and detection.id == str(answer.request_id)
        assert detection.bbox.size_x == pytest.approx(x2 - x1) and detection.bbox.center.position.x == pytest.approx(
            (x1 + x2) / 2)
        assert detections[0].header.stamp == answer.header.stamp
        send(jpeg.tobytes()[: len(jpeg) // 2])  # cut off mid-scan
        broken = harness.command("the cup")
        assert broken.error.startswith("image: JPEG data is truncated"), broken.error
        assert harness.peer.wait_for(lambda: len(detections) == 2, 10) and detections[1].detections == []
    finally:
        harness.close()


def test_a_best_effort_camera_against_image_qos_reliable_is_reported(tiny_checkpoint):
    harness = Harness(tiny_checkpoint, "/cam_q", image_qos="reliable")
    try:
        harness.wait_state("active")
        harness.send_image()  # the harness's camera publishes best effort, like a camera driver
        assert harness.peer.wait_for(lambda: (harness.state() or {}).get("image_qos_incompatible", "0") != "0", 20)
        assert "offers QoS incompatible with image_qos 'reliable' (policy RELIABILITY)" in harness.node.output()
    finally:
        harness.close()
