"""lens_node's tracking: language goals followed on every camera frame.

A thin ROS layer over ``lens_ros.tracking.session.TrackingSession`` (LENS starts a track, SAM2's
memory carries it, LENS finds it again when it is lost). Threads:

- everything that touches the models runs on the node's worker (``RequestScheduler``): a track
  starts right after the command that found its object is served, and every new camera frame is
  tracked there between commands (``set_background``), so a command waits at most for the frame
  in progress;
- tracking always takes the newest frame: frames that arrive while one is tracked are skipped
  and counted (``Tracks.frames_skipped``), never queued;
- executor callbacks only ask (``request_stop``); a track goal's coroutine gets its per-frame
  feedback and its end through a ``TrackGoal`` (a queue), as segment goals get their answers.

A frame that cannot be converted is counted (``bad_frames``) and skipped; the tracks go on.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CompressedImage

from lens_ros.images import InvalidInputError
from lens_ros.msg import TrackedObject, Tracks
from lens_ros.ros.conversions import (
    array_to_image,
    color_image_to_rgb,
    compressed_image_to_rgb,
    grasp_to_region,
    mask_to_image,
)
from lens_ros.tracking.session import DRIFT_EVENT, LOST, LOST_EVENT, REACQUIRED_EVENT, STOPPED_EVENT, TrackUpdate

ALL_TRACKS = 0  # stop_tracking's id for every track
STOPPED, CANCELLED, LOST_REASON = "stopped", "cancelled", "lost"
THUMBNAIL_SCALE = 4  # episode thumbnails: masks at a quarter of the frame's width and height
RECORDED_EVENTS = (LOST_EVENT, REACQUIRED_EVENT, DRIFT_EVENT, STOPPED_EVENT)


@dataclass
class TrackGoal:
    """What the coroutine of one track goal hears from the worker."""

    keep_when_lost: bool
    updates: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    ended: str | None = None  # why the track ended (None while it runs)
    frames: int = 0  # frames on which the track was updated


@dataclass
class _Started:
    command: str
    goal: TrackGoal | None
    requested: float  # when its command came in (time.monotonic()): a later stop of every track ends it
    frames: int = 0
    last: TrackedObject | None = None  # its entry on the last tracked frame


def load_tracker(cfg, pipeline):
    """The StreamingTracker of ``cfg.tracker_model`` for ``pipeline``'s LENS, sharing its image encoder
    pass when the weights are the same; and why it does not share ("" when it does: reported in
    /diagnostics). Runs on the worker."""
    from lens_ros.tracking.models import load_tracker_model, use_lens_mask_decoder
    from lens_ros.tracking.shared_encoder import share_image_encoder
    from lens_ros.tracking.tracker import StreamingTracker

    model = load_tracker_model(cfg.tracker_model, device=str(pipeline.device), allow_download=cfg.allow_download)
    if cfg.propagation_decoder == "lens":
        use_lens_mask_decoder(model, pipeline.model.sam)
    tracker = StreamingTracker(model)
    return tracker, share_image_encoder(pipeline, tracker)


class NodeTracking:
    """The node's tracks: started on the worker, updated on every new frame, published per frame.

    ``sensors``: the node's SensorBuffers; ``geometry(header, size_hw)``: the node's depth and
    intrinsics lookup (depth, intrinsics, problem, note); ``publish(tracks, mask, grasp)``;
    ``record(request_id, tracks)`` or None; ``notify()``: wake the goal coroutines; ``config()``:
    the node's current NodeConfig (live parameters apply from the next frame).
    """

    def __init__(self, session, not_shared: str, sensors, geometry, publish, record, notify, config,
                 log_warning) -> None:
        self.session = session
        self.not_shared = not_shared  # why the tracker has an image encoder pass of its own ("": shared with LENS)
        self._sensors, self._geometry, self._publish, self._record = sensors, geometry, publish, record
        self._notify, self._config, self._warn = notify, config, log_warning
        self._started: dict[int, _Started] = {}
        self._stops: list[tuple[int, str, float]] = []  # (track id or ALL_TRACKS, reason, when asked)
        self._lock = threading.Lock()
        self._last_seq = 0
        self.frames_tracked = 0
        self.frames_skipped = 0
        self.bad_frames = 0
        self.last_frame_ms = 0.0  # the last tracked frame, all of it (Tracks.latency_ms)
        # ... of which SAM2's step (with any LENS answer for re-acquisition or re-grounding), the grasps,
        # and the rest: conversion, labels, messages, publishing, episode records (the ROS layer)
        self.last_split_ms = {"sam2": 0.0, "grasps": 0.0, "ros": 0.0}
        self._grasp_s = 0.0
        self.last_error = ""

    @property
    def active(self) -> int:
        return len(self._started)

    # -- executor side ----------------------------------------------------------------------
    def request_stop(self, track_id: int, reason: str = STOPPED) -> None:
        """Ask the worker to end one track before its next frame; ALL_TRACKS: every track whose command
        came in before now (a stop that reaches the worker late must not end a track started after it)."""
        with self._lock:
            self._stops.append((int(track_id), reason, time.monotonic()))

    # -- worker side ------------------------------------------------------------------------
    def start(self, track_id: int, rgb: np.ndarray, frame_seq: int, result, goal: TrackGoal | None = None,
              requested: float | None = None) -> str:
        """Track the object of ``result`` (LENS's answer on ``rgb``) from that frame on; returns why
        not ("" when it started). ``requested``: when its command came in (time.monotonic(); default now)."""
        if not result.found or not result.mask.any():
            return "not found"
        if len(self._started) >= self._config().max_tracks and track_id not in self._started:
            return f"max_tracks ({self._config().max_tracks}) tracks are running"
        self.session.start(track_id, result.command, rgb, result=result)
        self._started[track_id] = _Started(result.command, goal, time.monotonic() if requested is None else requested)
        self._last_seq = max(self._last_seq, frame_seq)  # frames before it are not "skipped" by this track
        return ""

    def process(self) -> None:
        """The scheduler's background work: stop what was asked, then track the newest frame."""
        self._apply_stops()
        if not self._started:
            return
        frame = self._sensors.newest_after(self._last_seq)
        if frame is None:
            return
        skipped = frame.seq - self._last_seq - 1 if self._last_seq else 0
        self._last_seq = frame.seq
        began = time.perf_counter()
        try:
            msg = frame.msg
            rgb = compressed_image_to_rgb(msg) if isinstance(msg, CompressedImage) else color_image_to_rgb(msg)
        except InvalidInputError as exc:
            self.bad_frames += 1
            self.last_error = f"frame {frame.seq} skipped: {exc}"
            if self.bad_frames == 1 or self.bad_frames % 100 == 0:  # a broken camera must not flood the log
                self._warn(f"tracking: {self.last_error} ({self.bad_frames} so far)")
            return
        cfg = self._config()  # live parameters apply from this frame on
        self.session.config = cfg.tracking_config()
        step = time.perf_counter()
        updates = self.session.update(rgb)
        step = time.perf_counter() - step
        self._grasp_s = 0.0
        self.frames_tracked += 1
        self.frames_skipped += skipped
        header = msg.header
        geometry = None  # this frame's depth and intrinsics, looked up once for all its tracks' grasps
        if cfg.grasps and any(update.area for update in updates):
            looked_up = time.perf_counter()
            geometry = self._geometry(header, rgb.shape[:2])
            self._grasp_s += time.perf_counter() - looked_up
        objects = [self._tracked_object(update, label, geometry, cfg) for label, update in enumerate(updates, start=1)]
        labels = np.zeros(rgb.shape[:2], dtype=np.uint8)
        for update, tracked in zip(updates, objects):
            if update.area:
                labels[update.mask] = tracked.label
        self.last_frame_ms = (time.perf_counter() - began) * 1000
        message = Tracks(header=header, tracks=objects, labels=array_to_image(labels, "mono8", header),
                         frames_skipped=skipped, latency_ms=self.last_frame_ms)
        best = next((g for o in objects for g in o.grasps if g.has_3d), None)
        self._publish(message, mask_to_image(labels > 0, header),
                      PoseStamped(header=header, pose=best.pose) if best is not None else None)
        for update, tracked in zip(updates, objects):
            self._after_frame(update, tracked, header, cfg)
        self._notify()
        total = time.perf_counter() - began
        self.last_split_ms = {"sam2": step * 1000, "grasps": self._grasp_s * 1000,
                              "ros": (total - step - self._grasp_s) * 1000}

    def end_all(self, reason: str) -> None:
        """End every track now (deactivate, shutdown); the worker must be idle."""
        for track_id in list(self._started):
            self._end(track_id, reason)
        self._notify()

    def _apply_stops(self) -> None:
        with self._lock:
            stops, self._stops = self._stops, []
        for track_id, reason, asked in stops:
            if track_id == ALL_TRACKS:
                stopped = [key for key, started in self._started.items() if started.requested <= asked]
            else:
                stopped = [track_id] if track_id in self._started else []
            for key in stopped:
                self._end(key, reason)
        if stops:
            self._notify()

    def _end(self, track_id: int, reason: str) -> None:
        started = self._started.pop(track_id)
        event = self.session.stop(track_id)
        if event is not None and self._record is not None:  # its last state, with the stop as its event
            last = started.last or TrackedObject(track_id=track_id, command=started.command, drift_iou=math.nan)
            self._record_state(track_id, _with_events(last, [STOPPED_EVENT]), None, None)
        if started.goal is not None:
            started.goal.frames, started.goal.ended = started.frames, reason

    def _tracked_object(self, update: TrackUpdate, label: int, geometry, cfg) -> TrackedObject:
        drift = next((e.iou for e in update.events if e.kind == DRIFT_EVENT), None)
        tracked = TrackedObject(track_id=update.track_id, command=update.command, state=update.state,
                                present=bool(update.present), score=float(update.score),
                                box=[float(v) for v in update.box] if update.box else [0.0] * 4,
                                mask_area=update.area, label=label if update.area else 0,
                                events=[e.kind for e in update.events],
                                drift_iou=float(drift) if drift is not None else math.nan)
        if geometry is not None and update.area:
            tracked.grasps = self._grasps(update, geometry, cfg)
        return tracked

    def _grasps(self, update: TrackUpdate, geometry, cfg) -> list:
        from lens_ros.grasp import grasp_regions

        began = time.perf_counter()
        depth, intrinsics, problem, note = geometry
        try:
            grasps = grasp_regions(update.mask, depth=None if problem else depth,
                                   intrinsics=None if problem else intrinsics, config=cfg.grasp_config(),
                                   box=update.box)
        except ValueError as exc:  # e.g. depth of another size: this frame's grasps only
            self.last_error = f"tracking grasps: {exc}"
            return []
        finally:
            self._grasp_s += time.perf_counter() - began
        regions = [grasp_to_region(g) for g in grasps]
        for region in regions:
            region.reason = "; ".join(r for r in (problem or note, region.reason) if r)
        return regions

    def _after_frame(self, update: TrackUpdate, tracked: TrackedObject, header, cfg) -> None:
        started = self._started.get(update.track_id)
        if started is None:
            return
        started.frames += 1
        started.last = tracked
        goal = started.goal
        if goal is not None:
            goal.updates.append((header, tracked))
        if self._record is not None:
            every = cfg.track_thumbnail_frames
            if any(kind in RECORDED_EVENTS for kind in tracked.events) or (every and started.frames % every == 0):
                self._record_state(update.track_id, tracked, update.mask, header)
        # A lost track ends unless it can come back: re-acquisition on, and a goal that asked to keep it
        # (topic commands' tracks are kept), so that nothing lost for good costs a SAM2 step per frame.
        if update.state == LOST and (not cfg.reacquire or (goal is not None and not goal.keep_when_lost)):
            self._end(update.track_id, LOST_REASON)

    def _record_state(self, track_id: int, tracked: TrackedObject, mask, header) -> None:
        message = Tracks(tracks=[tracked])
        if header is not None:
            message.header = header
        if mask is not None:
            message.labels = array_to_image(_thumbnail(mask), "mono8", header)
        self._record(track_id, message)


def _with_events(tracked: TrackedObject, events: list[str]) -> TrackedObject:
    copy = TrackedObject()
    for name in TrackedObject.get_fields_and_field_types():
        setattr(copy, name, getattr(tracked, name))
    copy.events = events
    return copy


def _thumbnail(mask: np.ndarray) -> np.ndarray:
    """A quarter-size mono8 copy of a bool mask (255 where any of its pixels is object: thin parts stay)."""
    import cv2

    height, width = mask.shape
    size = (max(1, width // THUMBNAIL_SCALE), max(1, height // THUMBNAIL_SCALE))
    small = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
    return np.where(small > 0, 255, 0).astype(np.uint8)
