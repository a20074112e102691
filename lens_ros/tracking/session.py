"""Language goals tracked at camera rate: LENS starts a track, SAM2's memory carries it, LENS
finds it again when it is lost (ROS-free; lens_node's tracking is a thin layer over this).

Per track and frame: SAM2's object score decides presence (score > ``presence_threshold``; SAM2's
own rule is > 0). After ``lost_frames`` frames in a row without the object the track is LOST;
with ``reacquire`` on, the track's command is answered again on the newest frame (at most every
``reacquire_interval_s``) and when LENS finds the object the track restarts from its mask:
REACQUIRED (tracking again, after a loss). With ``reground_s`` > 0, LENS answers the command
again every ``reground_s`` seconds of tracking; the IoU between the tracked and the fresh mask
is the drift, reported as an event, and below ``drift_iou`` the track restarts from the fresh mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lens_ros.training.data import mask_box
from lens_ros.training.metrics import mask_iou

TRACKING, LOST, REACQUIRED = "tracking", "lost", "reacquired"
STATES = (TRACKING, LOST, REACQUIRED)
LOST_EVENT, REACQUIRED_EVENT, DRIFT_EVENT, STOPPED_EVENT = "lost", "reacquired", "drift", "stopped"


@dataclass
class TrackingConfig:
    """How tracks are kept, lost and found again."""

    lost_frames: int = 15
    """Frames in a row without the object (SAM2's object score) before a track is LOST."""
    presence_threshold: float = 0.0
    """SAM2's object score logit above which the object is present (SAM2's own rule: 0)."""
    reacquire: bool = True
    """Answer a LOST track's command again on new frames and restart the track when LENS finds it."""
    reacquire_interval_s: float = 1.0
    """At most one re-acquisition attempt per track in this time (each is a full LENS command)."""
    reground_s: float = 0.0
    """Answer a tracked command again every this many seconds and report the drift (0 = off)."""
    drift_iou: float = 0.5
    """Restart the track from the fresh mask when the drift IoU falls below this."""

    def __post_init__(self) -> None:
        if not (isinstance(self.lost_frames, int) and self.lost_frames >= 1):
            raise ValueError(f"lost_frames must be a positive integer, got {self.lost_frames!r}")
        for name in ("reacquire_interval_s", "reground_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.drift_iou <= 1.0:
            raise ValueError(f"drift_iou must be between 0 and 1, got {self.drift_iou!r}")


@dataclass
class TrackEvent:
    """Something that happened to a track on a frame: lost, reacquired, drift (with its IoU), stopped."""

    kind: str
    frame: int
    iou: float | None = None


@dataclass
class TrackUpdate:
    """One track on one frame."""

    track_id: int
    command: str
    state: str
    mask: np.ndarray  # bool H x W, this frame's size (empty while LOST)
    score: float  # SAM2's object score logit
    present: bool
    box: tuple[float, float, float, float] | None  # around the mask's pixels (x1, y1, x2, y2: pixel edges), None when empty
    area: int
    events: list[TrackEvent] = field(default_factory=list)


@dataclass
class _Track:
    command: str
    state: str = TRACKING
    absent: int = 0
    last_attempt: float = float("-inf")
    last_ground: float = 0.0
    events: list[TrackEvent] = field(default_factory=list)  # all of them, for the episode


class TrackingSession:
    """Tracks of language goals on one camera stream.

    ``pipeline``: a ``LensPipeline`` (answers commands), ``tracker``: a
    ``lens_ros.tracking.tracker.StreamingTracker``. Call ``start`` for a goal, ``update`` with
    every new frame, ``stop`` to end a track. Not thread-safe (one worker calls it)."""

    def __init__(self, pipeline, tracker, config: TrackingConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pipeline, self.tracker = pipeline, tracker
        self.config = config or TrackingConfig()
        self.clock = clock
        self.tracks: dict[int, _Track] = {}
        self.lens_calls = 0  # commands answered for re-acquisition and re-grounding
        self._frame = None

    def start(self, track_id: int, command: str, frame: np.ndarray, result=None):
        """Answer ``command`` on ``frame`` (or take LENS's ``result`` for it) and start tracking the
        object from its mask. Returns the SegmentationResult; no track starts when nothing was found."""
        result = result if result is not None else self.pipeline.segment(frame, command)
        if result.found and result.mask.any():
            self._frame = frame
            self.tracker.remove_object(track_id)
            self.tracker.add_object(track_id, frame, result.mask)
            self.tracks[track_id] = _Track(command=result.command, last_ground=self.clock())
        return result

    def stop(self, track_id: int) -> TrackEvent | None:
        """End one track (None when there was no such track)."""
        track = self.tracks.pop(track_id, None)
        self.tracker.remove_object(track_id)
        if track is None:
            return None
        event = TrackEvent(STOPPED_EVENT, self.tracker.frame_idx)
        track.events.append(event)
        return event

    def stop_all(self) -> list[TrackEvent]:
        return [event for event in (self.stop(track_id) for track_id in list(self.tracks)) if event]

    def update(self, frame: np.ndarray) -> list[TrackUpdate]:
        """Track every object on a new frame; LOST tracks may be re-acquired, tracked ones re-grounded."""
        self._frame = frame
        results = self.tracker.update(frame) if self.tracks else {}
        now, updates = self.clock(), []
        for track_id, track in list(self.tracks.items()):
            mask, score, _ = results[track_id]
            present = score > self.config.presence_threshold
            events: list[TrackEvent] = []
            track.absent = 0 if present else track.absent + 1
            if track.state != LOST and track.absent >= self.config.lost_frames:
                track.state = LOST
                events.append(TrackEvent(LOST_EVENT, self.tracker.frame_idx))
            if track.state == LOST and self.config.reacquire and now - track.last_attempt >= self.config.reacquire_interval_s:
                track.last_attempt = now
                found = self._answer_again(track)
                if found is not None:
                    mask, score, present = self._restart(track_id, track, found, now)
                    track.state = REACQUIRED
                    events.append(TrackEvent(REACQUIRED_EVENT, self.tracker.frame_idx))
            elif track.state != LOST and self.config.reground_s and now - track.last_ground >= self.config.reground_s:
                track.last_ground = now
                found = self._answer_again(track)
                if found is not None:
                    iou = mask_iou(mask, found.mask)
                    events.append(TrackEvent(DRIFT_EVENT, self.tracker.frame_idx, iou=iou))
                    if iou < self.config.drift_iou:
                        mask, score, present = self._restart(track_id, track, found, now)
            if track.state == LOST:
                mask = np.zeros_like(mask)
            track.events.extend(events)
            updates.append(TrackUpdate(track_id=track_id, command=track.command, state=track.state, mask=mask,
                                       score=score, present=present, box=mask_box(mask), area=int(mask.sum()),
                                       events=events))
        return updates

    def _answer_again(self, track: _Track):
        self.lens_calls += 1
        result = self.pipeline.segment(self._frame, track.command)
        return result if result.found and result.mask.any() else None

    def _restart(self, track_id: int, track: _Track, result, now: float):
        """The track again from LENS's mask on the current frame (its memory restarts there)."""
        self.tracker.remove_object(track_id)
        mask, score, present = self.tracker.add_object(track_id, self._frame, result.mask)[track_id]
        track.absent, track.last_ground = 0, now
        return mask, score, present
