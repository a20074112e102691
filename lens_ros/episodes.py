"""Episode recording for retraining: every served command as a crash-safe rosbag2 (MCAP) record.

One *episode* is what the node saw and answered for one command: the colour image, the matching
depth and camera_info when present, the command, the Segmentation it published and, later, any
operator Feedback about it. `EpisodeRecorder` (used by the ROS node) appends episodes to rosbag2
directories (metadata.yaml + one .mcap) that `ros2 bag info/play` and Foxglove open;
`read_episodes` gives them back to a trainer, on a machine with or without ROS.

Nothing here imports rclpy: the recorder takes messages already CDR-serialized (the node has
them from `rclpy.serialization.serialize_message`) and stores those exact bytes; the reader
decodes them with rosbags' pure-Python typestore.

On-disk layout (one bag directory per rotation, names sortable by creation time)::

    <directory>/<prefix>_<UTC yyyymmdd_HHMMSS>_<n>/metadata.yaml
    <directory>/<prefix>_<UTC yyyymmdd_HHMMSS>_<n>/<same name>.mcap

Within an episode the messages are written in the order image, depth, camera_info, command,
segmentation, all with the same log time. The Segmentation comes last on purpose: it is the
commit marker, so a reader that finds it knows the episode before it is whole. (Only the
Segmentation and Feedback carry request_id; the other messages belong to the Segmentation that
follows them in the file.)

Durability: rosbags' MCAP writer buffers messages in an in-memory chunk and writes the summary
and footer only at close. After every episode (and every feedback) the recorder finalizes that
chunk (`McapWriter.close_chunk()`, which writes the Chunk record and its message indexes), then
flushes and fsyncs the file. A crash right after `record()` returns therefore loses nothing that
was recorded; the bag then lacks its footer, summary and metadata.yaml, which `read_episodes`
does not need (it reads the data section as a stream and stops at the first incomplete record).
ROS tools, rosbags' AnyReader and Foxglove need them: `lens-episodes repair DIR` (`repair_bag`,
below) rewrites such a bag into a complete one holding exactly its complete episodes. While a
recorder writes a bag it holds an flock on the .mcap, so a repair leaves a live bag alone.

Errors: the recorder is a side job of a robot node and must never take the node down. An
OSError (unwritable directory, disk full, I/O error) in `record()`/`record_feedback()` is not
raised: the episode is counted as dropped, `last_error` names the path and the OS error, the
damaged bag is abandoned (its complete episodes stay readable) and the next call tries a fresh
bag directory, so freeing space or fixing permissions recovers without a restart.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lens_ros

try:
    import fcntl  # POSIX: the lock between a live recorder and `lens-episodes repair`
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

# Topic names inside the bags: the one source of truth for writer and reader.
TOPIC_IMAGE = "/lens/image"
TOPIC_DEPTH = "/lens/depth"
TOPIC_CAMERA_INFO = "/lens/camera_info"
TOPIC_COMMAND = "/lens/command"
TOPIC_SEGMENTATION = "/lens/segmentation"
TOPIC_FEEDBACK = "/lens/feedback"
TOPIC_TRACK = "/lens/track"  # a tracked command's events and periodic states (one-entry lens_ros/Tracks)

# Message type of each topic, in the order the messages of one episode are written (see above).
TOPIC_TYPES = {
    TOPIC_IMAGE: "sensor_msgs/msg/Image",
    TOPIC_DEPTH: "sensor_msgs/msg/Image",
    TOPIC_CAMERA_INFO: "sensor_msgs/msg/CameraInfo",
    TOPIC_COMMAND: "std_msgs/msg/String",
    TOPIC_SEGMENTATION: "lens_ros/msg/Segmentation",
    TOPIC_FEEDBACK: "lens_ros/msg/Feedback",
    TOPIC_TRACK: "lens_ros/msg/Tracks",
}
# Records about an episode that come after it, attached by request_id: kind -> topic.
SIDE_RECORDS = {"feedback": TOPIC_FEEDBACK, "track": TOPIC_TRACK}
SIDE_KINDS = {topic: kind for kind, topic in SIDE_RECORDS.items()}

PACKAGE = "lens_ros"
ROSBAG2_VERSION = 9  # metadata.yaml version written by Jazzy/Kilted's rosbag2
DEFAULT_MAX_BAG_BYTES = 1_000_000_000
DEFAULT_NAME_PREFIX = "lens_episodes"


# --------------------------------------------------------------------------------------------
# Message types (rosbags typestore)
# --------------------------------------------------------------------------------------------


def _base_store_name():
    """ROS 2 Kilted's types (the distro of our rclpy wheels), or the newest ROS 2 rosbags knows.

    Standard types (sensor_msgs/Image, ...) come from this store so that the definitions and
    RIHS01 type hashes recorded in the bag are the ones a Kilted `ros2 bag` expects.
    """
    from rosbags.typesys import Stores

    if hasattr(Stores, "ROS2_KILTED"):
        return Stores.ROS2_KILTED
    return [store for store in Stores if store.name.startswith("ROS2_")][-1]


def _new_base_store():
    from rosbags.typesys import get_typestore

    return get_typestore(_base_store_name())


def find_msg_dir() -> Path:
    """The directory holding lens_ros' .msg files, for registering our types with rosbags.

    Looked up, in order, where each kind of install keeps them: the ament index (a sourced ROS
    workspace: share/lens_ros/msg, i.e. what the running node's type support was built from),
    the repository next to the package (editable/development install), and share/lens_ros/msg
    under this Python's prefix (interfaces built into a venv without a sourced environment).
    """
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / "msg")
    except (ImportError, LookupError, OSError, ValueError):
        pass  # no ament install, no sourced environment (OSError), or lens_ros not in the index
    candidates.append(Path(lens_ros.__file__).resolve().parents[1] / "msg")
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "msg")
    for candidate in candidates:
        if (candidate / "Segmentation.msg").is_file():
            return candidate
    raise FileNotFoundError(
        "lens_ros episodes: cannot find lens_ros' .msg files (needed to register "
        "lens_ros/msg/Segmentation etc. with rosbags); looked in: " + ", ".join(str(c) for c in candidates)
    )


def lens_typestore(msg_dir: str | os.PathLike | None = None):
    """A rosbags typestore with the standard ROS 2 types plus lens_ros' own from their .msg text.

    Registering from the .msg files (not from a copy in this module) keeps one source of truth:
    the recorded definition and type hash then match what rosidl generated for the node.
    """
    from rosbags.typesys import get_types_from_msg

    msg_dir = Path(msg_dir) if msg_dir is not None else find_msg_dir()
    types = {}
    for msg_file in sorted(msg_dir.glob("*.msg")):
        types.update(get_types_from_msg(msg_file.read_text(encoding="utf-8"), f"{PACKAGE}/msg/{msg_file.stem}"))
    if f"{PACKAGE}/msg/Segmentation" not in types:
        raise FileNotFoundError(f"lens_ros episodes: no Segmentation.msg in {msg_dir}")
    store = _new_base_store()
    store.register(types)
    return store


def _offered_qos():
    """The QoS `ros2 bag play` should republish with: rclpy's default (reliable, volatile, 10)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    infinite = QosTime(9223372036, 854775807)  # how rosbag2 itself writes "no deadline/lifespan"
    return [Qos(QosHistory.KEEP_LAST, 10, QosReliability.RELIABLE, QosDurability.VOLATILE, infinite, infinite,
                QosLiveliness.AUTOMATIC, infinite, False)]


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class EpisodeRecorder:
    """Appends episodes to rosbag2 (MCAP) directories under `directory`, rotating by size.

    Thread-safe (one lock): the node may call `record` from its command thread and
    `record_feedback` from a subscription callback. Bags are opened lazily on the first message,
    so constructing a recorder touches no files and an unwritable directory only shows in
    `last_error`. Constructing one raises FileNotFoundError only when lens_ros' .msg files cannot
    be found (an install problem, see `find_msg_dir`).

    Diagnostics: `bag_path` (the bag being written, else the last one), `episodes_written`,
    `episodes_dropped`, `feedback_written`, `feedback_dropped`, `bytes_written` (all .mcap bytes
    this recorder wrote, all bags) and `last_error` ('' until something failed; it stays set
    after a recovery so that a diagnostics reader still sees what happened).
    """

    def __init__(self, directory, max_bag_bytes=DEFAULT_MAX_BAG_BYTES, name_prefix=DEFAULT_NAME_PREFIX, *,
                 fsync=True, msg_dir=None):
        """`fsync=False` keeps per-episode flushing (survives a process crash) but skips the fsync
        that also survives a power loss; only for tests or slow storage."""
        if max_bag_bytes <= 0:
            raise ValueError(f"max_bag_bytes must be positive, got {max_bag_bytes}")
        self.directory = Path(directory)
        self.max_bag_bytes = int(max_bag_bytes)
        self.name_prefix = str(name_prefix)
        self._fsync = bool(fsync)
        typestore = lens_typestore(msg_dir)
        # Definitions and type hashes once, not per bag: a rotation then costs milliseconds.
        self._definitions = {
            msgtype: (typestore.generate_msgdef(msgtype, ros_version=2)[0], typestore.hash_rihs01(msgtype))
            for msgtype in set(TOPIC_TYPES.values())
        }
        self._lock = threading.RLock()
        self._writer = None  # rosbags.rosbag2.Writer of the open bag
        self._connections = {}  # topic -> rosbags Connection in the open bag
        self._bag_path = None
        self._bag_count = 0  # bags this recorder opened (the <n> of their names)
        self._bag_episodes = 0
        self._bag_messages = 0
        self._closed_bytes = 0  # .mcap bytes of bags already closed or abandoned
        self._episodes_written = 0
        self._episodes_dropped = 0
        # Records about episodes (SIDE_RECORDS: feedback, track states) written and dropped, by kind.
        self._side_written = dict.fromkeys(SIDE_RECORDS, 0)
        self._side_dropped = dict.fromkeys(SIDE_RECORDS, 0)
        self._last_error = ""
        self._failing = False  # the most recent write failed

    # -- diagnostics ------------------------------------------------------------------------

    @property
    def bag_path(self) -> Path | None:
        with self._lock:
            return self._bag_path

    @property
    def episodes_written(self) -> int:
        with self._lock:
            return self._episodes_written

    @property
    def episodes_dropped(self) -> int:
        with self._lock:
            return self._episodes_dropped

    @property
    def feedback_written(self) -> int:
        with self._lock:
            return self._side_written["feedback"]

    @property
    def feedback_dropped(self) -> int:
        with self._lock:
            return self._side_dropped["feedback"]

    @property
    def track_written(self) -> int:
        with self._lock:
            return self._side_written["track"]

    @property
    def track_dropped(self) -> int:
        with self._lock:
            return self._side_dropped["track"]

    @property
    def bytes_written(self) -> int:
        with self._lock:
            return self._closed_bytes + self._open_bytes()

    @property
    def last_error(self) -> str:
        with self._lock:
            return self._last_error

    @property
    def failing(self) -> bool:
        """True while recording does not work: the most recent episode or feedback was dropped."""
        with self._lock:
            return self._failing

    # -- recording --------------------------------------------------------------------------

    def record(self, request_id: int, image: bytes, command: bytes, segmentation: bytes,
               depth: bytes | None = None, camera_info: bytes | None = None, stamp_ns: int | None = None) -> None:
        """Append one episode (CDR-serialized messages, stored byte for byte); durable on return.

        `stamp_ns` is the log time of all of its messages (default: now); `request_id` (the
        Segmentation's) only names the episode in errors. Never raises OSError: see the module
        docstring.
        """
        stamp_ns = time.time_ns() if stamp_ns is None else int(stamp_ns)
        messages = [(TOPIC_IMAGE, image), (TOPIC_DEPTH, depth), (TOPIC_CAMERA_INFO, camera_info),
                    (TOPIC_COMMAND, command), (TOPIC_SEGMENTATION, segmentation)]
        with self._lock:
            ok = self._write_durably([(t, d) for t, d in messages if d is not None], stamp_ns, f"episode {request_id}")
            self._failing = not ok
            if ok:
                self._episodes_written += 1
                self._bag_episodes += 1
            else:
                self._episodes_dropped += 1

    def record_feedback(self, request_id: int, feedback: bytes, stamp_ns: int | None = None) -> None:
        """Append an operator's Feedback (CDR); `read_episodes` attaches it by its request_id."""
        self._record_side("feedback", request_id, feedback, stamp_ns, f"feedback for episode {request_id}")

    def record_track(self, request_id: int, tracks: bytes, stamp_ns: int | None = None) -> None:
        """Append the state of a tracked command on one frame (CDR lens_ros/Tracks with that one track:
        an event, or a periodic state with a thumbnail mask); attached to episode `request_id` like feedback."""
        self._record_side("track", request_id, tracks, stamp_ns, f"track state of episode {request_id}")

    def _record_side(self, kind: str, request_id: int, data: bytes, stamp_ns: int | None, what: str) -> None:
        stamp_ns = time.time_ns() if stamp_ns is None else int(stamp_ns)
        with self._lock:
            ok = self._write_durably([(SIDE_RECORDS[kind], data)], stamp_ns, what)
            self._failing = not ok
            (self._side_written if ok else self._side_dropped)[kind] += 1

    def close(self) -> None:
        """Finish the open bag (MCAP summary + footer, metadata.yaml). Never raises OSError.

        Recording after close() starts a new bag.
        """
        with self._lock:
            if self._writer is None:
                return
            bag = self._bag_path
            try:
                self._writer.set_custom_data("lens_ros.episodes", str(self._bag_episodes))
                self._writer.close()
                self._closed_bytes += self._mcap_path(bag).stat().st_size
                if self._fsync:
                    _fsync_path(self._mcap_path(bag))
                    _fsync_path(bag / "metadata.yaml")
                    _fsync_path(bag)
            except OSError as err:
                self._fail(f"could not close bag {bag}: {err}")
                self._abandon_bag()
            finally:
                self._writer = None
                self._connections = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    # -- internals (called with the lock held) ------------------------------------------------

    def _write_durably(self, messages, stamp_ns, what) -> bool:
        """Write `messages` as one unit, finalize the chunk, flush, fsync; rotate when too big.

        False (and last_error set) when an OSError stopped it; the bag is then abandoned because
        its file may end in a partial record, and the next call opens a new one.
        """
        from rosbags.rosbag2 import WriterError

        if self._writer is None:
            try:
                self._open_bag()
            except (OSError, WriterError, RuntimeError) as err:
                self._fail(f"{what} dropped: cannot open a bag under {self.directory}: {err}")
                self._abandon_bag()
                return False
        bag = self._bag_path
        try:
            for topic, data in messages:
                self._writer.write(self._connections[topic], stamp_ns, data)
            self._make_durable()
            self._bag_messages += len(messages)
        except OSError as err:
            self._fail(f"{what} dropped: cannot write bag {bag}: {err}")
            self._abandon_bag()
            return False
        if self._open_bytes() > self.max_bag_bytes:
            self.close()
        return True

    def _open_bag(self):
        """Create the next bag directory (UTC time + counter, never reusing an existing name)."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.directory.mkdir(parents=True, exist_ok=True)
        utc = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
        # The counter goes on past the bags of this second already there (an earlier recorder's, a
        # restart within the second): names sort in recording order, which readers rely on.
        stem = f"{self.name_prefix}_{utc}_"
        taken = [int(p.name[len(stem):]) for p in self.directory.glob(stem + "*") if p.name[len(stem):].isdigit()]
        self._bag_count = max(self._bag_count, max(taken, default=-1) + 1)
        while True:
            bag = self.directory / f"{stem}{self._bag_count}"
            self._bag_count += 1
            if not bag.exists():
                break
        self._bag_path = bag
        self._bag_episodes = 0
        self._bag_messages = 0
        writer = Writer(bag, version=ROSBAG2_VERSION, storage_plugin=StoragePlugin.MCAP)
        writer.open()
        self._writer = writer
        storage = writer.storage
        if not (callable(getattr(storage, "close_chunk", None)) and hasattr(storage, "bio")):
            # Checked here, not at import, so that a rosbags upgrade fails loudly in the first
            # recording instead of silently losing the per-episode durability.
            raise RuntimeError("lens_ros episodes: this rosbags' McapWriter has no close_chunk()/bio; "
                               "per-episode durability needs rosbags 0.11 (see lens_ros/episodes.py)")
        _hold_writer_lock(storage.bio)
        qos = _offered_qos()
        self._connections = {
            topic: writer.add_connection(topic, msgtype, msgdef=self._definitions[msgtype][0],
                                         rihs01=self._definitions[msgtype][1], offered_qos_profiles=qos)
            for topic, msgtype in TOPIC_TYPES.items()
        }
        if self._fsync:  # the new directory entries must survive a power loss too
            _fsync_path(self.directory)
            _fsync_path(bag)

    def _make_durable(self):
        """Put everything written so far on disk as complete MCAP records.

        rosbags' McapWriter keeps messages (and, before the first chunk, the schemas and
        channels) in `storage.chunk` until 1 MiB or close; `close_chunk()` writes that Chunk
        and its MessageIndex records to `storage.bio`, a buffered file.
        """
        storage = self._writer.storage
        if storage.chunk.bio.tell():
            storage.close_chunk()
        storage.bio.flush()
        if self._fsync:
            os.fsync(storage.bio.fileno())

    def _open_bytes(self) -> int:
        if self._writer is None or self._writer.storage is None:
            return 0
        try:
            return self._writer.storage.bio.tell()
        except (OSError, ValueError):
            return 0

    def _abandon_bag(self):
        """Give up the open bag after an error; remove it if it holds no message at all."""
        writer, self._writer = self._writer, None
        self._connections = {}
        bag = self._bag_path
        keep = bag is not None and self._bag_messages > 0
        if writer is not None:
            if keep:
                self._closed_bytes += self._open_bytes_of(writer)
            try:
                writer.abort()  # closes the file; flushing may fail again, which is fine here
            except Exception:  # noqa: BLE001 - best effort on an already failed bag
                pass
        if bag is not None and not keep and bag.is_dir():
            shutil.rmtree(bag, ignore_errors=True)  # nothing durable in it: do not leave litter

    @staticmethod
    def _open_bytes_of(writer) -> int:
        try:
            return writer.storage.bio.tell() if writer.storage is not None else 0
        except (OSError, ValueError):
            return 0

    @staticmethod
    def _mcap_path(bag: Path) -> Path:
        return bag / f"{bag.name}.mcap"  # rosbags' McapWriter naming

    def _fail(self, message):
        self._last_error = message
        logger.error("lens_ros episodes: %s", message)


def _hold_writer_lock(file):
    """flock the .mcap being recorded so that `repair_bag` leaves a live bag alone.

    The lock lasts as long as the file is open in this process: close() and abort() release
    it, and so does the kernel when the process dies (kill -9 included), which is exactly
    when a bag becomes repairable. Best effort: where flock is unsupported, nothing changes.
    """
    _try_lock(file)  # held by a repair, or no locks on this filesystem: recording matters more


def _fsync_path(path: Path):
    """fsync a file or directory by path (directories: so that new entries in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One recorded command and its answer, as rosbags message objects (ROS field names).

    `image.data` and `segmentation.mask.data` are numpy uint8 arrays; `stamp_ns` is the log
    time the episode was recorded with; `feedback` holds the Feedback messages about it, `track`
    (a tracked command) its states over the frames that followed: lens_ros/Tracks messages with
    one entry each, at its events (lost, reacquired, drift, stopped) and every
    track_thumbnail_frames frames (with a quarter-size mask in `labels`).
    """

    request_id: int
    stamp_ns: int
    image: Any
    command: str
    segmentation: Any
    depth: Any | None = None
    camera_info: Any | None = None
    feedback: list = field(default_factory=list)
    track: list = field(default_factory=list)


def read_episodes(path) -> Iterator[Episode]:
    """Every complete episode under `path`, in recording order, with its feedback attached.

    `path` is a bag directory, a single .mcap file, or a directory of bag directories (bags in
    name order, i.e. creation time; episodes in the order they were written). rclpy is not
    needed: messages are decoded with rosbags using the definitions stored in the bag itself
    (falling back to lens_ros' .msg files), so old bags stay readable after a .msg change.

    Bags of a crashed or killed recorder (no footer, metadata.yaml missing or stale, last record
    cut) are read as a stream up to the first incomplete record: every episode whose
    Segmentation was written is returned, a partial one is skipped, nothing raises.

    Feedback attaches by request_id to the nearest earlier episode with that id (request ids
    restart with the node), across bags; failing that, to the first later one. The files are
    read twice, once for the small feedback/request-id index and once to yield the episodes,
    so that memory holds one episode at a time however large the recording.
    """
    files = _mcap_files(Path(path))
    side_records = _attach_feedback(files)
    for file_index, mcap_path in enumerate(files):
        decoder = _DECODER
        episodes = (payload for kind, payload in _episode_items(mcap_path) if kind == "episode")
        for episode_index, parts in enumerate(episodes):
            try:
                episode = _decode_episode(decoder, parts)
            except Exception as err:  # noqa: BLE001 - a record we cannot decode must not stop a trainer
                logger.warning("lens_ros episodes: skipping an undecodable episode in %s: %s", mcap_path, err)
                continue
            for kind, records in side_records.items():
                setattr(episode, kind, records.get((file_index, episode_index), []))
            yield episode


def _natural_key(path: Path):
    """Sort key so that <prefix>_..._10 comes after <prefix>_..._9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _mcap_files(path: Path) -> list[Path]:
    """The .mcap files `path` stands for, in reading order."""
    if not path.exists():
        raise FileNotFoundError(f"lens_ros episodes: {path} does not exist")
    if path.is_file():
        return [path]
    own = sorted(path.glob("*.mcap"), key=_natural_key)
    if own:
        return own
    bags = sorted((p for p in path.iterdir() if p.is_dir()), key=_natural_key)
    return [f for bag in bags for f in sorted(bag.glob("*.mcap"), key=_natural_key)]


class _ExactReads:
    """File wrapper that turns a short read into mcap's EndOfFile.

    mcap's StreamReader reads a record's payload with one read(n) and does not check that n
    bytes came back, so a record cut by a crash would be yielded with its data truncated.
    """

    def __init__(self, file):
        self._file = file

    def read(self, size=-1):
        from mcap.exceptions import EndOfFile

        data = self._file.read(size)
        if size is not None and size > 0 and len(data) != size:
            raise EndOfFile()
        return data


class _McapStream:
    """One streaming (non-seeking) pass over an .mcap file, up to its first damage.

    `messages()` yields (topic, msgtype, msgdef text, log_time, CDR bytes) in file order. While it
    runs, `channels` fills with {channel id: (mcap Channel, its Schema or None)} in file order and
    `messages_read` counts what it yielded; `repair_bag` needs both to rebuild the bag.

    A streaming read needs no summary or footer, which a killed recorder never wrote. Schemas and
    channels precede their messages in the stream (rosbags writes them into the first chunk).
    """

    def __init__(self, mcap_path: Path):
        self.path = Path(mcap_path)
        self.channels = {}
        self.messages_read = 0

    def messages(self):
        import struct

        from mcap.exceptions import McapError
        from mcap.records import Channel, Message, Schema
        from mcap.stream_reader import StreamReader

        schemas = {}
        with open(self.path, "rb") as file:
            try:
                for record in StreamReader(_ExactReads(file)).records:
                    if isinstance(record, Schema):
                        schemas[record.id] = record
                    elif isinstance(record, Channel):
                        self.channels[record.id] = (record, schemas.get(record.schema_id))
                    elif isinstance(record, Message) and record.channel_id in self.channels:
                        channel, schema = self.channels[record.channel_id]
                        msgtype = schema.name if schema is not None else ""
                        msgdef = schema.data.decode("utf-8") if schema is not None else ""
                        self.messages_read += 1
                        yield channel.topic, msgtype, msgdef, record.log_time, record.data
            except (McapError, struct.error, ValueError, EOFError) as err:
                # The expected end of a bag whose recorder died (no footer, last record cut).
                logger.warning("lens_ros episodes: %s ends early (%s: %s); using the complete records before it",
                               self.path, type(err).__name__, str(err) or "truncated")


def _episode_items(mcap_path: Path):
    """('episode', {topic: (msgtype, msgdef, log_time, data)}) and ('feedback', same tuple)."""
    return _group_episodes(_McapStream(mcap_path).messages())


def _group_episodes(messages):
    """`_episode_items` for a stream of (topic, msgtype, msgdef, log_time, data).

    Groups by file order: messages before a Segmentation belong to it; an image starts a new
    episode, so the remains of one whose Segmentation never got written are dropped. An
    episode's dict keeps file order (image first, Segmentation last).
    """
    pending = {}
    for topic, msgtype, msgdef, log_time, data in messages:
        item = (msgtype, msgdef, log_time, data)
        if topic in SIDE_KINDS:
            yield SIDE_KINDS[topic], item
        elif topic == TOPIC_SEGMENTATION:
            if TOPIC_IMAGE in pending and TOPIC_COMMAND in pending:
                pending[TOPIC_SEGMENTATION] = item
                yield "episode", pending
            pending = {}
        elif topic in TOPIC_TYPES:
            if topic == TOPIC_IMAGE:
                pending = {}
            pending[topic] = item


class _Decoder:
    """CDR -> rosbags message objects, typed by the definitions each bag stores for itself.

    Typestores are shared by every bag whose definitions agree (registering types and compiling
    their deserializers costs tens of milliseconds, per store); a bag whose definition of a type
    conflicts with the ones seen so far (recorded before a .msg change, or by another ROS
    release) gets a store of its own. One process-wide instance (`_DECODER`), behind a lock.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._stores = []  # [(Typestore, {msgtype: msgdef registered in it})]
        self._fallback = None

    def decode(self, item):
        msgtype, msgdef, _log_time, data = item
        return self._store_for(msgtype, msgdef).deserialize_cdr(data, msgtype)

    def hash_rihs01(self, msgtype, msgdef):
        """The RIHS01 type hash of `msgtype` as `msgdef` (a bag's stored schema) defines it.

        MCAP channels do not store the hash (only metadata.yaml does), so a repaired bag
        recomputes it from the definition the bag itself holds.
        """
        return self._store_for(msgtype, msgdef).hash_rihs01(msgtype)

    def _store_for(self, msgtype, msgdef):
        from rosbags.typesys import TypesysError, get_types_from_msg

        with self._lock:
            if not msgdef:  # a schemaless channel: trust lens_ros' .msg files / the standard types
                if self._fallback is None:
                    self._fallback = lens_typestore()
                return self._fallback
            for store, definitions in self._stores:
                if definitions.get(msgtype) == msgdef:
                    return store
            types = get_types_from_msg(msgdef, msgtype)
            for store, definitions in self._stores:
                if msgtype not in definitions:
                    try:
                        store.register(types)  # raises if a dependency's definition conflicts
                    except TypesysError:
                        continue
                    definitions[msgtype] = msgdef
                    return store
            try:
                store = _new_base_store()
                store.register(types)
            except TypesysError:  # the distro's own definition differs: the bag's alone
                store = _new_empty_store()
                store.register(types)
            self._stores.append((store, {msgtype: msgdef}))
            return store


def _new_empty_store():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.EMPTY)


_DECODER = _Decoder()


def _decode_episode(decoder: _Decoder, parts) -> Episode:
    segmentation = decoder.decode(parts[TOPIC_SEGMENTATION])
    depth = parts.get(TOPIC_DEPTH)
    camera_info = parts.get(TOPIC_CAMERA_INFO)
    return Episode(
        request_id=int(segmentation.request_id),
        stamp_ns=int(parts[TOPIC_SEGMENTATION][2]),
        image=decoder.decode(parts[TOPIC_IMAGE]),
        command=decoder.decode(parts[TOPIC_COMMAND]).data,
        segmentation=segmentation,
        depth=decoder.decode(depth) if depth is not None else None,
        camera_info=decoder.decode(camera_info) if camera_info is not None else None,
    )


def _attach_feedback(files) -> dict[str, dict[tuple[int, int], list]]:
    """{kind: {(file index, episode index in file): [message, ...]}} for the kinds of SIDE_RECORDS
    (feedback, track states), by the rule in `read_episodes`.

    Episodes are keyed by position, not request_id, because ids repeat across node restarts.
    """
    episodes_by_id = defaultdict(list)  # request_id -> [(sequence, key)] in reading order
    side = []  # (sequence, kind, message, request_id)
    sequence = 0
    for file_index, mcap_path in enumerate(files):
        decoder = _DECODER
        episode_index = 0
        for kind, payload in _episode_items(mcap_path):
            sequence += 1
            key = (file_index, episode_index)
            if kind == "episode":
                episode_index += 1
            try:
                if kind in SIDE_RECORDS:
                    message = decoder.decode(payload)
                    side.append((sequence, kind, message, _side_request_id(kind, message)))
                    continue
                request_id = int(decoder.decode(payload[TOPIC_SEGMENTATION]).request_id)
            except Exception as err:  # noqa: BLE001 - same tolerance as read_episodes
                logger.warning("lens_ros episodes: skipping an undecodable %s in %s: %s", kind, mcap_path, err)
                continue
            episodes_by_id[request_id].append((sequence, key))
    attached = {kind: defaultdict(list) for kind in SIDE_RECORDS}
    for sequence, kind, message, request_id in side:
        candidates = episodes_by_id.get(request_id, [])
        before = [key for seq, key in candidates if seq < sequence]
        after = [key for seq, key in candidates if seq > sequence]
        if before:
            attached[kind][before[-1]].append(message)
        elif after:
            attached[kind][after[0]].append(message)
        else:
            logger.info("lens_ros episodes: %s for unknown episode %d ignored", kind, request_id)
    return {kind: dict(records) for kind, records in attached.items()}


def _side_request_id(kind: str, message) -> int:
    """The episode a side record is about: Feedback.request_id; a track state's track_id (the
    request_id of the command that started the track)."""
    return int(message.request_id if kind == "feedback" else message.tracks[0].track_id)


# --------------------------------------------------------------------------------------------
# Repair (`lens-episodes repair`): the bag of a killed recorder -> a complete rosbag2 bag
# --------------------------------------------------------------------------------------------
#
# Why the .mcap is rewritten rather than only given a metadata.yaml: rosbags' Reader (and so
# AnyReader), ros2 bag's MCAP plugin and Foxglove's indexed reads need the MCAP footer and
# summary; with a metadata.yaml alone AnyReader still fails ("File end magic is invalid").
# Appending a footer in place would alter the original before a replacement exists, and would
# keep the messages of an unfinished episode (rosbags flushes a 1 MiB chunk in the middle of an
# episode with a large image). So the complete episodes and the feedback, the records
# `read_episodes` returns, are copied byte for byte with their log times through rosbags' own
# Writer (chunk indexes, statistics, summary, footer, metadata.yaml, as for a bag closed
# normally) into a temporary bag inside the bag directory; it is fsynced and opened with
# rosbags' Reader, and only then os.replace()d over the original: at every moment the bag's
# .mcap is either the whole original or the whole repaired file.

REPAIR_DIR = ".lens-repair"  # the temporary bag, inside the bag (read_episodes does not descend)
BACKUP_SUFFIX = ".orig"  # <name>.mcap.orig: the original, with --keep-original

# RepairReport.status values; "needs repair" only comes from inspect_bag.
REPAIRED, COMPLETE, NEEDS_REPAIR, IN_USE, EMPTY, NOT_A_BAG, FAILED = (
    "repaired", "complete", "needs repair", "in use", "empty", "not a bag", "failed")


@dataclass
class RepairReport:
    """What `repair_bag` (or `inspect_bag`) found and did for one bag directory.

    `episodes`/`feedback`: complete episodes and feedback records the bag holds (after a
    repair: what was carried over). `left_out`: messages of unfinished episodes that were not.
    """

    path: Path
    status: str
    episodes: int = 0
    feedback: int = 0
    left_out: int = 0
    error: str = ""

    @property
    def usable(self) -> bool:
        """The bag now opens with rosbags/ros2 bag and holds something."""
        return self.status in (REPAIRED, COMPLETE)

    def line(self) -> str:
        counts = f"{_plural(self.episodes, 'episode')}, {self.feedback} feedback"
        counts_known = bool(self.episodes or self.feedback)
        left_out = (f"; left out {_plural(self.left_out, 'message')} of an unfinished episode"
                    if self.left_out else "")
        detail = {
            REPAIRED: f"repaired, {counts}{left_out}",
            COMPLETE: f"already complete, {counts}",
            NEEDS_REPAIR: f"needs repair (no footer or stale metadata.yaml), {counts} recoverable{left_out}",
            IN_USE: "being recorded (a running recorder holds it)" + (f", {counts} so far" if counts_known else ""),
            EMPTY: f"no complete episode or feedback to recover{left_out}, left as is",
            NOT_A_BAG: f"not a bag ({self.error})",
            FAILED: f"repair failed, original left as is: {self.error}",
        }[self.status]
        return f"{self.path}: {detail}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def repair(path, *, keep_original=False) -> list[RepairReport]:
    """`repair_bag` for a bag directory, or for each bag directory inside a record directory."""
    return [repair_bag(bag, keep_original=keep_original) for bag in _bag_candidates(Path(path))]


def inspect_bags(path) -> list[RepairReport]:
    """`inspect_bag` for a bag directory, or for each bag directory inside a record directory."""
    return [inspect_bag(bag) for bag in _bag_candidates(Path(path))]


def repair_bag(bag_dir, *, keep_original=False) -> RepairReport:
    """Make a recorder's bag directory complete again, keeping exactly its complete episodes.

    A bag that already opens with rosbags (metadata.yaml agreeing with an indexed .mcap) is
    left untouched, so repairing twice is harmless; so is a bag a running recorder still
    writes, and one holding nothing complete. Otherwise the .mcap is rewritten (see above);
    `keep_original` keeps the original as <name>.mcap.orig. Problems are reported in the
    RepairReport (status FAILED, the original untouched), not raised; only a path that does not
    exist raises FileNotFoundError.
    """
    from rosbags.rosbag2 import ReaderError, WriterError
    from rosbags.typesys import TypesysError

    bag = Path(bag_dir)
    mcap, report = _bag_mcap(bag)
    if report is not None:
        return report
    with _unless_recording(mcap) as free:
        if not free:
            return RepairReport(bag, IN_USE)
        complete = _complete_counts(bag, mcap)
        if complete is not None:
            return RepairReport(bag, COMPLETE, *complete)
        try:
            return _rewrite(bag, mcap, keep_original)
        except (OSError, ReaderError, WriterError, TypesysError, ValueError) as err:
            shutil.rmtree(bag / REPAIR_DIR, ignore_errors=True)
            return RepairReport(bag, FAILED, error=f"{type(err).__name__}: {err}")


def inspect_bag(bag_dir) -> RepairReport:
    """What `repair_bag` would find, changing nothing (statuses COMPLETE, NEEDS_REPAIR, ...)."""
    bag = Path(bag_dir)
    mcap, report = _bag_mcap(bag)
    if report is not None:
        return report
    complete = _complete_counts(bag, mcap)
    if complete is not None:
        return RepairReport(bag, COMPLETE, *complete)
    with _unless_recording(mcap) as free:
        stream = _McapStream(mcap)
        episodes, feedback, kept = _count_complete(_group_episodes(stream.messages()))
        status = (NEEDS_REPAIR if episodes + feedback else EMPTY) if free else IN_USE
        return RepairReport(bag, status, episodes, feedback, stream.messages_read - kept)


def _bag_candidates(path: Path) -> list[Path]:
    """`path` itself when it is a bag (holds a .mcap) or a file, else its subdirectories."""
    if not path.exists():
        raise FileNotFoundError(f"lens_ros episodes: {path} does not exist")
    if path.is_file() or any(path.glob("*.mcap")):
        return [path]
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural_key)


def _bag_mcap(bag: Path):
    """(the bag's one .mcap, None), or (None, a report saying why `bag` cannot be repaired)."""
    if not bag.exists():
        raise FileNotFoundError(f"lens_ros episodes: {bag} does not exist")
    if not bag.is_dir():
        return None, RepairReport(bag, NOT_A_BAG, error="a file; give the bag directory holding it")
    files = sorted(bag.glob("*.mcap"), key=_natural_key)
    if not files:
        return None, RepairReport(bag, NOT_A_BAG, error="no .mcap file in it")
    if len(files) > 1:  # a split ros2 bag, not one of EpisodeRecorder's
        return None, RepairReport(bag, FAILED, error=f"holds {len(files)} .mcap files; "
                                  "EpisodeRecorder writes one per bag directory")
    return files[0], None


@contextmanager
def _unless_recording(mcap: Path):
    """Hold an exclusive flock on the .mcap: yields True, or False if a recorder holds it.

    Held for the whole repair, so two repairs of one bag cannot interleave either.
    """
    with open(mcap, "rb") as file:  # closing it releases the lock
        yield _try_lock(file)


def _try_lock(file) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass  # no locks on this filesystem: as on the recorder's side, go on without
    return True


def _complete_counts(bag: Path, mcap: Path) -> tuple[int, int] | None:
    """(episodes, feedback) if the bag opens with rosbags and metadata.yaml matches the .mcap.

    rosbags' Reader on the directory trusts metadata.yaml for counts (a stale one left beside a
    truncated or repaired file would lie) and on the .mcap reads its summary, which only a
    closed file has; the bag is complete when both open and agree.
    """
    from rosbags.rosbag2 import Reader, ReaderError

    if not (bag / "metadata.yaml").is_file():
        return None
    try:
        with Reader(bag) as described, Reader(mcap) as stored:
            topics = _topic_counts(described)
            if described.message_count != stored.message_count or topics != _topic_counts(stored):
                return None
    except (ReaderError, OSError, ValueError, KeyError):
        return None
    return topics.get(TOPIC_SEGMENTATION, 0), topics.get(TOPIC_FEEDBACK, 0)


def _topic_counts(reader) -> dict[str, int]:
    return {topic: info.msgcount for topic, info in reader.topics.items()}


def _count_complete(items) -> tuple[int, int, int]:
    """(episodes, feedback, messages in them) of `_group_episodes` items."""
    episodes = feedback = messages = 0
    for kind, payload in items:
        if kind == "episode":
            episodes += 1
            messages += len(payload)
        else:
            feedback += kind == "feedback"
            messages += 1
    return episodes, feedback, messages


def _rewrite(bag: Path, mcap: Path, keep_original: bool) -> RepairReport:
    """Copy the complete records into a temporary bag, check it, and swap it in."""
    scratch = bag / REPAIR_DIR
    shutil.rmtree(scratch, ignore_errors=True)  # left by an interrupted repair: copies only
    new_bag = scratch / mcap.stem  # rosbags names the .mcap after its directory
    episodes, feedback, left_out = _copy_complete(mcap, new_bag)
    if episodes + feedback == 0:
        shutil.rmtree(scratch)
        return RepairReport(bag, EMPTY, left_out=left_out)
    new_mcap = new_bag / mcap.name
    for path in (new_mcap, new_bag / "metadata.yaml", new_bag, scratch):
        _fsync_path(path)
    if _complete_counts(new_bag, new_mcap) != (episodes, feedback):
        raise ValueError(f"the repaired copy in {new_bag} does not read back as written")
    if keep_original:
        _keep_original(mcap)
    # metadata.yaml first: a crash between the two leaves the old .mcap, which is still seen
    # as damaged, and the next repair starts over from it.
    os.replace(new_bag / "metadata.yaml", bag / "metadata.yaml")
    os.replace(new_mcap, mcap)
    _fsync_path(bag)
    shutil.rmtree(scratch)
    return RepairReport(bag, REPAIRED, episodes, feedback, left_out)


def _copy_complete(source: Path, target: Path) -> tuple[int, int, int]:
    """Write the complete episodes and feedback of `source` into a new bag `target`.

    Returns (episodes, feedback, messages left out). Connections are added in the order of the
    original's channels (so topic ids, order and empty topics match a normally closed bag),
    with the definitions the original stores and the type hashes computed from them.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    stream = _McapStream(source)
    writer = Writer(target, version=ROSBAG2_VERSION, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    try:
        connections = {}  # mcap channel id -> rosbags Connection
        by_topic = {}
        episodes = feedback = kept = 0
        for kind, payload in _group_episodes(stream.messages()):
            _add_new_connections(writer, stream.channels, connections, by_topic)
            parts = payload.items() if kind == "episode" else [(SIDE_RECORDS[kind], payload)]
            for topic, (_msgtype, _msgdef, log_time, data) in parts:
                writer.write(by_topic[topic], log_time, data)
                kept += 1
            if kind == "episode":
                episodes += 1
            else:
                feedback += kind == "feedback"
        _add_new_connections(writer, stream.channels, connections, by_topic)  # topics left empty
        writer.set_custom_data("lens_ros.episodes", str(episodes))
        writer.set_custom_data("lens_ros.repaired", f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} by "
                               f"lens-episodes repair from {source.name} ({source.stat().st_size} bytes)")
        writer.close()
    except BaseException:
        with suppress(Exception):  # closing a file that failed to write fails again; keep the first error
            writer.abort()
        raise
    return episodes, feedback, stream.messages_read - kept


def _add_new_connections(writer, channels, connections, by_topic):
    """Add a rosbags connection for each mcap channel seen since the last call."""
    from rosbags.rosbag2.metadata import parse_qos

    for channel_id, (channel, schema) in channels.items():
        if channel_id in connections:
            continue
        if schema is None:
            raise ValueError(f"channel {channel.topic} has no schema (not a bag EpisodeRecorder wrote)")
        msgdef = schema.data.decode("utf-8")
        connection = writer.add_connection(
            channel.topic, schema.name, msgdef=msgdef, rihs01=_DECODER.hash_rihs01(schema.name, msgdef),
            serialization_format=channel.message_encoding,
            offered_qos_profiles=parse_qos(channel.metadata.get("offered_qos_profiles", "")))
        connections[channel_id] = connection
        by_topic[channel.topic] = connection


def _keep_original(mcap: Path):
    """Give the original a second name, <name>.mcap.orig, that survives the swap.

    A hard link costs no copy; filesystems without links (FAT on a USB stick) get a copy.
    """
    backup = mcap.with_name(mcap.name + BACKUP_SUFFIX)
    if backup.exists():
        if os.path.samefile(backup, mcap):
            return  # linked by an interrupted earlier repair
        raise FileExistsError(f"{backup} exists and is another file; move it away to keep this original")
    try:
        os.link(mcap, backup)
    except OSError:
        shutil.copyfile(mcap, backup)
        _fsync_path(backup)
    _fsync_path(mcap.parent)


# --------------------------------------------------------------------------------------------
# Command line: lens-episodes repair|info DIR [DIR ...]
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """`lens-episodes`: one line per bag on stdout; exit 0, 1 (a repair failed) or 2 (bad path)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lens-episodes",
        description="Episode bags written by lens_ros' recorder. `repair` makes the bags of a killed "
                    "recorder (no MCAP footer, no metadata.yaml) open in ros2 bag, rosbags and Foxglove, "
                    "keeping every complete episode; complete bags are left untouched.")
    commands = parser.add_subparsers(dest="command", required=True)
    repair_parser = commands.add_parser("repair", help="rewrite damaged bags so that every ROS tool opens them")
    repair_parser.add_argument("--keep-original", action="store_true",
                               help="keep each original .mcap beside the repaired one as <name>.mcap.orig")
    info_parser = commands.add_parser("info", help="list bags: complete or not, episode and feedback counts")
    for sub in (repair_parser, info_parser):
        sub.add_argument("paths", nargs="+", type=Path, metavar="DIR",
                         help="a bag directory, or a record directory holding bag directories")
    args = parser.parse_args(argv)

    # The per-bag line says what the stream's "ends early" warnings would repeat.
    quiet, level = logger, logger.level
    quiet.setLevel(logging.ERROR)
    try:
        return max((_run_command(args, path) for path in args.paths), default=0)
    finally:
        quiet.setLevel(level)


def _run_command(args, path: Path) -> int:
    try:
        reports = repair(path, keep_original=args.keep_original) if args.command == "repair" else inspect_bags(path)
    except FileNotFoundError:
        print(f"lens-episodes: error: {path} does not exist", file=sys.stderr)
        return 2
    for report in reports:
        print(report.line(), flush=True)
    if any(report.status == FAILED for report in reports):
        return 1
    if not any(report.usable or report.status in (NEEDS_REPAIR, IN_USE) for report in reports):
        print(f"lens-episodes: error: {path} holds nothing repairable (no bag with a complete episode "
              "or feedback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
