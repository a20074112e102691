"""lens_node tracking goals on every frame, in its own process over real DDS.

The node runs the scripted tiny checkpoint (LENS always finds the box [40,30,120,90]) and the tiny
random tracker (tracker_model 'tiny'): masks are meaningless, every path of the node is real.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from node_clients import DEEP_QOS, Harness

rclpy = pytest.importorskip("rclpy")
from std_msgs.msg import UInt64  # noqa: E402

from lens_ros.action import Track  # noqa: E402
from lens_ros.episodes import read_episodes  # noqa: E402
from lens_ros.msg import Tracks  # noqa: E402

RATE_HZ = 30
SIZE = (120, 160)


def moving_square(index: int) -> np.ndarray:
    """A red square on grey, moving right a pixel a frame (the object the tracks follow)."""
    rgb = np.full((*SIZE, 3), 90, np.uint8)
    x = 40 + index % 60
    rgb[40:80, x:x + 40] = (220, 30, 30)
    return rgb


class Camera:
    """Publishes moving_square frames at RATE_HZ from a thread; remembers every stamp it sent."""

    def __init__(self, harness: Harness):
        self.harness, self.sent, self.index = harness, {}, 0
        self.broken = False  # while True, frames are sent broken (a wrong step)
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        period = 1.0 / RATE_HZ
        next_time = time.monotonic()
        while self._running:
            self.index += 1
            if self.broken:
                self.harness.send_image(moving_square(self.index), step=7)
            else:
                msg = self.harness.send_image(moving_square(self.index))
                self.sent[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = self.index
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))

    def close(self):
        self._running = False
        self._thread.join()


@pytest.fixture(scope="module")
def tracking(scripted_checkpoint, tmp_path_factory):
    record_dir = tmp_path_factory.mktemp("episodes")
    harness = Harness(scripted_checkpoint, "/cam_t", max_new_tokens=40, tracker_model="tiny", track_commands=True,
                      record_dir=str(record_dir), track_thumbnail_frames=5, grasp_min_valid_points=5)
    harness.tracks = harness.peer.subscribe(Tracks, "/cam_t/tracks", DEEP_QOS)
    harness.stop_pub = harness.peer.node.create_publisher(UInt64, "/cam_t/stop_tracking", DEEP_QOS)
    harness.record_dir = record_dir
    harness.wait_state("active")
    camera = Camera(harness)
    harness.camera = camera
    yield harness
    camera.close()
    harness.close()


def stamp_of(msg):
    return (msg.header.stamp.sec, msg.header.stamp.nanosec)


def wait_tracks(harness, predicate, count=1, timeout=60):
    """The first ``count`` Tracks messages after now for which ``predicate(msg)`` holds."""
    start = len(harness.tracks)
    assert harness.peer.wait_for(
        lambda: sum(predicate(m) for m in harness.tracks[start:]) >= count, timeout), harness.node.output()[-3000:]
    return [m for m in harness.tracks[start:] if predicate(m)][:count]


def stop(harness, track_id):
    harness.peer.wait_matched(harness.stop_pub)
    harness.stop_pub.publish(UInt64(data=track_id))


def tracks_active(harness):
    """The node's tracks_active in its last /diagnostics (a string; None before any)."""
    return (harness.state() or {}).get("tracks_active")


def stop_all(harness):
    """Stop every track and wait until the node reports none."""
    stop(harness, 0)
    assert harness.peer.wait_for(lambda: tracks_active(harness) == "0", 30)


@pytest.fixture(autouse=True)
def no_tracks_left(tracking):
    """Each test starts with no tracks and ends with none, whatever it asserted: a failed test leaves
    no track behind to change what the next one counts."""
    yield
    tracking.camera.broken = False
    if tracks_active(tracking) != "0":  # (a stop sent needlessly could cross the next command)
        stop_all(tracking)


def test_a_tracked_command_gives_one_tracks_message_per_processed_frame(tracking):
    answer = tracking.command("the red square")
    assert answer.error == "" and answer.found, answer.error
    first = wait_tracks(tracking, lambda m: any(t.track_id == answer.request_id for t in m.tracks), count=20)
    for message in first:
        assert stamp_of(message) in tracking.camera.sent  # that frame's stamp
        assert (message.labels.height, message.labels.width, message.labels.encoding) == (*SIZE, "mono8")
        entry = next(t for t in message.tracks if t.track_id == answer.request_id)
        assert entry.command == "the red square" and entry.state in ("tracking", "lost", "reacquired")
        labels = np.frombuffer(bytes(message.labels.data), np.uint8).reshape(SIZE)
        assert int((labels == entry.label).sum()) == entry.mask_area if entry.label else entry.mask_area == 0
        if entry.mask_area:
            x1, y1, x2, y2 = entry.box
            assert 0 <= x1 < x2 <= SIZE[1] and 0 <= y1 < y2 <= SIZE[0]
            assert entry.grasps and all(0 <= g.center_u <= SIZE[1] for g in entry.grasps)
        assert math.isnan(entry.drift_iou) or "drift" in entry.events
    indices = [tracking.camera.sent[stamp_of(m)] for m in first]
    assert indices == sorted(set(indices))  # the newest frame each time, never one twice
    # Skipped frames are counted: what was tracked plus what was skipped is what came in between.
    assert sum(m.frames_skipped for m in first[1:]) + len(first) - 1 <= indices[-1] - indices[0]
    # The mask topic carries each tracked frame's mask, with its header.
    assert tracking.peer.wait_for(lambda: any(stamp_of(m) == stamp_of(first[-1]) for m in tracking.masks), 10)
    assert tracking.peer.wait_for(lambda: int((tracking.state() or {}).get("frames_tracked", 0)) >= len(first), 10)
    assert int(tracking.state()["tracks_active"]) == 1
    # The tiny tracker's random image encoder is not LENS's: each has its own pass, and diagnostics say so.
    assert tracking.state()["tracker_image_encoder"].startswith("its own: the tracker's image encoder weights differ")
    stop_all(tracking)


def test_commands_are_answered_while_tracks_run_and_stop_ends_one_track_or_all(tracking):
    first = tracking.command("the red square")
    wait_tracks(tracking, lambda m: len(m.tracks) == 1, count=3)
    second = tracking.command("the square again")  # answered between tracked frames
    assert second.error == "" and second.found and second.request_id > first.request_id
    both = wait_tracks(tracking, lambda m: len(m.tracks) == 2, count=3)
    assert {t.track_id for t in both[-1].tracks} == {first.request_id, second.request_id}
    assert {t.label for t in both[-1].tracks if t.mask_area} <= {1, 2}
    assert float(tracking.state()["last_wait_ms"]) >= 0
    stop(tracking, first.request_id)
    wait_tracks(tracking, lambda m: [t.track_id for t in m.tracks] == [second.request_id], count=3)
    stop_all(tracking)
    count = len(tracking.tracks)
    time.sleep(0.5)
    assert len(tracking.tracks) == count  # no tracks, no messages


def test_the_track_action_streams_frames_and_ends_on_cancel(tracking):
    client = tracking.peer.action_client(Track, "/cam_t/track")
    assert client.wait_for_server(timeout_sec=30)
    feedback = []
    future = client.send_goal_async(Track.Goal(command="the red square", keep_when_lost=True),
                                    feedback_callback=lambda f: feedback.append(f.feedback))
    assert tracking.peer.wait_for(future.done, 60)
    handle = future.result()
    assert handle.accepted
    assert tracking.peer.wait_for(lambda: len(feedback) >= 10, 60), tracking.node.output()[-3000:]
    assert all(stamp_of(f) in tracking.camera.sent and f.track.command == "the red square" for f in feedback)
    assert len({f.track.track_id for f in feedback}) == 1
    cancel = handle.cancel_goal_async()
    result_future = handle.get_result_async()
    assert tracking.peer.wait_for(lambda: cancel.done() and result_future.done(), 60)
    result = result_future.result()
    assert result.status == 5  # GoalStatus.STATUS_CANCELED
    assert result.result.reason == "cancelled" and result.result.segmentation.found
    assert result.result.frames_tracked >= len({stamp_of(f) for f in feedback})
    assert tracking.peer.wait_for(lambda: tracks_active(tracking) == "0", 30)


def test_bad_frames_are_counted_and_skipped_and_the_track_survives(tracking):
    answer = tracking.command("the red square")
    wait_tracks(tracking, lambda m: len(m.tracks) == 1, count=3)
    before = int(tracking.state()["tracking_bad_frames"])
    # Broken frames until the node has met one: tracking takes the newest frame, so a few broken ones
    # in a row may all be skipped where a tracked frame takes longer than they last (a slow machine).
    tracking.camera.broken = True
    assert tracking.peer.wait_for(lambda: int(tracking.state()["tracking_bad_frames"]) > before, 30)
    tracking.camera.broken = False
    after = wait_tracks(tracking, lambda m: [t.track_id for t in m.tracks] == [answer.request_id], count=5)
    assert all(stamp_of(m) in tracking.camera.sent for m in after)
    assert "step 7" in tracking.state()["tracking_last_error"]
    stop_all(tracking)


def test_two_thousand_frames_keep_memory_flat_and_no_backlog(tracking):
    """A long stream: the node's RSS stays flat (SAM2's memory is bounded, nothing queues) and the
    newest tracked frame stays within a few frames of the newest one sent."""
    answer = tracking.command("the red square")
    wait_tracks(tracking, lambda m: len(m.tracks) == 1, count=30)
    start, rss = tracking.camera.index, []
    while tracking.camera.index - start < 2000:
        time.sleep(1.0)
        rss.append(tracking.node.rss_mb())
    last = wait_tracks(tracking, lambda m: len(m.tracks) == 1, count=1)[0]
    assert tracking.camera.sent[stamp_of(last)] >= tracking.camera.index - 10  # tracked: (one of) the newest
    assert [t.track_id for t in last.tracks] == [answer.request_id]
    settled = rss[len(rss) // 4:]  # after the allocator's warm-up
    assert max(settled) - settled[0] < 40, rss
    stop_all(tracking)


def test_tracked_commands_are_recorded_with_their_states_thumbnails_and_stop(tracking):
    answer = tracking.command("the red square")
    wait_tracks(tracking, lambda m: len(m.tracks) == 1, count=12)
    stop_all(tracking)
    assert tracking.peer.wait_for(lambda: int((tracking.state() or {}).get("track_states_recorded", 0)) >= 3, 20)
    assert tracking.state()["track_states_dropped"] == "0"
    assert tracking.transition(4) and tracking.transition(2)  # deactivate; cleanup closes the bag
    assert tracking.transition(1) and tracking.transition(3)  # configure and activate again
    episode = next(e for e in read_episodes(tracking.record_dir) if e.segmentation.request_id == answer.request_id)
    states = episode.track
    assert len(states) >= 3, [s.tracks[0].events for s in states]
    assert all(len(s.tracks) == 1 and s.tracks[0].track_id == answer.request_id for s in states)
    thumbnails = [s for s in states if s.labels.width]
    assert thumbnails and all((s.labels.height, s.labels.width) == (SIZE[0] // 4, SIZE[1] // 4) for s in thumbnails)
    assert list(states[-1].tracks[0].events) == ["stopped"]
