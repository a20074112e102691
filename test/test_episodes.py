"""lens_ros.episodes: recording episodes into rosbag2/MCAP and reading them back for training.

Real messages throughout: rclpy messages serialized with rclpy's CDR serialisation, exactly as
the node hands them to the recorder. What is written is checked with rosbags' own rosbag2
Reader and the `mcap` library's indexed reader (what `ros2 bag` and Foxglove rely on), and
crash safety with a recorder process that is really killed, a real file-size limit standing in
for a full disk, and truncation at many byte offsets.
"""

import json
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from geometry_msgs.msg import Pose
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String

from lens_ros.episodes import (
    COMPLETE,
    EMPTY,
    FAILED,
    IN_USE,
    NOT_A_BAG,
    REPAIRED,
    TOPIC_CAMERA_INFO,
    TOPIC_COMMAND,
    TOPIC_DEPTH,
    TOPIC_FEEDBACK,
    TOPIC_IMAGE,
    TOPIC_SEGMENTATION,
    TOPIC_TRACK,
    TOPIC_TYPES,
    EpisodeRecorder,
    find_msg_dir,
    inspect_bags,
    lens_typestore,
    main,
    read_episodes,
    repair,
    repair_bag,
)
from lens_ros.msg import Feedback, GraspRegion, Segmentation, TrackedObject, Tracks

H, W = 12, 16
STAMP_SEC = 1_700_000_000
BAG_NAME = re.compile(r"lens_episodes_\d{8}_\d{6}_\d+")


# -- real messages ----------------------------------------------------------------------------


def make_episode(request_id, rng, with_depth=False, height=H, width=W):
    """rclpy messages of one episode: {'image', 'command', 'segmentation', 'depth'?, 'camera_info'?}."""
    image = Image(height=height, width=width, encoding="rgb8", step=3 * width,
                  data=rng.integers(0, 256, size=height * width * 3, dtype=np.uint8).tobytes())
    image.header.stamp.sec = STAMP_SEC + request_id
    image.header.stamp.nanosec = 123
    image.header.frame_id = "camera_color_optical_frame"
    mask_pixels = (rng.random(height * width) > 0.5).astype(np.uint8) * 255
    mask = Image(height=height, width=width, encoding="mono8", step=width, data=mask_pixels.tobytes())
    mask.header = image.header
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = 0.1, -0.2, 0.5 + request_id
    pose.orientation.w = 1.0
    grasp = GraspRegion(center_u=3.5 + request_id, center_v=4.25, angle=0.5, width_px=6.0, length_px=2.0,
                        quality=0.75, has_3d=True, pose=pose, width_m=0.04, reason="")
    segmentation = Segmentation(header=image.header, request_id=request_id, command=f"pick the cup {request_id}",
                                reasoning="the red cup is left", found=True, box=[1.0, 2.0, 9.0, 10.0],
                                score=0.9, mask=mask, grasps=[grasp], latency_total_ms=12.5,
                                generated_tokens=7, model="tiny", error="")
    messages = {"image": image, "command": String(data=f"pick the cup {request_id}"), "segmentation": segmentation}
    if with_depth:
        depth = Image(height=height, width=width, encoding="16UC1", step=2 * width,
                      data=rng.integers(0, 2**16, size=height * width, dtype=np.uint16).tobytes())
        depth.header = image.header
        info = CameraInfo(header=image.header, height=height, width=width, distortion_model="plumb_bob",
                          d=[0.0] * 5, k=[500.0, 0.0, width / 2, 0.0, 500.0, height / 2, 0.0, 0.0, 1.0])
        messages.update(depth=depth, camera_info=info)
    return messages


def make_feedback(request_id, note="right cup", height=H, width=W):
    mask = Image(height=height, width=width, encoding="mono8", step=width, data=bytes(height * width))
    return Feedback(request_id=request_id, success=False, mask=mask, has_box=True, box=[0.0, 1.0, 5.0, 6.0], note=note)


def make_track_state(track_id, events=("lost",)):
    """A tracked command's state on one frame, as lens_node records it (one-entry Tracks, a thumbnail)."""
    thumbnail = Image(height=2, width=3, encoding="mono8", step=3, data=bytes([0, 255, 255, 0, 0, 255]))
    return Tracks(tracks=[TrackedObject(track_id=track_id, command="the cup", state="lost", events=list(events),
                                        box=[1.0, 2.0, 3.0, 4.0], mask_area=3)], labels=thumbnail)


def serialized(messages):
    return {name: serialize_message(message) for name, message in messages.items()}


def record(recorder, request_id, raw, stamp_ns=None):
    recorder.record(request_id, raw["image"], raw["command"], raw["segmentation"], depth=raw.get("depth"),
                    camera_info=raw.get("camera_info"), stamp_ns=stamp_ns)


def bag_dirs(directory):
    return sorted(p for p in Path(directory).iterdir() if p.is_dir())


def only_mcap(bag):
    (mcap_file,) = Path(bag).glob("*.mcap")
    return mcap_file


def assert_episode_equals(episode, messages, feedback=()):
    """A read-back Episode (rosbags objects) against the rclpy messages that were recorded."""
    image, segmentation = messages["image"], messages["segmentation"]
    assert episode.request_id == segmentation.request_id
    assert episode.command == messages["command"].data
    assert (episode.image.height, episode.image.width, episode.image.encoding) == (image.height, image.width, "rgb8")
    assert episode.image.data.dtype == np.uint8
    assert episode.image.data.tobytes() == bytes(image.data)
    assert episode.image.header.stamp.sec == image.header.stamp.sec
    assert episode.image.header.frame_id == image.header.frame_id
    got = episode.segmentation
    assert got.header.stamp.sec == image.header.stamp.sec and got.header.stamp.nanosec == 123
    assert got.command == segmentation.command and got.reasoning == segmentation.reasoning
    assert got.found is True and got.generated_tokens == 7 and got.model == "tiny"
    np.testing.assert_array_equal(got.box, np.asarray(segmentation.box, dtype=np.float32))
    assert got.mask.encoding == "mono8" and got.mask.data.tobytes() == bytes(segmentation.mask.data)
    assert len(got.grasps) == 1
    grasp, want = got.grasps[0], segmentation.grasps[0]
    for name in ("center_u", "center_v", "angle", "width_px", "length_px", "quality", "width_m"):
        assert getattr(grasp, name) == pytest.approx(getattr(want, name)), name
    assert grasp.has_3d is True and grasp.pose.position.z == pytest.approx(want.pose.position.z)
    if "depth" in messages:
        assert episode.depth.encoding == "16UC1" and episode.depth.data.tobytes() == bytes(messages["depth"].data)
        np.testing.assert_array_equal(episode.camera_info.k, np.asarray(messages["camera_info"].k))
        assert episode.camera_info.distortion_model == "plumb_bob"
    else:
        assert episode.depth is None and episode.camera_info is None
    assert [(f.request_id, f.note) for f in episode.feedback] == [(f.request_id, f.note) for f in feedback]


# -- recording and reading back ---------------------------------------------------------------


def test_recorded_bag_reads_back_with_rosbags_and_read_episodes(tmp_path):
    from rosbags.rosbag2 import Reader

    rng = np.random.default_rng(0)
    episodes = [make_episode(i, rng, with_depth=(i == 1)) for i in range(3)]
    raws = [serialized(m) for m in episodes]
    feedback = make_feedback(1)
    raw_feedback = serialize_message(feedback)

    recorder = EpisodeRecorder(tmp_path / "episodes")
    assert recorder.bag_path is None and recorder.last_error == ""  # nothing is opened before recording
    for request_id, raw in enumerate(raws):
        record(recorder, request_id, raw, stamp_ns=(STAMP_SEC + request_id) * 10**9)
    recorder.record_feedback(1, raw_feedback, stamp_ns=(STAMP_SEC + 10) * 10**9)
    track_state = make_track_state(2)
    raw_track = serialize_message(track_state)
    recorder.record_track(2, raw_track, stamp_ns=(STAMP_SEC + 11) * 10**9)
    assert (recorder.track_written, recorder.track_dropped) == (1, 0)
    bag = recorder.bag_path
    recorder.close()

    assert recorder.last_error == ""
    assert (recorder.episodes_written, recorder.episodes_dropped, recorder.feedback_written) == (3, 0, 1)
    assert bag_dirs(tmp_path / "episodes") == [bag] and BAG_NAME.fullmatch(bag.name)
    assert recorder.bytes_written == only_mcap(bag).stat().st_size
    assert (bag / "metadata.yaml").is_file()

    # rosbags' own rosbag2 reader (metadata.yaml + indexed MCAP), as `ros2 bag info` sees it.
    sent = {TOPIC_IMAGE: [r["image"] for r in raws], TOPIC_DEPTH: [raws[1]["depth"]],
            TOPIC_CAMERA_INFO: [raws[1]["camera_info"]], TOPIC_COMMAND: [r["command"] for r in raws],
            TOPIC_SEGMENTATION: [r["segmentation"] for r in raws], TOPIC_FEEDBACK: [raw_feedback],
            TOPIC_TRACK: [raw_track]}
    with Reader(bag) as reader:
        assert reader.message_count == 3 + 1 + 1 + 3 + 3 + 1 + 1
        connections = {c.topic: c for c in reader.connections}
        assert set(connections) == set(TOPIC_TYPES)
        for topic, connection in connections.items():
            assert connection.msgtype == TOPIC_TYPES[topic]
            assert connection.msgcount == len(sent[topic])
        assert connections[TOPIC_SEGMENTATION].msgtype == "lens_ros/msg/Segmentation"
        assert connections[TOPIC_FEEDBACK].msgtype == "lens_ros/msg/Feedback"
        received = {topic: [] for topic in connections}
        for connection, _timestamp, raw in reader.messages():
            received[connection.topic].append(bytes(raw))
        digests = {c.msgtype: c.digest for c in reader.connections}
    # byte-exact CDR round trip through the bag, and rclpy decodes the bytes to equal messages
    assert received == sent
    originals = {TOPIC_SEGMENTATION: (Segmentation, [m["segmentation"] for m in episodes]),
                 TOPIC_IMAGE: (Image, [m["image"] for m in episodes]),
                 TOPIC_CAMERA_INFO: (CameraInfo, [episodes[1]["camera_info"]]),
                 TOPIC_FEEDBACK: (Feedback, [feedback]), TOPIC_TRACK: (Tracks, [track_state])}
    for topic, (msg_class, messages) in originals.items():
        # (through rclpy's own round trip on the expected side: float64 fields like score=0.9 are
        # float32 on the wire)
        expected = [deserialize_message(serialize_message(m), msg_class) for m in messages]
        assert [deserialize_message(raw, msg_class) for raw in received[topic]] == expected

    # The recorded type hashes are the ones rosidl generated for our interfaces (where installed).
    for name in ("Segmentation", "Feedback"):
        generated = Path(sys.prefix) / "share" / "lens_ros" / "msg" / f"{name}.json"
        if generated.is_file():
            hashes = {h["type_name"]: h["hash_string"] for h in json.loads(generated.read_text())["type_hashes"]}
            assert digests[f"lens_ros/msg/{name}"] == hashes[f"lens_ros/msg/{name}"]
            if "sensor_msgs/msg/Image" in hashes:
                assert digests["sensor_msgs/msg/Image"] == hashes["sensor_msgs/msg/Image"]

    # read_episodes: the bag directory, its .mcap alone, and the parent directory agree.
    for path in (bag, only_mcap(bag), tmp_path / "episodes"):
        got = list(read_episodes(path))
        assert [e.request_id for e in got] == [0, 1, 2]
        assert [e.stamp_ns for e in got] == [(STAMP_SEC + i) * 10**9 for i in range(3)]
        for episode, messages in zip(got, episodes):
            assert_episode_equals(episode, messages, feedback=[feedback] if episode.request_id == 1 else [])
    note = got[1].feedback[0]
    assert note.has_box is True and list(note.box) == [0.0, 1.0, 5.0, 6.0] and note.mask.width == W
    assert [len(e.track) for e in got] == [0, 0, 1]  # track states attach to their episode like feedback
    state = got[2].track[0]
    assert state.tracks[0].track_id == 2 and list(state.tracks[0].events) == ["lost"]
    assert bytes(state.labels.data) == bytes([0, 255, 255, 0, 0, 255]) and state.labels.width == 3


def test_schemas_decode_with_the_mcap_ros2_decoder(tmp_path):
    """Foxglove-style readers decode from the stored ros2msg schemas (definitions + dependencies)."""
    mcap_reader = pytest.importorskip("mcap.reader")
    mcap_ros2_decoder = pytest.importorskip("mcap_ros2.decoder")
    messages = make_episode(5, np.random.default_rng(1), with_depth=True)
    with EpisodeRecorder(tmp_path) as recorder:
        record(recorder, 5, serialized(messages))
        bag = recorder.bag_path
    with open(only_mcap(bag), "rb") as file:
        reader = mcap_reader.make_reader(file, decoder_factories=[mcap_ros2_decoder.DecoderFactory()])
        summary = reader.get_summary()
        assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}
        assert {c.message_encoding for c in summary.channels.values()} == {"cdr"}
        decoded = {channel.topic: message for _schema, channel, _msg, message in reader.iter_decoded_messages()}
    segmentation = decoded[TOPIC_SEGMENTATION]
    assert segmentation.request_id == 5 and segmentation.grasps[0].center_u == pytest.approx(8.5)
    assert bytes(segmentation.mask.data) == bytes(messages["segmentation"].mask.data)
    assert decoded[TOPIC_CAMERA_INFO].distortion_model == "plumb_bob"


def test_rotation_splits_bags_and_feedback_crosses_them(tmp_path):
    from rosbags.rosbag2 import Reader

    rng = np.random.default_rng(2)
    episodes = [make_episode(i, rng) for i in range(7)]
    directory = tmp_path / "episodes"
    # About two episodes per bag: the size is checked after each episode.
    recorder = EpisodeRecorder(directory, max_bag_bytes=2 * len(serialized(episodes[0])["image"]) + 4000,
                               fsync=False)
    bags_seen = []
    feedback = make_feedback(1, note="late verdict")
    for request_id, messages in enumerate(episodes):
        record(recorder, request_id, serialized(messages))
        bags_seen.append(recorder.bag_path)
        if request_id == 5:
            recorder.record_feedback(1, serialize_message(feedback))
    recorder.close()

    bags = bag_dirs(directory)
    assert len(bags) >= 3
    assert all(BAG_NAME.fullmatch(b.name) for b in bags)
    assert recorder.bytes_written == sum(only_mcap(b).stat().st_size for b in bags)
    segmentations, feedback_bags = 0, []
    for bag in bags:  # every rotated bag is complete on its own
        with Reader(bag) as reader:
            counts = {c.topic: c.msgcount for c in reader.connections}
        segmentations += counts[TOPIC_SEGMENTATION]
        feedback_bags += [bag] * counts[TOPIC_FEEDBACK]
    assert segmentations == 7
    assert feedback_bags != [bags_seen[1]] and len(feedback_bags) == 1  # the verdict lies in a later bag

    got = list(read_episodes(directory))
    assert [e.request_id for e in got] == list(range(7))
    assert [e.stamp_ns for e in got] == sorted(e.stamp_ns for e in got)
    for episode, messages in zip(got, episodes):
        assert_episode_equals(episode, messages, feedback=[feedback] if episode.request_id == 1 else [])


def test_feedback_attaches_to_the_latest_episode_with_its_id(tmp_path):
    """request_id restarts with the node: feedback belongs to the newest earlier episode."""
    rng = np.random.default_rng(3)
    first, second = make_episode(1, rng), make_episode(1, rng)
    with EpisodeRecorder(tmp_path, fsync=False) as recorder:
        record(recorder, 1, serialized(first))
        recorder.record_feedback(1, serialize_message(make_feedback(1, note="first run")))
        record(recorder, 1, serialized(second))
        recorder.record_feedback(1, serialize_message(make_feedback(1, note="second run")))
        recorder.record_feedback(99, serialize_message(make_feedback(99, note="no such episode")))
    got = list(read_episodes(tmp_path))
    assert [[f.note for f in e.feedback] for e in got] == [["first run"], ["second run"]]


def test_two_threads_record_and_give_feedback(tmp_path):
    rng = np.random.default_rng(4)
    raws = [serialized(make_episode(i, rng)) for i in range(30)]
    recorder = EpisodeRecorder(tmp_path, max_bag_bytes=20_000, fsync=False)
    recorded = threading.Semaphore(0)

    def commands():
        for request_id, raw in enumerate(raws):
            record(recorder, request_id, raw)
            recorded.release()

    def operator():
        for request_id in range(30):
            recorded.acquire()
            recorder.record_feedback(request_id, serialize_message(make_feedback(request_id, note=str(request_id))))

    threads = [threading.Thread(target=commands), threading.Thread(target=operator)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    recorder.close()
    assert recorder.last_error == ""
    got = list(read_episodes(tmp_path))
    assert [e.request_id for e in got] == list(range(30))
    assert [[f.note for f in e.feedback] for e in got] == [[str(i)] for i in range(30)]


# -- crash safety -----------------------------------------------------------------------------

CHILD_PRELUDE = """
import os, pickle, signal, sys
from lens_ros.episodes import EpisodeRecorder
directory, raws_file = sys.argv[1], sys.argv[2]
with open(raws_file, "rb") as f:
    raws = pickle.load(f)
def record(recorder, request_id, raw):
    recorder.record(request_id, raw["image"], raw["command"], raw["segmentation"], depth=raw.get("depth"),
                    camera_info=raw.get("camera_info"))
"""


def run_child(tmp_path, body, raws, *args):
    raws_file = tmp_path / "raws.pickle"
    raws_file.write_bytes(pickle.dumps(raws))
    script = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, str(tmp_path / "episodes"), str(raws_file), *args],
                          capture_output=True, text=True, timeout=120)


def test_every_recorded_episode_survives_the_recorder_being_killed(tmp_path):
    rng = np.random.default_rng(5)
    episodes = [make_episode(i, rng, with_depth=(i % 2 == 0)) for i in range(4)]
    feedback = make_feedback(2)
    body = """
        recorder = EpisodeRecorder(directory)
        for request_id, raw in enumerate(raws[:-1]):
            record(recorder, request_id, raw)
        recorder.record_feedback(2, raws[-1])
        os.kill(os.getpid(), signal.SIGKILL)  # right after the calls returned: no close, no atexit
    """
    done = run_child(tmp_path, body, [serialized(m) for m in episodes] + [serialize_message(feedback)])
    assert done.returncode == -9, done.stderr
    (bag,) = bag_dirs(tmp_path / "episodes")
    assert not (bag / "metadata.yaml").exists()  # never closed
    got = list(read_episodes(tmp_path / "episodes"))
    assert [e.request_id for e in got] == [0, 1, 2, 3]
    for episode, messages in zip(got, episodes):
        assert_episode_equals(episode, messages, feedback=[feedback] if episode.request_id == 2 else [])


def chunk_ends(mcap_file):
    """(end offsets of the chunks holding a Segmentation, end offsets of all chunks), via mcap's summary."""
    from mcap.reader import make_reader

    with open(mcap_file, "rb") as file:
        summary = make_reader(file).get_summary()
    (segmentation_channel,) = [c.id for c in summary.channels.values() if c.topic == TOPIC_SEGMENTATION]
    ends = [(ci.chunk_start_offset + ci.chunk_length, ci) for ci in summary.chunk_indexes]
    return ([end for end, ci in ends if segmentation_channel in ci.message_index_offsets],
            [(ci.chunk_start_offset, end) for end, ci in ends])


def test_truncated_bags_yield_exactly_the_complete_episodes(tmp_path, caplog):
    rng = np.random.default_rng(6)
    episodes = [make_episode(i, rng, with_depth=(i == 0)) for i in range(4)]
    # Episode 2's image is over rosbags' 1 MiB chunk size, so the writer flushes a chunk in the
    # middle of the episode: cutting after it leaves an image without its Segmentation.
    episodes[2] = make_episode(2, rng, height=520, width=700)
    with EpisodeRecorder(tmp_path / "bag", fsync=False) as recorder:
        for request_id, messages in enumerate(episodes):
            record(recorder, request_id, serialized(messages))
        bag = recorder.bag_path
    original = only_mcap(bag)
    data = original.read_bytes()
    segmentation_ends, chunks = chunk_ends(original)
    assert len(segmentation_ends) == 4 and len(chunks) == 5  # episode 2 spans two chunks

    cuts = {0, 1, 8, 20, len(data) - 1, len(data) - 30}
    for start, end in chunks:
        cuts |= {start, start + 1, start + 9, start + 50, (start + end) // 2, end - 1, end, end + 5}
    cuts = sorted(c for c in cuts if 0 <= c <= len(data))
    damaged = tmp_path / "damaged" / bag.name
    damaged.mkdir(parents=True)
    shutil.copy(bag / "metadata.yaml", damaged)  # stale: describes the whole bag
    for cut in cuts:
        (damaged / original.name).write_bytes(data[:cut])
        expected = [i for i, end in enumerate(segmentation_ends) if end <= cut]
        for path in (damaged, damaged / original.name):
            got = list(read_episodes(path))
            assert [e.request_id for e in got] == expected, f"cut at {cut} of {len(data)}"
            for episode in got:
                assert_episode_equals(episode, episodes[episode.request_id])
    assert "ends early" in caplog.text


def test_the_file_of_an_open_recorder_is_readable(tmp_path):
    rng = np.random.default_rng(7)
    episodes = [make_episode(i, rng) for i in range(3)]
    recorder = EpisodeRecorder(tmp_path / "live", fsync=False)
    for request_id, messages in enumerate(episodes):
        record(recorder, request_id, serialized(messages))
    snapshot = tmp_path / "snapshot.mcap"
    shutil.copy(only_mcap(recorder.bag_path), snapshot)
    assert [e.request_id for e in read_episodes(snapshot)] == [0, 1, 2]
    assert [e.request_id for e in read_episodes(tmp_path / "live")] == [0, 1, 2]  # while it is open
    record(recorder, 3, serialized(make_episode(3, rng)))
    recorder.close()
    assert [e.request_id for e in read_episodes(tmp_path / "live")] == [0, 1, 2, 3]


# -- errors -----------------------------------------------------------------------------------


def test_unwritable_directory_sets_last_error_and_recovers(tmp_path):
    """A path under a regular file cannot be created, even by root (chmod would not stop root)."""
    rng = np.random.default_rng(8)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    directory = blocker / "episodes"
    recorder = EpisodeRecorder(directory)
    raw = serialized(make_episode(0, rng))
    record(recorder, 0, raw)  # must not raise
    recorder.record_feedback(0, serialize_message(make_feedback(0)))
    assert recorder.episodes_written == 0 and recorder.episodes_dropped == 1 and recorder.feedback_dropped == 1
    assert str(directory) in recorder.last_error
    assert "Not a directory" in recorder.last_error or "Errno" in recorder.last_error

    blocker.unlink()
    directory.mkdir(parents=True)
    for request_id in (1, 2):
        record(recorder, request_id, serialized(make_episode(request_id, rng)))
    recorder.close()
    assert recorder.episodes_written == 2 and recorder.episodes_dropped == 1
    assert [e.request_id for e in read_episodes(directory)] == [1, 2]


def test_disk_full_drops_the_episode_and_a_new_bag_recovers(tmp_path):
    """A real write failure mid-chunk: RLIMIT_FSIZE makes write() fail with EFBIG like ENOSPC would."""
    pytest.importorskip("resource")  # POSIX only
    rng = np.random.default_rng(9)
    episodes = [make_episode(i, rng, height=60, width=80) for i in range(4)]
    body = """
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        recorder = EpisodeRecorder(directory)
        record(recorder, 0, raws[0])
        record(recorder, 1, raws[1])
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (recorder.bytes_written + 300, hard))
        record(recorder, 2, raws[2])  # does not fit: must not raise
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # "space freed"
        dropped_error = recorder.last_error
        record(recorder, 3, raws[3])
        recorder.close()
        print(pickle.dumps((dropped_error, recorder.episodes_written, recorder.episodes_dropped)).hex())
    """
    done = run_child(tmp_path, body, [serialized(m) for m in episodes])
    assert done.returncode == 0, done.stderr
    error, written, dropped = pickle.loads(bytes.fromhex(done.stdout.strip().splitlines()[-1]))
    assert (written, dropped) == (3, 1)
    first, second = bag_dirs(tmp_path / "episodes")
    assert "episode 2" in error and str(first) in error and "File too large" in error
    assert not (first / "metadata.yaml").exists()  # abandoned after the failure, data kept
    assert (second / "metadata.yaml").exists()
    assert only_mcap(first).stat().st_size > 0
    got = list(read_episodes(tmp_path / "episodes"))
    assert [e.request_id for e in got] == [0, 1, 3]
    for episode in got:
        assert_episode_equals(episode, episodes[episode.request_id])


def test_missing_msg_files_raise_a_clear_error(tmp_path):
    assert (find_msg_dir() / "Segmentation.msg").is_file()
    assert "lens_ros/msg/GraspRegion" in lens_typestore().types
    with pytest.raises(FileNotFoundError, match="Segmentation.msg"):
        lens_typestore(tmp_path)
    with pytest.raises(FileNotFoundError, match="Segmentation.msg"):
        EpisodeRecorder(tmp_path / "episodes", msg_dir=tmp_path)


def test_reading_needs_no_rclpy(tmp_path):
    rng = np.random.default_rng(10)
    with EpisodeRecorder(tmp_path / "episodes", fsync=False) as recorder:
        record(recorder, 4, serialized(make_episode(4, rng, with_depth=True)))
    script = textwrap.dedent("""
        import sys
        for name in ("rclpy", "rosidl_runtime_py", "lens_ros.msg"):
            sys.modules[name] = None  # any import of them fails
        from lens_ros.episodes import read_episodes
        (episode,) = read_episodes(sys.argv[1])
        print(episode.request_id, episode.command, episode.segmentation.grasps[0].center_u, episode.depth.encoding)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "episodes")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "pick", "the", "cup", "4", "7.5", "16UC1"]


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_episodes(tmp_path / "nothing"))
    assert list(read_episodes(tmp_path)) == []


def test_bags_recorded_with_an_older_msg_definition_still_read(tmp_path):
    """Each bag is decoded with the definitions it stores, so a .msg change does not orphan old data."""
    import dataclasses

    rng = np.random.default_rng(11)
    old_msg_dir = tmp_path / "msg"
    shutil.copytree(find_msg_dir(), old_msg_dir)
    segmentation_msg = old_msg_dir / "Segmentation.msg"
    segmentation_msg.write_text(segmentation_msg.read_text() + "\nstring extra  # a field that was later removed\n")
    old_store = lens_typestore(old_msg_dir)

    old_messages, new_messages = make_episode(1, rng), make_episode(2, rng)
    old_raw = serialized(old_messages)
    current = lens_typestore().deserialize_cdr(old_raw["segmentation"], "lens_ros/msg/Segmentation")
    values = {f.name: getattr(current, f.name) for f in dataclasses.fields(current) if f.name != "__msgtype__"}
    old_segmentation = old_store.types["lens_ros/msg/Segmentation"](**values, extra="old field")
    old_raw["segmentation"] = bytes(old_store.serialize_cdr(old_segmentation, "lens_ros/msg/Segmentation"))

    with EpisodeRecorder(tmp_path / "episodes", name_prefix="a_old", msg_dir=old_msg_dir, fsync=False) as old:
        record(old, 1, old_raw)
    with EpisodeRecorder(tmp_path / "episodes", name_prefix="b_new", fsync=False) as new:
        record(new, 2, serialized(new_messages))
        new.record_feedback(1, serialize_message(make_feedback(1, note="about the old one")))
    first, second = read_episodes(tmp_path / "episodes")
    assert first.segmentation.extra == "old field" and not hasattr(second.segmentation, "extra")
    assert_episode_equals(first, old_messages, feedback=[make_feedback(1, note="about the old one")])
    assert_episode_equals(second, new_messages)


def test_msg_files_are_found_through_the_ament_index(tmp_path, monkeypatch):
    """On a robot the .msg files live in an installed share/lens_ros/msg, found via AMENT_PREFIX_PATH."""
    pytest.importorskip("ament_index_python")
    prefix = tmp_path / "install"
    shutil.copytree(find_msg_dir(), prefix / "share" / "lens_ros" / "msg")
    marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / "lens_ros"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    assert find_msg_dir() == prefix / "share" / "lens_ros" / "msg"
    with EpisodeRecorder(tmp_path / "episodes", fsync=False) as recorder:
        record(recorder, 0, serialized(make_episode(0, np.random.default_rng(12))))
    assert [e.request_id for e in read_episodes(tmp_path / "episodes")] == [0]


def test_episodes_become_samples_labelled_by_their_newest_feedback(tmp_path):
    from lens_ros.training.data import EpisodeDataset

    rng = np.random.default_rng(7)
    height, width = 32, 40
    episodes = {i: make_episode(i, rng, height=height, width=width) for i in (1, 2, 3)}
    corrected = np.zeros((height, width), np.uint8)
    corrected[5:15, 10:30] = 255  # the operator's mask: 20 x 10 px
    with EpisodeRecorder(tmp_path / "bags") as recorder:
        for i, messages in episodes.items():
            record(recorder, i, serialized(messages))
        mask_fix = Feedback(request_id=1, success=False, mask=Image(height=height, width=width, encoding="mono8",
                                                                    step=width, data=corrected.tobytes()))
        recorder.record_feedback(1, serialize_message(mask_fix))
        recorder.record_feedback(3, serialize_message(Feedback(request_id=3, success=True)))
        recorder.record_feedback(3, serialize_message(Feedback(request_id=3, success=False, note="changed my mind")))
    labelled = EpisodeDataset(tmp_path / "bags")
    assert [s.expression for s in labelled] == ["pick the cup 1", "pick the cup 3"]
    fixed, rejected = labelled
    assert fixed.success is False and fixed.mask.sum() == 200 and fixed.box == (10, 5, 30, 15)
    assert rejected.success is False and rejected.mask is None and rejected.box is None
    image = episodes[1]["image"]
    assert np.array_equal(fixed.image, np.frombuffer(bytes(image.data), np.uint8).reshape(height, width, 3))
    everything = EpisodeDataset(tmp_path / "bags", labelled_only=False)
    assert len(everything) == 3 and everything[1].success is None and everything[1].mask is None
    with pytest.raises(FileNotFoundError, match="no episode bags"):
        EpisodeDataset(tmp_path / "missing")


# -- repair: lens-episodes repair --------------------------------------------------------------


def run_lens_episodes(*args):
    return subprocess.run([sys.executable, "-m", "lens_ros.episodes", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def any_reader_view(bag):
    """What rosbags' AnyReader shows of a bag: counts, times, topics (type, count, hash, definition)
    and each topic's (log time, CDR bytes) in order."""
    from rosbags.highlevel import AnyReader

    with AnyReader([Path(bag)]) as reader:
        topics = {c.topic: (c.msgtype, c.msgcount, c.digest, c.msgdef.data) for c in reader.connections}
        messages = {topic: [] for topic in topics}
        for connection, timestamp, raw in reader.messages():
            messages[connection.topic].append((timestamp, bytes(raw)))
        request_ids = [reader.deserialize(raw, TOPIC_TYPES[TOPIC_SEGMENTATION]).request_id
                       for _, raw in messages[TOPIC_SEGMENTATION]]
        return {"count": reader.message_count, "start": reader.start_time, "end": reader.end_time,
                "topics": topics, "messages": messages, "request_ids": request_ids}


def files_state(bag):
    """Names, sizes, mtimes and bytes of everything in a bag directory (to prove it untouched)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in Path(bag).iterdir()}


def test_repair_makes_the_bag_of_a_killed_recorder_open_in_anyreader(tmp_path):
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import Reader

    rng = np.random.default_rng(13)
    episodes = [make_episode(i, rng, with_depth=(i == 1)) for i in range(3)]
    feedback = make_feedback(1)
    raws = [serialized(m) for m in episodes]
    raw_feedback = serialize_message(feedback)  # once: rclpy leaves CDR padding bytes uninitialised
    stamps = [(STAMP_SEC + i) * 10**9 + 5 for i in range(4)]
    body = """
        stamps = [int(s) for s in sys.argv[3:]]
        recorder = EpisodeRecorder(directory)
        for request_id, raw in enumerate(raws[:-1]):
            recorder.record(request_id, raw["image"], raw["command"], raw["segmentation"], depth=raw.get("depth"),
                            camera_info=raw.get("camera_info"), stamp_ns=stamps[request_id])
        recorder.record_feedback(1, raws[-1], stamp_ns=stamps[-1])
        os.kill(os.getpid(), signal.SIGKILL)  # no close: no footer, no summary, no metadata.yaml
    """
    done = run_child(tmp_path, body, raws + [raw_feedback], *map(str, stamps))
    assert done.returncode == -9, done.stderr
    (crashed,) = bag_dirs(tmp_path / "episodes")
    with pytest.raises(FileNotFoundError, match="metadata"):  # what users hit before the repair
        with AnyReader([crashed]):
            pass

    # The same records through a recorder that closes normally: what the repair must match.
    with EpisodeRecorder(tmp_path / "reference", fsync=False) as recorder:
        for request_id, raw in enumerate(raws):
            record(recorder, request_id, raw, stamp_ns=stamps[request_id])
        recorder.record_feedback(1, raw_feedback, stamp_ns=stamps[-1])
        reference = recorder.bag_path

    done = run_lens_episodes("repair", tmp_path / "episodes")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout == f"{crashed}: repaired, 3 episodes, 1 feedback\n"
    assert sorted(p.name for p in crashed.iterdir()) == sorted([only_mcap(crashed).name, "metadata.yaml"])

    repaired = any_reader_view(crashed)
    assert repaired == any_reader_view(reference)  # counts, times, types, hashes, definitions, bytes
    assert repaired["count"] == 3 + 1 + 1 + 3 + 3 + 1 and repaired["request_ids"] == [0, 1, 2]
    assert (repaired["start"], repaired["end"]) == (stamps[0], stamps[-1] + 1)
    assert {topic: info[0] for topic, info in repaired["topics"].items()} == TOPIC_TYPES
    assert [raw for _, raw in repaired["messages"][TOPIC_SEGMENTATION]] == [r["segmentation"] for r in raws]
    assert repaired["messages"][TOPIC_FEEDBACK] == [(stamps[-1], raw_feedback)]
    with Reader(crashed) as reader:  # rosbags' rosbag2 reader: metadata.yaml, as `ros2 bag info` reads it
        assert reader.message_count == repaired["count"] and reader.duration == stamps[-1] - stamps[0] + 1
        assert {c.topic: (c.msgcount, c.digest) for c in reader.connections} == {
            topic: (count, digest) for topic, (_, count, digest, _) in repaired["topics"].items()}
    got = list(read_episodes(crashed))
    assert [e.request_id for e in got] == [0, 1, 2]
    for episode, messages in zip(got, episodes):
        assert_episode_equals(episode, messages, feedback=[feedback] if episode.request_id == 1 else [])

    # Twice is harmless: a complete bag is reported and not touched.
    before = files_state(crashed)
    done = run_lens_episodes("repair", crashed)
    assert (done.returncode, done.stdout) == (0, f"{crashed}: already complete, 3 episodes, 1 feedback\n")
    assert files_state(crashed) == before


def test_repair_keeps_exactly_the_complete_episodes_of_a_damaged_bag(tmp_path):
    """A stale metadata.yaml is no help to AnyReader; an unfinished episode and a cut chunk are left out."""
    from rosbags.highlevel import AnyReader, AnyReaderError

    rng = np.random.default_rng(14)
    # Episode 2's image is over rosbags' 1 MiB chunk size: its chunk is written on its own,
    # before the command and Segmentation, like in a recorder killed in the middle of record().
    episodes = [make_episode(0, rng, with_depth=True), make_episode(1, rng),
                make_episode(2, rng, height=520, width=700)]
    raws = [serialized(m) for m in episodes]
    feedback = make_feedback(0, note="wrong cup")
    stamps = [(STAMP_SEC + i) * 10**9 for i in range(3)]
    with EpisodeRecorder(tmp_path / "bag", fsync=False) as recorder:
        record(recorder, 0, raws[0], stamp_ns=stamps[0])
        recorder.record_feedback(0, serialize_message(feedback), stamp_ns=stamps[0] + 500)
        recorder.record_track(0, serialize_message(make_track_state(0, ["stopped"])), stamp_ns=stamps[0] + 600)
        record(recorder, 1, raws[1], stamp_ns=stamps[1])
        record(recorder, 2, raws[2], stamp_ns=stamps[2])
        bag = recorder.bag_path
    original = only_mcap(bag)
    _, chunks = chunk_ends(original)
    assert len(chunks) == 6  # episode 0, feedback, track state, episode 1, episode 2's image, episode 2's rest
    cut = sum(chunks[-1]) // 2  # in the middle of the chunk holding episode 2's Segmentation
    damaged = tmp_path / "damaged" / bag.name
    damaged.mkdir(parents=True)
    shutil.copy(bag / "metadata.yaml", damaged)  # stale: describes all three episodes
    data = original.read_bytes()[:cut]
    (damaged / original.name).write_bytes(data)
    with pytest.raises(AnyReaderError, match="end magic"):  # metadata.yaml alone does not do
        with AnyReader([damaged]):
            pass

    report = repair_bag(damaged, keep_original=True)
    assert (report.status, report.episodes, report.feedback, report.left_out) == (REPAIRED, 2, 1, 1)
    assert report.line() == (f"{damaged}: repaired, 2 episodes, 1 feedback; "
                             "left out 1 message of an unfinished episode")
    assert (damaged / (original.name + ".orig")).read_bytes() == data  # the original, kept as asked
    view = any_reader_view(damaged)
    assert view["request_ids"] == [0, 1] and view["count"] == 5 + 1 + 1 + 3
    assert {topic: info[1] for topic, info in view["topics"].items()} == {
        TOPIC_IMAGE: 2, TOPIC_DEPTH: 1, TOPIC_CAMERA_INFO: 1, TOPIC_COMMAND: 2, TOPIC_SEGMENTATION: 2,
        TOPIC_FEEDBACK: 1, TOPIC_TRACK: 1}
    assert view["messages"][TOPIC_IMAGE] == [(stamps[0], raws[0]["image"]), (stamps[1], raws[1]["image"])]
    assert (view["start"], view["end"]) == (stamps[0], stamps[1] + 1)
    got = list(read_episodes(damaged))  # the .orig beside it is not read twice
    assert [e.request_id for e in got] == [0, 1]
    assert [[list(s.tracks[0].events) for s in e.track] for e in got] == [[["stopped"]], []]
    for episode in got:
        assert_episode_equals(episode, episodes[episode.request_id],
                              feedback=[feedback] if episode.request_id == 0 else [])
    assert repair_bag(damaged).status == COMPLETE


def test_repair_of_a_record_directory_leaves_complete_and_live_bags_alone(tmp_path, capsys):
    rng = np.random.default_rng(15)
    episodes = [make_episode(i, rng) for i in range(6)]
    directory = tmp_path / "episodes"
    with EpisodeRecorder(directory, max_bag_bytes=1, fsync=False) as rotating:  # one bag per episode
        for request_id in range(3):
            record(rotating, request_id, serialized(episodes[request_id]))
    live = EpisodeRecorder(directory, fsync=False)
    for request_id in range(3, 6):
        record(live, request_id, serialized(episodes[request_id]))
    live.record_feedback(4, serialize_message(make_feedback(4)))
    *closed, open_bag = bag_dirs(directory)
    assert len(closed) == 3 and open_bag == live.bag_path

    # While the recorder writes it, its bag is left alone (its flock on the .mcap says so).
    before = {bag: files_state(bag) for bag in bag_dirs(directory)}
    assert [r.status for r in repair(directory)] == [COMPLETE] * 3 + [IN_USE]
    assert {bag: files_state(bag) for bag in bag_dirs(directory)} == before
    being_recorded = inspect_bags(directory)[-1]
    assert being_recorded.line() == (f"{open_bag}: being recorded (a running recorder holds it), "
                                     "3 episodes, 1 feedback so far")

    # The disk as a kill -9 would leave it: the directory copied while the recorder is open.
    crashed = tmp_path / "crashed"
    shutil.copytree(directory, crashed)
    assert main(["info", str(crashed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["already complete, 1 episode, 0 feedback"] * 3 + [
        "needs repair (no footer or stale metadata.yaml), 3 episodes, 1 feedback recoverable"]
    complete_before = {bag: files_state(bag) for bag in bag_dirs(crashed)[:3]}
    reports = repair(crashed)
    assert [(r.status, r.episodes, r.feedback) for r in reports] == [(COMPLETE, 1, 0)] * 3 + [(REPAIRED, 3, 1)]
    assert {bag: files_state(bag) for bag in bag_dirs(crashed)[:3]} == complete_before
    assert any_reader_view(bag_dirs(crashed)[-1])["request_ids"] == [3, 4, 5]
    got = list(read_episodes(crashed))
    assert [e.request_id for e in got] == list(range(6)) and [len(e.feedback) for e in got] == [0, 0, 0, 0, 1, 0]
    assert [r.status for r in repair(crashed)] == [COMPLETE] * 4

    live.close()  # closed normally: nothing to repair
    assert [r.status for r in repair(directory)] == [COMPLETE] * 4


def test_a_failed_repair_leaves_the_original_as_it_was(tmp_path):
    """A real write failure (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) while the copy is written."""
    pytest.importorskip("resource")  # POSIX only
    rng = np.random.default_rng(16)
    with EpisodeRecorder(tmp_path / "snapshot", fsync=False) as recorder:
        for request_id in range(3):
            record(recorder, request_id, serialized(make_episode(request_id, rng, height=60, width=80)))
        crashed = tmp_path / "episodes" / recorder.bag_path.name
        shutil.copytree(recorder.bag_path, crashed, ignore=shutil.ignore_patterns("metadata.yaml"))
    before = files_state(crashed)
    body = """
        import resource
        from lens_ros.episodes import repair_bag
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
        print(repair_bag(sys.argv[3]).line())
    """
    done = run_child(tmp_path, body, [], str(crashed), str(only_mcap(crashed).stat().st_size // 2))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{crashed}: repair failed, original left as is: OSError: [Errno 27] File too large\n"
    assert files_state(crashed) == before  # no metadata.yaml, no temporary bag, the .mcap as it was
    assert repair_bag(crashed).status == REPAIRED  # and space freed, it works


def test_lens_episodes_errors_are_one_line(tmp_path, capsys):
    def lens_episodes(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    missing = tmp_path / "missing"
    assert lens_episodes("repair", missing) == (2, "", f"lens-episodes: error: {missing} does not exist\n")
    nothing = (f"lens-episodes: error: {tmp_path} holds nothing repairable "
               "(no bag with a complete episode or feedback)\n")
    assert lens_episodes("repair", tmp_path) == (2, "", nothing)

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a bag")
    with EpisodeRecorder(tmp_path / "snapshot", fsync=False) as recorder:
        record(recorder, 0, serialized(make_episode(0, np.random.default_rng(17))))
        mcap_file = only_mcap(recorder.bag_path)
    first_chunk = chunk_ends(mcap_file)[1][0][0]
    empty = tmp_path / "killed_before_the_first_episode"  # the .mcap holds its header only
    empty.mkdir()
    (empty / "killed_before_the_first_episode.mcap").write_bytes(mcap_file.read_bytes()[:first_chunk])
    shutil.rmtree(tmp_path / "snapshot")
    before = files_state(empty)
    assert lens_episodes("repair", tmp_path) == (2, f"{empty}: no complete episode or feedback to recover, left as is\n"
                                                    f"{tmp_path / 'notes'}: not a bag (no .mcap file in it)\n", nothing)
    assert files_state(empty) == before
    assert repair_bag(tmp_path / "notes" / "todo.txt").status == NOT_A_BAG
    assert repair_bag(empty).status == EMPTY

    split = tmp_path / "split"  # a ros2 bag split in two files: not the recorder's layout
    split.mkdir()
    for name in ("split_0.mcap", "split_1.mcap"):
        (split / name).write_bytes(b"")
    code, out, err = lens_episodes("repair", split, missing)
    assert (code, err) == (2, f"lens-episodes: error: {missing} does not exist\n")
    assert out == (f"{split}: repair failed, original left as is: holds 2 .mcap files; "
                   "EpisodeRecorder writes one per bag directory\n")
    assert repair_bag(split).status == FAILED


def test_lens_episodes_console_script(tmp_path):
    script = Path(sys.executable).with_name("lens-episodes")
    if not script.exists():
        pytest.skip("lens-episodes is not installed in this venv yet (make venv installs setup.py's scripts)")
    done = subprocess.run([str(script), "info", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, f"lens-episodes: error: {tmp_path / 'missing'} does not exist\n")


def test_bags_of_a_new_recorder_in_the_same_second_sort_after_the_earlier_ones(tmp_path, monkeypatch):
    """A recorder started within the same second as another's later bags (a restart) names its bag
    after theirs, so bags sort, and episodes read, in recording order."""
    import datetime as real_datetime

    import lens_ros.episodes as episodes_module

    seconds = iter([12, 13, 13, 13, 13, 13])

    class TickingClock(real_datetime.datetime):  # the first bag in second 12, every later one in 13
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime(2026, 12, 2, 5, 52, next(seconds), tzinfo=tz)

    monkeypatch.setattr(episodes_module, "datetime", TickingClock)
    rng = np.random.default_rng(16)
    episodes = [make_episode(i, rng) for i in range(5)]
    directory = tmp_path / "episodes"
    with EpisodeRecorder(directory, max_bag_bytes=1, fsync=False) as first:  # one bag per episode
        for request_id in range(3):
            record(first, request_id, serialized(episodes[request_id]))
    with EpisodeRecorder(directory, fsync=False) as second:  # restarted within second 13
        for request_id in range(3, 5):
            record(second, request_id, serialized(episodes[request_id]))
    assert [bag.name.removeprefix("lens_episodes_20261202_0552") for bag in bag_dirs(directory)] == [
        "12_0", "13_1", "13_2", "13_3"]
    assert [e.request_id for e in read_episodes(directory)] == [0, 1, 2, 3, 4]
