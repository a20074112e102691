"""Episodes and feedback written to disk on a thread of their own (no rclpy here).

``EpisodeRecorder`` makes every record durable (chunk closed, flushed, fsynced) before it
returns, which takes milliseconds on an SSD and far longer on a robot's SD card. Done in a
subscription callback, that wait made DDS drop feedback at 200 Hz (135 of 1000 recorded); done
in the worker, it delays the next command. So callbacks and the worker only enqueue here, and
one writer thread does the disk work in arrival order (an episode is enqueued before its answer
is published, so its feedback always comes after it).

The queue is bounded by bytes (images are megabytes): what does not fit is dropped and counted,
never allowed to grow the node's memory without bound. ``close`` writes everything queued, then
closes the bag.
"""

from __future__ import annotations

import collections
import threading
import time

DEFAULT_MAX_QUEUED_BYTES = 512 * 1024 * 1024


class RecordingQueue:
    """Feeds an ``EpisodeRecorder`` from a writer thread."""

    def __init__(self, recorder, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> None:
        self.recorder = recorder
        self.max_queued_bytes = max_queued_bytes
        self._items: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self.episodes_dropped = 0  # did not fit in the queue
        self.feedback_dropped = 0
        self.track_dropped = 0
        self.write_errors = 0  # the recorder raised something other than an OSError
        self.last_write_error = ""
        self._thread = threading.Thread(target=self._run, name="lens_recorder", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._items)

    def episode(self, request_id: int, image: bytes, command: bytes, segmentation: bytes,
                depth: bytes | None = None, camera_info: bytes | None = None) -> bool:
        """Queue one episode (CDR bytes); False when it was dropped (queue full or closed)."""
        size = sum(len(part) for part in (image, command, segmentation, depth or b"", camera_info or b""))
        if self._put(size, self.recorder.record, request_id, image, command, segmentation,
                     depth=depth, camera_info=camera_info, stamp_ns=time.time_ns()):
            return True
        self.episodes_dropped += 1
        return False

    def feedback(self, request_id: int, feedback: bytes) -> bool:
        """Queue one Feedback (CDR bytes); its log time is its arrival."""
        if self._put(len(feedback), self.recorder.record_feedback, request_id, feedback, stamp_ns=time.time_ns()):
            return True
        self.feedback_dropped += 1
        return False

    def track(self, request_id: int, tracks: bytes) -> bool:
        """Queue one tracked command's state on a frame (CDR lens_ros/Tracks with that one track)."""
        if self._put(len(tracks), self.recorder.record_track, request_id, tracks, stamp_ns=time.time_ns()):
            return True
        self.track_dropped += 1
        return False

    def _put(self, size: int, write, *args, **kwargs) -> bool:
        with self._cond:
            if self._closing or self._queued_bytes + size > self.max_queued_bytes:
                return False
            self._items.append((size, write, args, kwargs))
            self._queued_bytes += size
            self._cond.notify_all()
        return True

    def close(self) -> None:
        """Write what is queued, stop the writer, close the bag (summary and metadata.yaml)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self.recorder.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                size, write, args, kwargs = self._items.popleft()
            try:
                write(*args, **kwargs)  # OSErrors are counted by the recorder itself
            except Exception as exc:  # noqa: BLE001 - anything else must not end the writer
                self.write_errors += 1
                self.last_write_error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._queued_bytes -= size
